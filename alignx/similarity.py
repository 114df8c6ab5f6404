"""Similarity spaces of the contrastive term: where the cosine of the InfoNCE is taken.

The reference (``objective.similarity = cosine``) takes the cosine of the raw mean-pooled states. On models whose
residual stream carries a few huge, nearly input-independent dimensions (Gemma 3: 8 dimensions hold > 99 % of the
squared norm of every pooled span), every raw cosine is about 0.99, the tau = 0.1 InfoNCE sits at ln N whatever the
model does, and its gradient (proportional to 1 / ||h||, ||h|| ~ 5,000) is negligible next to next-token
prediction's. A space is a map ``z = f(h)`` applied to anchors and candidates before the fused cosine InfoNCE
(``alignx.kernels.info_nce``, normalisation fused); gradients flow through ``f`` to ``h``, never into its
statistics. ``docs/alignment.md`` has the measurements behind each choice.

Spaces (:data:`SPACES`):

* ``cosine``: ``z = h`` (the official formula).
* ``center``: ``z = h - mean of the step's rows`` (the sources and targets of the micro-batch, or of the gathered
  global batch), gradient included: the former ``objective.center = batch``. On batches that mix language
  directions this makes language identity the dominant direction and the cheapest way down is uniform
  similarity (collapse): measured, kept for comparison.
* ``standardize``: ``z_d = (h_d - mu_d) / sqrt(var_d + eps * mean(var))`` with running per-dimension statistics.
* ``whiten``: shrunk ZCA whitening with running statistics: with ``s = sqrt(diag(Sigma))`` and the correlation
  ``R = Sigma / (s s^T)``, ``C = (1 - alpha) R + alpha I`` and ``z = ((h - mu) / s) C^{-1/2}``. Shrinking halfway
  (``alpha = 0.5``, the default) keeps every eigenvalue of ``C`` at least ``alpha``: no direction is amplified by
  more than ``1 / sqrt(alpha) = 1.41`` (a rank-deficient estimate from a few hundred rows cannot blow up noise),
  while the shared huge directions (eigenvalues of ``R`` in the hundreds) are shrunk to unit scale.

Running statistics (:class:`RunningMoments`): the pooled sources and targets of every training micro-batch are
staged (detached, fp64) and, after each optimizer step, gathered over the data-parallel ranks in the order of their
global micro-batch index (so 1 process and ``W`` ranks add the same rows in the same order: identical statistics)
and added to decayed sums (``objective.similarity_decay`` per step; 1 = a plain running mean over all rows). With
``similarity_per_language`` each language has its own moments, so each language's mean (its identity) is removed
before the cosine, as the evaluation centres per language; a language with fewer than ``min_rows`` rows uses the
all-language moments. The statistics of step ``s`` are those of steps ``< s``: every micro-batch of a step uses the
same transform, and the queue's rows (stored raw) are transformed with the statistics of the step that uses them.
They are saved in every checkpoint and restored on resume. Until ``similarity_warmup_steps`` steps have been
committed the contrastive term is computed and logged but weighted 0 (its statistics are not trusted yet).

Why the default cannot collapse: the running statistics are detached and come from earlier rows, so the model cannot
lower the loss by moving the batch mean or by shrinking the spread of the current rows (as ``center`` can); a
uniform-similarity solution leaves every cosine equal and the InfoNCE at exactly ``ln N`` — never below its current
value once the positives win — and the logged spread of positive and negative similarities shows it
(``diag/pos_sim``, ``diag/neg_sim``, ``diag/*_std``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .dist import gather_sizes, is_distributed, rank_and_world
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ObjectiveConfig

__all__ = [
    "SPACES",
    "CenterSpace",
    "RunningMoments",
    "RunningSpace",
    "SimilaritySpace",
    "StandardizeSpace",
    "WhitenSpace",
    "build_space",
]

ALL_LANGS = -1  # key of the all-language moments


class RunningMoments:
    """Decayed sums of pooled rows: count, sum ``[D]`` and second moment (``[D, D]`` if ``full``, else ``[D]``), fp64,
    for all languages (key ``-1``) and, if ``per_language``, for each language id seen.

    Rows are :meth:`stage`\\ d during the forwards of an optimizer step with their micro-step index and added by
    :meth:`commit` after it, identically on every rank.
    """

    VERSION = 1

    def __init__(self, *, full: bool, per_language: bool, decay: float) -> None:
        self.full = full
        self.per_language = per_language
        self.decay = decay
        self.count: dict[int, float] = {}
        self.sum: dict[int, Tensor] = {}
        self.second: dict[int, Tensor] = {}
        self.steps = 0  # committed optimizer steps
        self.version = 0  # bumped by every change (transform caches key on it)
        self._pending: list[tuple[int, Tensor, Tensor]] = []

    # -- accumulation ---------------------------------------------------------------------------------------------

    def stage(self, rows: Tensor, langs: Tensor, micro: int) -> None:
        """Remember ``rows [n, D]`` (detached, as fp64) with their ``langs [n]`` from micro-step ``micro``."""
        if rows.dim() != 2 or langs.shape != rows.shape[:1]:
            raise ValueError(f"stage needs rows [n, D] and langs [n], got {tuple(rows.shape)}, {tuple(langs.shape)}")
        self._pending.append((micro, rows.detach().double(), langs.detach().long()))

    @torch.no_grad()
    def commit(self, group: Any = None) -> int:
        """Add the staged rows of all ranks (ordered by global micro-batch index); returns the rows added.

        Every rank must call it after every optimizer step (it makes the same collectives whether or not it staged).
        """
        rows, langs, keys = self._local_pending()
        self._pending = []
        if is_distributed() and rank_and_world(group)[1] > 1:
            rows, langs, keys = self._gather(rows, langs, keys, group)
        order = torch.sort(keys, stable=True).indices
        rows, langs = rows[order], langs[order]
        self._decay()
        self.steps += 1
        self.version += 1
        if rows.shape[0] == 0:
            return 0
        self._add(ALL_LANGS, rows)
        if self.per_language:
            for lang in sorted(set(langs.tolist())):
                self._add(int(lang), rows[langs == lang])
        return int(rows.shape[0])

    def _local_pending(self) -> tuple[Tensor, Tensor, Tensor]:
        rank, world = rank_and_world() if is_distributed() else (0, 1)
        if not self._pending:
            d = next(iter(self.sum.values())).shape[0] if self.sum else 0
            return torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, dtype=torch.long), torch.zeros(0).long()
        rows = torch.cat([r for _, r, _ in self._pending])
        langs = torch.cat([lang for _, _, lang in self._pending])
        # Global micro-batch index of micro-step a on rank r (alignx.data.sampler): a * W + r.
        keys = torch.cat([torch.full((r.shape[0],), m * world + rank, dtype=torch.long) for m, r, _ in self._pending])
        return rows, langs, keys

    def _gather(self, rows: Tensor, langs: Tensor, keys: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        sizes = gather_sizes([rows.shape[0], rows.shape[1]], device=device, group=group)
        width = max(int(sizes.counts[:, 1].max()), 1)
        n_max = max(int(sizes.counts[:, 0].max()), 1)
        packed = torch.zeros(n_max, width + 2, dtype=torch.float64, device=device)
        n = rows.shape[0]
        if n:
            packed[:n, :width] = rows.to(device)
            packed[:n, width] = langs.to(device, torch.float64)
            packed[:n, width + 1] = keys.to(device, torch.float64)
        out = [torch.empty_like(packed) for _ in range(sizes.world_size)]
        dist.all_gather(out, packed, group=group)
        blocks = [o[: int(c)] for o, c in zip(out, sizes.counts[:, 0].tolist())]
        allrows = torch.cat(blocks).cpu()
        return allrows[:, :width], allrows[:, width].long(), allrows[:, width + 1].long()

    def _decay(self) -> None:
        if self.decay == 1.0:
            return
        for key in self.count:
            self.count[key] *= self.decay
            self.sum[key].mul_(self.decay)
            self.second[key].mul_(self.decay)

    def _add(self, key: int, rows: Tensor) -> None:
        d = rows.shape[1]
        if key not in self.count:
            self.count[key] = 0.0
            self.sum[key] = torch.zeros(d, dtype=torch.float64)
            self.second[key] = torch.zeros((d, d) if self.full else (d,), dtype=torch.float64)
        self.count[key] += float(rows.shape[0])
        self.sum[key] += rows.sum(0)
        self.second[key] += rows.T @ rows if self.full else (rows * rows).sum(0)

    # -- reading --------------------------------------------------------------------------------------------------

    def moments(self, key: int) -> tuple[float, Tensor, Tensor]:
        """``(count, mean [D], covariance [D, D] or variance [D])`` of ``key`` (fp64)."""
        n = self.count[key]
        mean = self.sum[key] / n
        second = self.second[key] / n
        cov = second - (torch.outer(mean, mean) if self.full else mean * mean)
        return n, mean, cov

    def keys(self) -> list[int]:
        return sorted(self.count)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError("the similarity statistics have staged rows; commit() before saving")
        return {
            "version": self.VERSION,
            "full": self.full,
            "per_language": self.per_language,
            "decay": self.decay,
            "steps": self.steps,
            "keys": self.keys(),
            "count": torch.tensor([self.count[k] for k in self.keys()], dtype=torch.float64),
            "sum": [self.sum[k].clone() for k in self.keys()],
            "second": [self.second[k].clone() for k in self.keys()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != self.VERSION:
            raise ValueError(f"unknown similarity statistics version {state.get('version')!r}")
        for name in ("full", "per_language", "decay"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the checkpoint's similarity statistics have {name}={state[name]}, this run has "
                    f"{getattr(self, name)}: resume with the checkpoint's objective.similarity settings"
                )
        keys = [int(k) for k in state["keys"]]
        self.count = {k: float(c) for k, c in zip(keys, state["count"].tolist())}
        self.sum = {k: s.double().cpu().clone() for k, s in zip(keys, state["sum"])}
        self.second = {k: s.double().cpu().clone() for k, s in zip(keys, state["second"])}
        self.steps = int(state["steps"])
        self.version += 1
        self._pending = []


class SimilaritySpace:
    """The protocol of a space (module docstring): the map applied to pooled rows before the cosine InfoNCE, and its
    training hooks. This base is the identity with no state; the registry :data:`SPACES` holds one subclass per
    ``objective.similarity`` value, built by :func:`build_space`.

    ``space(rows [n, D], langs [n])`` returns the transformed rows (fp32 for the running spaces, with the gradient
    of ``rows``); ``batch`` (``[m, D]``) is the set whose mean ``center`` subtracts.
    """

    name = "cosine"

    def __init__(self, *, warmup_steps: int = 1, **_: Any) -> None:
        self.warmup_steps = warmup_steps

    @property
    def running(self) -> bool:
        """Whether the space keeps running statistics (staged by training forwards, committed after each step)."""
        return False

    @property
    def trusted(self) -> bool:
        """Whether the contrastive term trains this step (False while running statistics warm up)."""
        return True

    def __call__(self, rows: Tensor, langs: Tensor | None = None, batch: Tensor | None = None) -> Tensor:
        return rows

    def stage(self, rows: Tensor, langs: Tensor, micro: int) -> None:
        """Keep this training micro-batch's rows for :meth:`end_step` (no-op without statistics)."""

    def end_step(self, group: Any = None) -> int:
        """Add the staged rows of every rank to the statistics; returns the rows added."""
        return 0

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is not None:
            raise ValueError("the checkpoint holds similarity statistics but this run's space keeps none")

    def describe(self) -> str:
        return self.name


