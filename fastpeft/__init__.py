"""fastpeft: fused kernels for parameter-efficient fine-tuning of frozen timm Vision Transformers.

    model = timm.create_model("vit_base_patch16_224", num_classes=100)
    fastpeft.inject(model, fastpeft.LoRA(rank=8))     # the official method, official names
    fastpeft.merge(model)                              # linear methods fold into the weights
"""
from __future__ import annotations

import importlib

from .version import __version__
from .api import injections, merge, remove, summary, summary_rows, trainable_parameters, unmerge
from .patch import PatchReport, patch, unpatch
from .load import load_official
# `fastpeft.inject` / `load` / `save` take an optional task name (fastpeft/multitask.py; without
# one they are fastpeft.api.inject and fastpeft.taskfile's load / save; the module fastpeft.load
# is the official-checkpoint loader)
from .multitask import inject, load, save, task_index, tasks
from .methods import *  # noqa: F401,F403  (method configs: AdaptFormer, LoRA, ...)
from .methods import __all__ as _methods_all

__all__ = [
    "__version__", "inject", "remove", "merge", "unmerge", "trainable_parameters", "summary",
    "summary_rows", "injections", "build_info", "backends", "patch", "unpatch", "PatchReport",
    "load_official", "save", "load", "tasks", "task_index",
    *_methods_all,
]


def __getattr__(name: str):
    # The extension loader and custom ops are imported on first use, so `import fastpeft` stays
    # cheap and never touches the compiled extension or a GPU.
    if name in ("build_info", "backends"):
        return getattr(importlib.import_module("._ext", __name__), name)
    if name == "ops":
        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
