"""alignx.kernels: the fused hot-path ops (span mean-pooling, InfoNCE, language matching, linear cross-entropy;
``cross_entropy_sum`` is its counterpart for logits that already exist).

Each op has four layers in one file (Triton kernels -> launchers -> autograd.Function -> public function), a
memory-bounded torch path that runs on CPU, and an fp32 oracle in :mod:`alignx.kernels.reference`.
"""

from . import reference
from ._common import BACKENDS, interpreter_enabled, resolve_backend
from .info_nce import info_nce
from .lang_match import lang_match_loss
from .linear_ce import CE_CHUNK_ELEMENTS, cross_entropy_sum, linear_cross_entropy
from .span_pool import span_mean_pool

__all__ = [
    "BACKENDS",
    "CE_CHUNK_ELEMENTS",
    "cross_entropy_sum",
    "info_nce",
    "interpreter_enabled",
    "lang_match_loss",
    "linear_cross_entropy",
    "reference",
    "resolve_backend",
    "span_mean_pool",
]
