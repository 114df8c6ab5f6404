"""Packed micro-batches (``data.packing``): one row per micro-batch, ``position_ids`` restarting per record,
``cu_seqlens``, no attention mask and no padding.

* Attention does not cross records on CPU (sdpa): the logits and both hooked hidden states of a packed row equal
  those of each record run alone, for Llama, Qwen2 and Gemma 3 (with a sliding window shorter than the records).
  Negative control: the same row with an all-ones mask (packing not detected) does attend across records.
* Every loss term and every parameter gradient of a packed batch equals the padded batch's (fp32, 1e-5), for the
  AlignX objective (records dropped by the filter included, symmetric InfoNCE) and for plain NTP (stage 2).
* The positions processed per step drop by exactly the padding fraction (printed); the trainer logs
  ``train/positions_per_step`` and ``train/padding_fraction`` and trains to the same losses packed and padded.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import torch_threads

from alignx.data import Collator, PackedCollator, batch_tokens
from alignx.model import AlignXModel
from alignx.objective import shift_span_ids

TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _gemma3_sliding(vocab: int) -> torch.nn.Module:
    """Tiny Gemma 3 whose sliding window (4) is shorter than the records: the packed sliding mask must use per-record
    positions."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").float()


def _model(arch: str, **over):
    from helpers import VOCAB, make_cfg

    from alignx.testing import tiny_causal_lm

    lm = _gemma3_sliding(VOCAB) if arch == "gemma3" else tiny_causal_lm(arch, vocab_size=VOCAB, num_layers=3, hidden=32)
    torch.manual_seed(0)
    return AlignXModel(lm, make_cfg(**{"data.packing": True, **over})).train()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_row_equals_each_record_alone(arch: str) -> None:
    from helpers import make_records

    model = _model(arch)
    records = make_records(4, seed=5)
    assert min(len(r["input_ids"]) for r in records) > 4  # longer than gemma3's sliding window
    packed = PackedCollator()(records)
    out = model.run_lm(packed["input_ids"], None, packed["position_ids"], packed["cu_seqlens"])
    cu = packed["cu_seqlens"].tolist()
    for b, rec in enumerate(records):
        alone = model.run_lm(torch.tensor([rec["input_ids"]]))
        for name in ("logits", "hidden_align", "hidden_final"):
            got = getattr(out, name)[0, cu[b] : cu[b + 1]]
            torch.testing.assert_close(got, getattr(alone, name)[0], atol=TOL, rtol=0, msg=f"{arch} record {b} {name}")
    # Negative control: with a 2D mask transformers does not look for packing, and records see each other.
    leaky = model.lm(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]))
    alone_last = model.run_lm(torch.tensor([records[-1]["input_ids"]])).logits[0]
    assert (leaky.logits[0, cu[-2] : cu[-1]] - alone_last).abs().max() > 1e-3


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "over",
    [{}, {"objective.symmetric": True}, {"objective.kind": "ntp"}],
    ids=["alignx", "alignx-symmetric", "ntp"],
)
def test_packed_batch_losses_and_gradients_equal_padded(over: dict) -> None:
    from helpers import make_records

    records = make_records(6, seed=8, dropped=(2,))  # one record dropped by the filter
    packed_model = _model("llama", **over)
    padded_model = copy.deepcopy(packed_model)
    padded_batch = Collator(pad_token_id=0, padding_side="right")(records)
    packed_batch = PackedCollator()(records)
    got, want = packed_model(**packed_batch), padded_model(**padded_batch)
    got["loss"].backward()
    want["loss"].backward()
    for key in ("loss", "ntp", "ctr", "lam", "rows_kept", "rows_dropped"):
        assert float(got[key].detach()) == pytest.approx(float(want[key].detach()), abs=TOL, rel=0), key
    if over.get("objective.kind") != "ntp":
        assert int(got["rows_dropped"]) == 1 and float(got["ctr"]) > 0
    g_packed, g_padded = _grads(packed_model), _grads(padded_model)
    assert set(g_packed) == set(g_padded)
    for name, ref in g_padded.items():
        torch.testing.assert_close(g_packed[name], ref, atol=TOL, rtol=0, msg=name)


