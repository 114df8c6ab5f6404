"""alignx.kernels: the fused hot-path ops (span mean-pooling, InfoNCE, language matching).

Each op has four layers in one file (Triton kernels -> launchers -> autograd.Function -> public function), a
memory-bounded torch path that runs on CPU, and an fp32 oracle in :mod:`alignx.kernels.reference`.
"""

from . import reference
from ._common import BACKENDS, interpreter_enabled, resolve_backend

__all__ = ["BACKENDS", "interpreter_enabled", "reference", "resolve_backend"]
