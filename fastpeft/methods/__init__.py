"""PETL method configs, one file per method. Each is a dataclass passed to `fastpeft.inject`."""
from .adaptformer import AdaptFormer
from .adapter import Adapter
from .convpass import Convpass
from .vpt import VPT
from .noah import NOAH
from .vqt import VQT
from .lora import LoRA
from .fact import FacT
from .kadaptation import KAdaptation
from .ssf import SSF
from .bitfit import BitFit, LinearProbe
from .conv_adapter import ConvAdapter
from .st_adapter import STAdapter
from .base import Method, ViTInfo, vit_info

__all__ = ["Method", "ViTInfo", "vit_info", "AdaptFormer", "Adapter", "Convpass", "VPT", "VQT", "NOAH",
           "LoRA", "FacT", "KAdaptation", "SSF", "BitFit", "LinearProbe", "ConvAdapter", "STAdapter"]