def test_packed_batch_layout_and_bad_input() -> None:
    from helpers import make_records

    records = make_records(3, seed=1)
    batch = PackedCollator()(records)
    lens = [len(r["input_ids"]) for r in records]
    assert batch["cu_seqlens"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    starts = batch["cu_seqlens"][:-1].long()
    assert (batch["labels"][0, starts] == -100).all()  # no record is predicted from the previous one
    assert "attention_mask" not in batch and batch_tokens(batch) == (sum(lens), sum(lens))
    # The language-matching shift never reads across a record boundary, even when the next record starts in a span.
    spans, cu = torch.tensor([[0, 1, 2, 2, 1, 1, 2]]), torch.tensor([0, 4, 7])
    assert shift_span_ids(spans, cu).tolist() == [[1, 2, 2, 0, 1, 2, 0]]
    assert shift_span_ids(spans).tolist() == [[1, 2, 2, 1, 1, 2, 0]]
    model = _model("llama")
    with pytest.raises(ValueError, match="position_ids"):
        model(batch["input_ids"], None, batch["labels"], cu_seqlens=batch["cu_seqlens"])
    wrong = torch.arange(sum(lens)).unsqueeze(0)  # no restart at the record starts
    with pytest.raises(ValueError, match="record start"):
        model.run_lm(batch["input_ids"], None, wrong, batch["cu_seqlens"])
    with pytest.raises(ValueError, match="no padding"):
        mask = torch.ones_like(batch["input_ids"])
        mask[0, -1] = 0
        model.run_lm(batch["input_ids"], mask, batch["position_ids"], batch["cu_seqlens"])

    def with_attention(impl: str) -> SimpleNamespace:
        return SimpleNamespace(lm=SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl)))

    kwargs = AlignXModel._packed_attention_kwargs
    with pytest.raises(ValueError, match="attention implementation"):  # could attend across records: refused
        kwargs(with_attention("my_paged_kernel"), batch["cu_seqlens"])
    assert kwargs(with_attention("sdpa"), batch["cu_seqlens"]) == {}  # the mask comes from the position ids
    flash = kwargs(with_attention("flash_attention_2"), batch["cu_seqlens"])  # varlen offsets for FlashAttention
    assert (
        flash["cu_seq_lens_q"].dtype == torch.int32 and flash["cu_seq_lens_k"].tolist() == batch["cu_seqlens"].tolist()
    )
    assert flash["max_length_q"] == flash["max_length_k"] == max(lens)


def test_positions_per_step_drop_by_the_padding_fraction(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real tokenised records, one epoch of micro-batches: packed positions = real tokens = padded positions x
    (1 - padding fraction); then the trainer logs it, and trains packed to the padded run's losses."""
    from helpers import TINY, by_step, process_group_scope, shared_data

    from alignx.config import load_config
    from alignx.data import micro_batches, prepare_stage1
    from alignx.model import load_tokenizer
    from alignx.trainer import Trainer

    base = tmp_path_factory.getbasetemp()
    pairs, _ = shared_data(base)
    common = [f"--data.train_file={pairs}", f"--data.cache_dir={base / 'data_cache'}", "--data.padding_side=right"]
    cfg = load_config(TINY, common)
    tok = load_tokenizer(cfg.model)
    train = prepare_stage1(cfg, tok, train_file=pairs, verbose=False).train
    padded, packed = Collator(tok, padding_side="right"), PackedCollator()
    for grouped in (False, True):
        idx = micro_batches(train["length"], 4, world_size=1, rank=0, seed=0, epoch=0, group_by_length=grouped)
        tot = {"padded": [0, 0], "packed": [0, 0]}
        for rows in idx:
            recs = [train[i] for i in rows]
            for name, collate in (("padded", padded), ("packed", packed)):
                tokens, positions = batch_tokens(collate(recs))
                tot[name][0] += tokens
                tot[name][1] += positions
        pad_fraction = 1 - tot["padded"][0] / tot["padded"][1]
        print(
            f"\n[packing] group_by_length={grouped}: {len(idx)} micro-batches of 4, real tokens {tot['packed'][0]}; "
            f"positions processed padded {tot['padded'][1]} (padding fraction {pad_fraction:.1%}) -> packed "
            f"{tot['packed'][1]} ({1 - tot['packed'][1] / tot['padded'][1]:.1%} fewer)"
        )
        assert (
            tot["packed"][0] == tot["padded"][0] == tot["packed"][1] == sum(train[i]["length"] for r in idx for i in r)
        )
        assert tot["packed"][1] == pytest.approx(tot["padded"][1] * (1 - pad_fraction), abs=1e-6)
        assert pad_fraction > (0.05 if grouped else 0.15)  # the test data has real length spread

    runs = {}
    for layout in ("padded", "packed"):
        out = tmp_path_factory.mktemp(f"layout_{layout}")
        over = [*common, f"--train.output_dir={out}", "--train.max_steps=2", "--train.eval_every=0"]
        over += ["--train.tensorboard=false", f"--data.packing={layout == 'packed'}"]
        with process_group_scope():
            Trainer(load_config(TINY, over), stage=1).run()
        runs[layout] = by_step(out / "stage1" / "metrics.jsonl")
    for step in (1, 2):
        a, b = runs["padded"][step], runs["packed"][step]
        for key in ("train/loss", "train/ntp", "train/ctr", "train/lam"):
            assert b[key] == pytest.approx(a[key], abs=TOL, rel=TOL), (step, key)
        assert b["train/padding_fraction"] == 0.0 and a["train/padding_fraction"] > 0.0
        assert b["train/positions_per_step"] == pytest.approx(
            a["train/positions_per_step"] * (1 - a["train/padding_fraction"]), rel=1e-9
        )
        print(
            f"[packing] trainer step {step}: positions/step padded {a['train/positions_per_step']:.0f} "
            f"(padding {a['train/padding_fraction']:.1%}) -> packed {b['train/positions_per_step']:.0f}"
        )
