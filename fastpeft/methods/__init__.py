"""PETL method configs, one file per method. Each is a dataclass passed to `fastpeft.inject`."""
from .adaptformer import AdaptFormer
from .adapter import Adapter
from .convpass import Convpass
from .lora import LoRA
from .vpt import VPT
from .fact import FacT
from .kadaptation import KAdaptation
from .noah import NOAH
from .ssf import SSF
from .vqt import VQT
from .bitfit import BitFit, LinearProbe
from .base import Method, ViTInfo, vit_info

__all__ = ["Method", "ViTInfo", "vit_info", "AdaptFormer", "Adapter", "Convpass", "LoRA", "VPT", "FacT", "KAdaptation", "NOAH", "SSF", "VQT", "BitFit", "LinearProbe"]
