"""Similarity spaces of the contrastive term (``objective.similarity``, :mod:`alignx.similarity`).

* Every space (cosine, center, standardize, whiten; running statistics all-language and per language) gives the
  loss and the gradients of an independent fp64 reference — statistics from ``torch.cov`` of the history rows,
  the transform written out — under every negatives mode: local, global (a group of one process), global+queue
  (queued rows transformed with the statistics of the step that uses them).
* Warm-up: the term is reported but weighted 0 until the statistics are committed; then it counts.
* Running statistics: ``state_dict`` round-trips bit for bit; a checkpoint of other settings is refused; 2 gloo
  ranks (deepspeed launcher) end with the same bytes as one process staging the same micro-batches.
* Collapse: uniform similarity lowers the loss of the batch-centred space on mixed-language batches (the failure
  measured on Gemma) but never the loss of a running space whose positives already win.
* Diagnostics and the inert warning: a batch sharing a huge dimension reports cosines near 1 and the norm share of
  the top dimensions, and the monitor warns once naming them; isotropic aligned data stays quiet.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignx.config import Config, ConfigError
from alignx.dist import gather_sizes
from alignx.monitor import InertAlignmentMonitor
from alignx.objective import AlignXObjective
from alignx.similarity import RunningMoments, build_space

D, N = 12, 6
TAU, SCALE = 0.1, 0.5


@pytest.fixture(scope="module")
def one_process():
    from helpers import process_group_scope

    from alignx.engine import init_distributed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with process_group_scope():
        init_distributed(Config())
        yield
    torch.set_num_threads(threads)


def make_objective(similarity: str, per_language: bool = False, negatives: str = "local", **over) -> AlignXObjective:
    cfg = Config().objective
    cfg.kernel_backend = "reference"
    cfg.similarity, cfg.similarity_per_language, cfg.negatives = similarity, per_language, negatives
    cfg.queue_size = 5 if negatives == "global+queue" else 0
    for k, v in over.items():
        setattr(cfg, k, v)
    return AlignXObjective(cfg)


def massive(n: int, seed: int, langs: torch.Tensor | None = None) -> torch.Tensor:
    """Rows with a few huge shared dimensions (as Gemma 3's pooled states) and a per-language offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x[:, :2] += 1e3
    if langs is not None:
        x += langs.double().unsqueeze(1) * torch.linspace(-1, 1, D, dtype=torch.float64)
    return x


HISTORY_LANGS = torch.tensor([0, 1, 2, 0, 1, 2] * 8)


def history() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two committed steps of pooled rows (48 rows each, 3 languages: >= 32 rows per language after two steps)."""
    return [(massive(48, 100 + s, HISTORY_LANGS), HISTORY_LANGS) for s in range(2)]


def feed_history(obj: AlignXObjective) -> None:
    for rows, langs in history():
        obj.space.stage(rows.float(), langs, 0)
        obj.end_step()


def reference_transform(name: str, per_language: bool, rows: torch.Tensor, langs: torch.Tensor, batch: torch.Tensor):
    """fp64 reference of each space, statistics recomputed from the raw history rows."""
    if name == "cosine":
        return rows
    if name == "center":
        return rows - batch.mean(0)
    hist = torch.cat([r for r, _ in history()])
    hist_langs = torch.cat([lang for _, lang in history()])
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        sel = hist_langs == langs[i] if per_language and int((hist_langs == langs[i]).sum()) >= 32 else slice(None)
        h = hist[sel]
        mean = h.mean(0)
        cov = torch.cov(h.T, correction=0)
        var = cov.diagonal()
        std = (var + 1e-3 * var.mean()).sqrt()
        x = (rows[i] - mean) / std
        if name == "standardize":
            out[i] = x
            continue
        corr = cov / torch.outer(std, std)
        c = 0.5 * corr + 0.5 * torch.eye(D, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(c)
        out[i] = x @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
    return out


def reference_loss(name, per_language, h_src, h_tgt, src_lang, tgt_lang, queue=None, queue_langs=None):
    batch = torch.cat([h_src, h_tgt])
    a = reference_transform(name, per_language, h_src, src_lang, batch)
    c = reference_transform(name, per_language, h_tgt, tgt_lang, batch)
    if queue is not None:  # queued rows carry no gradient, also not through the batch mean of ``center``
        c = torch.cat([c, reference_transform(name, per_language, queue, queue_langs, batch).detach()])
    logits = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / TAU
    return SCALE * F.cross_entropy(logits, torch.arange(h_src.shape[0]))


SPACES = [
    ("cosine", False),
    ("center", False),
    ("standardize", False),
    ("standardize", True),
    ("whiten", False),
    ("whiten", True),
]


@pytest.mark.parametrize("negatives", ["local", "global", "global+queue"])
@pytest.mark.parametrize(("name", "per_language"), SPACES, ids=[f"{n}-{'lang' if p else 'all'}" for n, p in SPACES])
def test_space_loss_and_gradients_match_the_fp64_reference(name, per_language, negatives, one_process) -> None:
    obj = make_objective(name, per_language, negatives)
    feed_history(obj)
    src_lang, tgt_lang = torch.tensor([0, 0, 1, 1, 2, 0]), torch.tensor([1, 2, 0, 0, 0, 1])
    base = massive(N, 7, src_lang)
    h_src = base.float().requires_grad_(True)
    h_tgt = (massive(N, 8, tgt_lang) * 0.6 + base * 0.4).float().requires_grad_(True)
    queue = queue_langs = None
    if negatives == "local":
        got = obj.contrastive_loss(h_src, h_tgt, src_lang, tgt_lang)
    else:
        if negatives == "global+queue":
            queue_langs = torch.tensor([2, 1, 0, 2])
            queue = massive(4, 9, queue_langs)
            obj.queue.stage(queue.float(), queue_langs)
            obj.queue.commit()
        langs = torch.stack([src_lang, tgt_lang], 1)
        sizes = gather_sizes([N])
        got = obj._global_contrastive(h_src, h_tgt, h_src, h_tgt, langs, sizes, torch.float32)
    ref_src, ref_tgt = h_src.detach().double().requires_grad_(True), h_tgt.detach().double().requires_grad_(True)
    want = reference_loss(name, per_language, ref_src, ref_tgt, src_lang, tgt_lang, queue, queue_langs)
    (3.0 * got).backward()
    (3.0 * want).backward()
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    for g, w in ((h_src.grad, ref_src.grad), (h_tgt.grad, ref_tgt.grad)):
        scale = float(w.abs().max())
        torch.testing.assert_close(g.double(), w, atol=1e-4 * scale + 1e-9, rtol=1e-3)
    if name in ("standardize", "whiten"):
        assert float(want) < SCALE * math.log(N) * 0.9, "the space should see the pairs through the huge dims"


def test_warm_up_reports_the_term_but_trains_it_only_after_a_commit() -> None:
    from helpers import make_batch

    from alignx.model import AlignXModel
    from alignx.testing import tiny_causal_lm

    cfg = Config()
    cfg.objective.kernel_backend = "reference"
    cfg.objective.similarity = "whiten"
    model = AlignXModel(tiny_causal_lm("llama", vocab_size=256, num_layers=2, hidden=32), cfg)
    batch = make_batch([(2, 3, 2, 4), (2, 4, 2, 5), (3, 3, 2, 4)], [(0, 1), (1, 0), (0, 2)])
    out = model(**batch)
    assert float(out["ctr"]) > 0 and float(model.diagnostics["diag/trained"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["ntp"] + 0.4 * out["lam"]), abs=1e-6)
    model.end_step(1)
    out = model(**batch)
    assert float(model.diagnostics["diag/trained"]) == 1.0
    assert float(out["loss"]) == pytest.approx(float(out["ntp"] + 0.3 * out["ctr"] + 0.4 * out["lam"]), abs=1e-5)


def test_running_moments_round_trip_and_refuse_other_settings() -> None:
    stats = RunningMoments(full=True, per_language=True, decay=0.9)
    for s, (rows, langs) in enumerate(history()):
        stats.stage(rows, langs, s)
        stats.commit()
    state = stats.state_dict()
    again = RunningMoments(full=True, per_language=True, decay=0.9)
    again.load_state_dict(state)
    for key in stats.keys():
        assert again.count[key] == stats.count[key]
        assert torch.equal(again.sum[key], stats.sum[key]) and torch.equal(again.second[key], stats.second[key])
    for other in (dict(full=False, per_language=True, decay=0.9), dict(full=True, per_language=False, decay=0.9)):
        with pytest.raises(ValueError, match="resume with the checkpoint"):
            RunningMoments(**other).load_state_dict(state)
    stats.stage(*history()[0], 0)
    with pytest.raises(RuntimeError, match="commit"):
        stats.state_dict()


def test_decay_weights_recent_steps() -> None:
    stats = RunningMoments(full=False, per_language=False, decay=0.5)
    stats.stage(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 0)
    stats.commit()
    stats.stage(torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 0)
    stats.commit()
    n, mean, _ = stats.moments(-1)
    assert n == 6.0 and torch.allclose(mean, torch.full((2,), 4 / 6, dtype=torch.float64))


def test_bad_similarity_settings_are_config_errors() -> None:
    cfg = Config().objective
    for field, value, match in (
        ("similarity_shrinkage", 1.5, "shrinkage"),
        ("similarity_decay", 0.0, "decay"),
        ("similarity_warmup_steps", -1, "warmup"),
    ):
        bad = Config().objective
        setattr(bad, field, value)
        with pytest.raises(ConfigError, match=match):
            build_space(bad)
    cfg.similarity, cfg.similarity_shrinkage = "whiten", 0.0
    with pytest.raises(ConfigError, match="singular"):
        build_space(cfg)
    cfg = Config().objective
    cfg.similarity, cfg.center = "whiten", "batch"
    with pytest.raises(ConfigError, match="only objective.similarity"):
        build_space(cfg)


def test_uniform_similarity_lowers_the_centred_loss_but_not_a_running_space() -> None:
    """Mixed directions (en->x and x->en) with a strong language offset: after batch centring the same-language
    candidates win, the loss is far above ln N and making every similarity equal (collapse) lowers it. In the
    per-language whitened space the positives win, so the uniform solution (loss exactly ln N) is higher."""
    langs_src, langs_tgt = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1, 1, 1, 0, 0, 0])
    meaning = massive(N, 3)
    offset = torch.zeros(D, dtype=torch.float64)
    offset[5] = 40.0  # language identity: a large direction shared by each language
    h_src = (meaning + langs_src.double().unsqueeze(1) * offset).float()
    noise = torch.randn(N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h_tgt = (meaning + 0.3 * noise + langs_tgt.double().unsqueeze(1) * offset).float()
    chance = SCALE * math.log(N)
    centred = make_objective("center")
    assert float(centred.contrastive_loss(h_src, h_tgt, langs_src, langs_tgt)) > 1.5 * chance
    whitened = make_objective("whiten", per_language=True)
    rows = torch.cat([h_src, h_tgt] * 6).double()
    spread = torch.randn(rows.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    whitened.space.stage(rows + 0.5 * spread, torch.cat([langs_src, langs_tgt] * 6), 0)
    whitened.end_step()
    assert float(whitened.contrastive_loss(h_src, h_tgt, langs_src, langs_tgt)) < 0.8 * chance
    uniform = torch.ones(N, D) * 3.0  # every row identical: every similarity equal, the loss is ln N
    assert float(centred.contrastive_loss(uniform, uniform)) == pytest.approx(chance, abs=1e-4)  # lower: collapse pays
    shared = make_objective("whiten")
    shared.space.stage(rows + 0.5 * spread, torch.cat([langs_src, langs_tgt] * 6), 0)
    shared.end_step()
    assert float(shared.contrastive_loss(h_src, h_tgt)) < 0.8 * chance
    assert float(shared.contrastive_loss(uniform, uniform)) == pytest.approx(chance, abs=1e-4)  # higher: no pay-off


def _monitor_rows(obj: AlignXObjective, h_src: torch.Tensor, h_tgt: torch.Tensor, steps: int) -> list[dict]:
    rows = []
    for _ in range(steps):
        obj.contrastive_loss(h_src, h_tgt)
        rows.append({"train/" + k.removeprefix("diag/"): float(v) for k, v in obj.diagnostics.items()})
    return rows


def test_inert_warning_names_the_huge_dimensions_and_fires_once() -> None:
    obj = make_objective("cosine")
    src = massive(8, 1).float() * torch.tensor([1.0] * 2 + [1e-3] * (D - 2))
    tgt = src + 0.01 * massive(8, 2).float()
    rows = _monitor_rows(obj, src, tgt, 4)
    assert rows[0]["train/raw_cos"] > 0.99 and rows[0]["train/top_dims_share"] > 0.99
    monitor = InertAlignmentMonitor(patience=3, tolerance=0.05, similarity="cosine")
    said = [monitor.update(r, 1) for r in rows]
    assert said[:2] == [None, None] and said[3] is None  # after 3 steps, once
    msg = said[2]
    assert msg is not None and "not learning" in msg and "pooled cosines 1.000" in msg
    assert "8 dimensions hold 100.0% of the squared norm" in msg and "objective.similarity=whiten" in msg


def test_inert_warning_is_quiet_on_isotropic_aligned_data_and_during_warm_up() -> None:
    obj = make_objective("cosine")
    g = torch.Generator().manual_seed(0)
    src = torch.randn(8, 64, generator=g)
    tgt = src + 0.1 * torch.randn(8, 64, generator=g)
    rows = _monitor_rows(obj, src, tgt, 20)
    assert rows[0]["train/top1"] == 1.0 and rows[0]["train/nce_ratio"] < 0.1
    monitor = InertAlignmentMonitor(patience=3, tolerance=0.05, similarity="cosine")
    assert all(monitor.update(r, 1) is None for r in rows)
    warming = InertAlignmentMonitor(patience=1, tolerance=0.05, similarity="whiten")
    assert warming.update({"train/nce_ratio": 1.0, "train/trained": 0.0}, 5) is None


def test_same_language_shortcut_is_named() -> None:
    monitor = InertAlignmentMonitor(patience=1, tolerance=0.05, similarity="center")
    row = {"train/nce_ratio": 1.2, "train/top1": 0.0, "train/chance": 0.125, "train/raw_cos": 0.4,
           "train/same_lang_top": 0.8, "train/pos_sim": 0.1, "train/neg_sim": 0.0}  # fmt: skip
    msg = monitor.update(row, 1)
    assert msg is not None and "anchor's own language for 80% of anchors" in msg and "data.batching=direction" in msg


# ----------------------------------------------------------------------------------------------------------------
# 1 process and 2 gloo ranks build the same statistics


def _stage_rows(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of global micro-batch ``micro`` of ``step`` (unequal sizes, one empty)."""
    n = 0 if (step, micro) == (1, 2) else 3 + micro
    langs = torch.arange(n) % 3
    return massive(n, 1000 * step + micro, langs).float(), langs


STEPS, MICROS = 3, 4  # 4 global micro-batches per step: 2 ranks x 2 accumulation, or 1 process x 4


def _state_of(world: int, rank: int) -> dict:
    space = build_space(_space_cfg())
    for step in range(STEPS):
        for a in range(MICROS // world):
            rows, langs = _stage_rows(step, a * world + rank)
            with torch.enable_grad():
                space.stage(rows, langs, a)
        space.end_step()
    return space.state_dict()


def _space_cfg():
    cfg = Config().objective
    cfg.similarity, cfg.similarity_per_language, cfg.similarity_decay = "whiten", True, 0.9
    return cfg


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist
    from helpers import worker_setup

    from alignx.engine import shutdown_distributed

    args, info = worker_setup(argv, threads=None)
    state = _state_of(info.world_size, info.rank)
    states = [None, None]
    dist.all_gather_object(states, state)
    if info.rank == 0:
        torch.save(states, args.out)
    shutdown_distributed()


@pytest.mark.dist
def test_two_ranks_build_the_statistics_of_one_process(tmp_path: Path) -> None:
    from helpers import run_deepspeed

    out = tmp_path / "states.pt"
    proc = run_deepspeed(Path(__file__), ["--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    states = torch.load(out, weights_only=False)
    want = _state_of(1, 0)
    for state in states:
        assert state["keys"] == want["keys"] and torch.equal(state["count"], want["count"])
        for got, ref in zip(state["sum"] + state["second"], want["sum"] + want["second"]):
            assert torch.equal(got, ref)  # bit for bit: the same rows added in the same order


if __name__ == "__main__":
    _worker(sys.argv[1:])


def test_running_space_packed_equals_padded_and_runs_in_bf16() -> None:
    """A packed micro-batch gives the padded batch's terms and gradients in a running space (same statistics); the
    bf16 model gives a finite term close to fp32's (the map acts on the pooled fp32 vectors)."""
    import copy

    from helpers import VOCAB, make_cfg, make_records

    from alignx.data import Collator, PackedCollator
    from alignx.model import AlignXModel
    from alignx.testing import tiny_causal_lm

    records = make_records(6, seed=8, dropped=(2,))
    over = {"data.packing": True, "objective.similarity": "whiten", "objective.similarity_per_language": True}
    lm = tiny_causal_lm("llama", vocab_size=VOCAB, num_layers=3, hidden=32)
    torch.manual_seed(0)
    packed_model = AlignXModel(lm, make_cfg(**over)).train()
    packed_model(**PackedCollator()(make_records(6, seed=9)))  # one step of statistics
    packed_model.end_step(1)
    assert packed_model.objective.space.trusted
    padded_model = copy.deepcopy(packed_model)
    padded_batch = Collator(pad_token_id=0, padding_side="right")(records)
    got, want = packed_model(**PackedCollator()(records)), padded_model(**padded_batch)
    got["loss"].backward()
    want["loss"].backward()
    for key in ("loss", "ntp", "ctr", "lam"):
        assert float(got[key].detach()) == pytest.approx(float(want[key].detach()), abs=1e-5, rel=0), key
    assert float(got["ctr"]) > 0
    for (name, p), (_, q) in zip(packed_model.named_parameters(), padded_model.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0, msg=name)
    bf16 = copy.deepcopy(padded_model).to(torch.bfloat16)
    with torch.no_grad():
        low = bf16(**padded_batch)
    assert torch.isfinite(low["ctr"]) and abs(float(low["ctr"]) - float(want["ctr"])) < 0.1 * float(want["ctr"]) + 0.05
