"""alignx benchmarks: the hot-path ops and one training step, side by side with the dense torch idioms, the official
AlignX code style and the public fused kernels.

One script per op (``bench_span_pool``, ``bench_info_nce``, ``bench_lang_match``, ``bench_linear_ce``) plus the
end-to-end ``bench_step``, sharing :mod:`benchmarks.harness` (timing, jobs), :mod:`benchmarks.memory` (the
fresh-process memory probe), :mod:`benchmarks.results` (rows, CSV) and :mod:`benchmarks.claims` (the table of
targets and the one function that checks them); ``python -m benchmarks.run --device cpu|cuda`` runs them all
(``make bench`` / ``make bench-gpu``) and :mod:`benchmarks.report` turns ``results/<device>.csv`` into markdown and
plots. See ``benchmarks/README.md``.
"""

import os
import sys

# Run from the repository root (``python -m benchmarks.run``), the root is on sys.path and the folder ``kernels/``
# would be importable as ``kernels`` (Hugging Face's package name, which transformers probes). The submodules of this
# package are found through ``__path__``, so the root can leave sys.path once this package is imported.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]
