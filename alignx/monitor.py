"""Say when the alignment term is not learning: one warning that names the measured cause and the fixes.

The contrastive term can be inert while every other number looks healthy (next-token loss falling, language
matching falling): on Gemma 3 the reference InfoNCE sits at ``ln N`` for a whole run because every pooled cosine is
about 0.99 (docs/alignment.md). :class:`InertAlignmentMonitor` reads the diagnostics the objective already logs
(:func:`alignx.objective.contrastive_diagnostics`, no extra forward) and, when the in-batch InfoNCE stays within
``tolerance`` of chance (or above it) for ``patience`` trained steps, returns one message; it never fires twice.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["InertAlignmentMonitor", "inert_cause"]


def _mean(rows: list[Mapping[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def inert_cause(stats: Mapping[str, float], similarity: str) -> tuple[str, list[str]]:
    """``(cause, fixes)`` in words from window means of the diagnostics (keys without the ``train/`` prefix)."""
    raw, raw_std = stats.get("raw_cos", 0.0), stats.get("raw_cos_std", 0.0)
    share, same = stats.get("top_dims_share", 0.0), stats.get("same_lang_top")
    pos, neg = stats.get("pos_sim", 0.0), stats.get("neg_sim", 0.0)
    pos_std, neg_std = stats.get("pos_sim_std", 0.0), stats.get("neg_sim_std", 0.0)
    if similarity == "cosine" and raw >= 0.9:
        return (
            f"pooled cosines {raw:.3f} ± {raw_std:.3f}: 8 dimensions hold {share:.1%} of the squared norm, so every "
            "candidate looks the same to the cosine",
            ["objective.similarity=whiten (or standardize)", "data.batching=direction", "model.align_layer=auto"],
        )
    if same is not None and same >= 0.5:
        return (
            f"the nearest candidate is in the anchor's own language for {same:.0%} of anchors: language identity "
            "dominates the space",
            ["data.batching=direction", "objective.similarity_per_language=true", "objective.similarity=whiten"],
        )
    if abs(pos - neg) < max(pos_std, neg_std, 0.01):
        return (
            f"positives and negatives are equally similar (positives {pos:.3f} ± {pos_std:.3f}, negatives "
            f"{neg:.3f} ± {neg_std:.3f}): the space has collapsed to uniform similarity",
            ["objective.similarity=whiten (running statistics cannot collapse)", "data.batching=direction"],
        )
    return (
        f"positives {pos:.3f} ± {pos_std:.3f} vs negatives {neg:.3f} ± {neg_std:.3f} (raw cosines {raw:.3f})",
        ["model.align_layer=auto", "more steps or a higher optim.lr", "objective.similarity=whiten"],
    )


class InertAlignmentMonitor:
    """Feed it every logged row (``update``); it returns the warning once, else None.

    ``patience``: trained steps in a row near chance before warning (0 disables); ``tolerance``: "near chance" =
    in-batch InfoNCE ``>= (1 - tolerance) ln N``. Steps of the similarity space's warm-up do not count.
    """

    def __init__(self, patience: int, tolerance: float, similarity: str, prefix: str = "train/") -> None:
        self.patience = patience
        self.tolerance = tolerance
        self.similarity = similarity
        self.prefix = prefix
        self.inert_steps = 0
        self.streak: list[dict[str, float]] = []
        self.message: str | None = None

    def update(self, row: Mapping[str, float], steps: int) -> str | None:
        p = self.prefix
        ratio = row.get(p + "nce_ratio")
        if self.patience <= 0 or self.message is not None or ratio is None or row.get(p + "trained", 1.0) < 1.0:
            return None
        if ratio < 1.0 - self.tolerance:
            self.inert_steps, self.streak = 0, []
            return None
        self.inert_steps += steps
        self.streak.append({k.removeprefix(p): v for k, v in row.items() if k.startswith(p)})
        if self.inert_steps < self.patience:
            return None
        stats = {k: _mean(self.streak, k) for k in self.streak[-1]}
        stats = {k: v for k, v in stats.items() if v is not None}
        cause, fixes = inert_cause(stats, self.similarity)
        self.message = (
            f"[alignx] warning: the contrastive term is not learning: in-batch InfoNCE {stats['nce_ratio']:.2f} x "
            f"chance (ln N) and top-1 {stats.get('top1', 0.0):.3f} vs chance {stats.get('chance', 0.0):.3f} over the "
            f"last {self.inert_steps} steps (objective.similarity={self.similarity}). Cause: {cause}. "
            f"Try: {'; '.join(fixes)}."
        )
        return self.message