class CenterSpace(SimilaritySpace):
    """``z = h - mean(batch)`` (gradient included): the former ``objective.center = batch``."""

    name = "center"

    def __call__(self, rows: Tensor, langs: Tensor | None = None, batch: Tensor | None = None) -> Tensor:
        ref = rows if batch is None else batch
        return rows - ref.mean(0)


class RunningSpace(SimilaritySpace):
    """A space ``z = (h - mu) W`` from running statistics (:class:`RunningMoments`), optionally per language.

    Subclasses choose the moments (``full``: the covariance or only its diagonal) and :meth:`matrix`.
    """

    full = False

    def __init__(
        self,
        *,
        per_language: bool = False,
        shrinkage: float = 0.5,
        eps: float = 1e-3,
        decay: float = 1.0,
        warmup_steps: int = 1,
        min_rows: int = 32,
    ) -> None:
        super().__init__(warmup_steps=warmup_steps)
        self.per_language = per_language
        self.shrinkage = shrinkage
        self.eps = eps
        self.min_rows = min_rows
        self.stats = RunningMoments(full=self.full, per_language=per_language, decay=decay)
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._cache_version = -1

    @property
    def running(self) -> bool:
        return True

    @property
    def trusted(self) -> bool:
        return self.stats.steps >= self.warmup_steps and ALL_LANGS in self.stats.count

    def __call__(self, rows: Tensor, langs: Tensor | None = None, batch: Tensor | None = None) -> Tensor:
        if ALL_LANGS not in self.stats.count:
            return rows  # nothing seen yet (warm-up of the very first step): the term is weighted 0
        rows32 = rows.float()
        if not self.per_language or langs is None:
            return self._apply(rows32, ALL_LANGS)
        out = torch.empty_like(rows32)
        keys = self._row_keys(langs)
        for key in sorted(set(keys.tolist())):
            sel = keys == key
            out = out.index_put((sel,), self._apply(rows32[sel], key))
        return out

    def _row_keys(self, langs: Tensor) -> Tensor:
        trusted = [k for k in self.stats.keys() if k != ALL_LANGS and self.stats.count[k] >= self.min_rows]
        keys = langs.long().clone()
        if not trusted:
            return torch.full_like(keys, ALL_LANGS)
        known = torch.isin(keys, torch.tensor(trusted, device=keys.device))
        return keys.masked_fill(~known, ALL_LANGS)

    def _apply(self, rows: Tensor, key: int) -> Tensor:
        mean, mat = self.transform(key, rows.device)
        centred = rows - mean
        return centred @ mat if mat.dim() == 2 else centred * mat

    def transform(self, key: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(mean [D], W)`` of ``key``'s statistics, fp32 on ``device``: ``z = (h - mean) @ W`` (whiten, ``W [D, D]``)
        or ``(h - mean) * W`` (standardize, ``W [D]``). Cached until the statistics change."""
        if self._cache_version != self.stats.version:
            self._cache, self._cache_version = {}, self.stats.version
        if key not in self._cache:
            _, mean, cov = self.stats.moments(key)
            self._cache[key] = (mean.float(), self.matrix(cov).float())
        mean, mat = self._cache[key]
        if mean.device != torch.device(device):
            mean, mat = mean.to(device), mat.to(device)
            self._cache[key] = (mean, mat)
        return mean, mat

    def matrix(self, moments: Tensor) -> Tensor:
        """``W`` from the second central moments (``[D, D]`` covariance when ``full``, else ``[D]`` variances)."""
        raise NotImplementedError

    def _inv_std(self, var: Tensor) -> Tensor:
        var = var.clamp(min=0.0)
        return (var + self.eps * var.mean().clamp(min=1e-12)).rsqrt()

    # -- training hooks -------------------------------------------------------------------------------------------

    def stage(self, rows: Tensor, langs: Tensor, micro: int) -> None:
        if torch.is_grad_enabled():
            self.stats.stage(rows, langs, micro)

    def end_step(self, group: Any = None) -> int:
        return self.stats.commit(group)

    def state_dict(self) -> dict[str, Any] | None:
        return self.stats.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None:
            raise ValueError(
                f"the checkpoint holds no similarity statistics but this run uses objective.similarity={self.name!r}"
            )
        self.stats.load_state_dict(state)

    def describe(self) -> str:
        lang = "per-language" if self.per_language else "all-language"
        extra = f", shrinkage {self.shrinkage}" if self.full else ""
        return f"{self.name} ({lang} running statistics{extra}, warm-up {self.warmup_steps} steps)"


class StandardizeSpace(RunningSpace):
    """``z_d = (h_d - mu_d) / sqrt(var_d + eps * mean(var))`` (module docstring)."""

    name = "standardize"

    def matrix(self, moments: Tensor) -> Tensor:
        return self._inv_std(moments)


class WhitenSpace(RunningSpace):
    """Shrunk ZCA whitening of the correlation (module docstring)."""

    name = "whiten"
    full = True

    def matrix(self, moments: Tensor) -> Tensor:
        cov = moments
        inv_s = self._inv_std(cov.diagonal())
        corr = cov * inv_s[:, None] * inv_s[None, :]
        shrunk = (1.0 - self.shrinkage) * corr + self.shrinkage * torch.eye(cov.shape[0], dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(shrunk)
        inv_sqrt = (evecs * evals.clamp(min=self.shrinkage * 1e-3).rsqrt()) @ evecs.T
        return inv_s[:, None] * inv_sqrt  # diag(1/s) C^{-1/2}


SPACES: dict[str, type[SimilaritySpace]] = {
    space.name: space for space in (SimilaritySpace, CenterSpace, StandardizeSpace, WhitenSpace)
}
"""The registry of spaces, by ``objective.similarity`` value (the values the config accepts)."""
RUNNING = tuple(name for name, space in SPACES.items() if issubclass(space, RunningSpace))


def build_space(cfg: ObjectiveConfig) -> SimilaritySpace:
    """The space of ``cfg.similarity`` (``cfg.center = 'batch'`` is the legacy spelling of ``center``)."""
    name = "center" if cfg.center == "batch" else cfg.similarity
    if name not in SPACES:
        raise ConfigError(f"objective.similarity={name!r} is not one of {tuple(SPACES)}")
    if cfg.center == "batch" and cfg.similarity not in ("cosine", "center"):
        raise ConfigError(
            f"objective.center='batch' and objective.similarity={cfg.similarity!r} both choose the similarity space: "
            "set only objective.similarity"
        )
    if not 0.0 <= cfg.similarity_shrinkage <= 1.0:
        raise ConfigError(f"objective.similarity_shrinkage must be in [0, 1], got {cfg.similarity_shrinkage}")
    if not 0.0 < cfg.similarity_decay <= 1.0:
        raise ConfigError(f"objective.similarity_decay must be in (0, 1], got {cfg.similarity_decay}")
    if cfg.similarity_warmup_steps < 0:
        raise ConfigError(f"objective.similarity_warmup_steps must be >= 0, got {cfg.similarity_warmup_steps}")
    if name == "whiten" and cfg.similarity_shrinkage == 0.0:
        raise ConfigError(
            "objective.similarity=whiten needs similarity_shrinkage > 0 (an unshrunk ZCA of a few "
            "hundred rows in D dimensions is singular)"
        )
    if name not in RUNNING:
        return SPACES[name](warmup_steps=cfg.similarity_warmup_steps)
    return SPACES[name](
        per_language=cfg.similarity_per_language,
        shrinkage=cfg.similarity_shrinkage,
        decay=cfg.similarity_decay,
        warmup_steps=cfg.similarity_warmup_steps,
    )
