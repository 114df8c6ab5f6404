"""The evaluation of one model as a pipeline of steps, driven by an :class:`~alignx.config.EvalConfig`.

load the model -> pick the held-out pairs (:func:`alignx.eval.data.held_out`) -> encode every distinct text once at
every layer -> per-layer retrieval and cosine gap -> language-identity probe -> perplexity -> translation -> the
result dict, written as ``<label>.json``. :class:`Evaluator` runs the whole line for a model path;
:func:`evaluate` is the same line for a model already in memory.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from alignx.config import EvalConfig, ModelConfig
from alignx.constants import DEFAULT_INSTRUCTION
from alignx.eval.alignment import Pooling, encode_layers, layer_retrieval, resolve_pooling
from alignx.eval.data import PIVOT, EvalError, HeldOut, held_out, parse_layers
from alignx.eval.perplexity import perplexity as ppl_fn
from alignx.eval.probe import probe_accuracy
from alignx.eval.report import summary_lines
from alignx.eval.translation import evaluate_translation
from alignx.model import load_causal_lm, load_tokenizer
from alignx.models import model_name_problem

CENTERING = {"ref": "per-language mean on {ref}", "eval": "per-language mean on the evaluated set", "none": "none"}


# ---------------------------------------------------------------------------------------------------------------
# Steps


def load_model(name_or_path: str, dtype: str = "fp32", cache_dir: str | None = None) -> tuple[Any, Any]:
    """(causal LM, tokenizer) through the trainer's loaders (packaged names, ``tiny-*``, directories, hub ids).

    A directory must hold safetensors weights: an exported or foreign model is never read from pickled ``.bin``
    files (unpickling can run code)."""
    problem = model_name_problem(name_or_path, "--model", weights=True)
    if problem is not None:
        raise EvalError(problem)

    cfg = ModelConfig(name_or_path=name_or_path, dtype=dtype, cache_dir=cache_dir)
    tok = load_tokenizer(cfg)
    lm = load_causal_lm(cfg)
    return lm.eval(), tok


@dataclass
class Encoded:
    """Every distinct text of the held-out pairs, encoded once per language at every layer."""

    index: dict[str, dict[str, int]]  # lang -> text -> row of that language's tensor
    tensors: dict[str, torch.Tensor]  # lang -> [L+1, N_lang, D]

    @property
    def num_layers(self) -> int:
        return next(iter(self.tensors.values())).shape[0] - 1

    def rows(self, lang: str, units: Sequence) -> torch.Tensor:
        """The vectors of ``units``' ``lang`` texts at every layer, ``[L+1, len(units), D]``."""
        return self.tensors[lang][:, [self.index[lang][u.texts[lang]] for u in units]]


def encode(lm: Any, tokenizer: Any, held: HeldOut, pooling: Pooling, *, batch_size: int, progress: bool) -> Encoded:
    """Encode the English and ``lang`` texts of the evaluated and reference pairs, each distinct text once."""
    index: dict[str, dict[str, int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for lang in [PIVOT, *held.langs]:
        texts: dict[str, int] = {}
        for sets in (held.eval_sets, held.ref_sets):
            for key, us in sets.items():
                if lang in (PIVOT, key):
                    for u in us:
                        texts.setdefault(u.texts[lang], len(texts))
        index[lang] = texts
        tensors[lang] = encode_layers(
            lm, tokenizer, list(texts), pooling=pooling, batch_size=batch_size, desc=f"encode {lang}", progress=progress
        )
    return Encoded(index, tensors)


def choose_layers(cfg: EvalConfig, num_layers: int) -> tuple[list[int], int]:
    """(the measured layers, the highlighted one) of a model with ``num_layers`` blocks."""
    chosen = parse_layers(cfg.layers, num_layers)
    k = num_layers // 2 if cfg.align_layer is None else cfg.align_layer
    if not 0 <= k <= num_layers:
        raise EvalError(f"align_layer={k} is outside 0..{num_layers}")
    return chosen, k


def retrieval(enc: Encoded, held: HeldOut, lang: str, layers: list[int], center: str) -> dict[str, Any]:
    """Retrieval both ways and the cosine gap of ``lang`` vs English at ``layers``, after the chosen centring."""
    pairs = held.eval_sets[lang]
    x, y = enc.rows(lang, pairs), enc.rows(PIVOT, pairs)  # [L+1, N, D]
    if center == "ref":
        xm, ym = enc.rows(lang, held.ref_sets[lang]).mean(1), enc.rows(PIVOT, held.ref_sets[lang]).mean(1)
    elif center == "eval":
        xm, ym = x.mean(1), y.mean(1)
    else:
        xm = ym = None
    m = layer_retrieval(
        x[layers], y[layers], x_means=None if xm is None else xm[layers], y_means=None if ym is None else ym[layers]
    )
    return {
        "x2en": m["x2y"],
        "en2x": m["y2x"],
        "parallel_cos": m["parallel_cos"],
        "random_cos": m["random_cos"],
        "gap": m["gap"],
        "n": len(pairs),
        "chance": 1.0 / len(pairs),
    }


def probe(enc: Encoded, held: HeldOut, layers: list[int], max_pairs: int | None) -> dict[str, Any]:
    """Language-identity probe per layer: trained on the reference split, tested on the evaluated one."""
    all_langs = [PIVOT, *held.langs]
    en_ref = held.english(held.ref_split, enc.index[PIVOT])
    en_eval = held.english(held.split, enc.index[PIVOT])
    train_sets = {PIVOT: en_ref[:max_pairs], **held.ref_sets}
    test_sets = {PIVOT: en_eval[:max_pairs], **held.eval_sets}

    def features(sets: dict[str, list], layer: int) -> tuple[torch.Tensor, torch.Tensor]:  # [N, D], [N]
        xs = torch.cat([enc.rows(lang, sets[lang])[layer] for lang in all_langs])
        ys = torch.cat([torch.full((len(sets[lang]),), c) for c, lang in enumerate(all_langs)])
        return xs, ys

    acc = []
    for layer in layers:
        xs_tr, ys_tr = features(train_sets, layer)
        xs_te, ys_te = features(test_sets, layer)
        acc.append(probe_accuracy(xs_tr, ys_tr, xs_te, ys_te))
    return {
        "accuracy": acc,
        "chance": 1.0 / len(all_langs),
        "langs": all_langs,
        "train_split": held.ref_split,
        "n_train": int(len(ys_tr)),
        "n_test": int(len(ys_te)),
    }


def perplexities(lm: Any, tokenizer: Any, held: HeldOut, ppl_pairs: int | None, *, progress: bool) -> dict[str, Any]:
    """Held-out perplexity per language (English on the first language's evaluated pairs)."""
    out: dict[str, Any] = {}
    for lang in [PIVOT, *held.langs]:
        us = (held.eval_sets[lang] if lang != PIVOT else held.eval_sets[held.langs[0]])[:ppl_pairs]
        out[lang] = ppl_fn(lm, tokenizer, [u.texts[lang] for u in us], desc=f"perplexity {lang}", progress=progress)
    return out


def translations(lm: Any, tokenizer: Any, held: HeldOut, cfg: EvalConfig, *, progress: bool) -> dict[str, Any]:
    """Greedy translation scores per direction (``en-sw``, ``sw-en``, ...) on the first ``translate_pairs``."""
    out: dict[str, Any] = {}
    n_tr = cfg.translate_pairs if cfg.translate_pairs is not None else cfg.max_pairs
    for lang in held.langs:
        us = held.eval_sets[lang][:n_tr]
        for d in cfg.directions:
            src, tgt = (PIVOT, lang) if d == "en-x" else (lang, PIVOT)
            out[f"{src}-{tgt}"] = evaluate_translation(
                lm,
                tokenizer,
                [(u.texts[src], u.texts[tgt]) for u in us],
                src,
                tgt,
                instruction=cfg.instruction or DEFAULT_INSTRUCTION,
                batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens,
                progress=progress,
            )
    return out


def result_header(
    held: HeldOut, cfg: EvalConfig, pooling: Pooling, num_layers: int, layers: list[int], align_layer: int
) -> dict[str, Any]:
    """What a result was measured on: split, range, languages, layers, pooling and centring."""
    first = next(iter(held.eval_sets.values()))
    return {
        "split": held.split,
        "reference_split": held.ref_split,
        "source": first[0].source if first else "",
        "eval_range": f"{first[0].ref} .. {first[-1].ref}" if first else "",
        "pivot": PIVOT,
        "langs": list(held.langs),
        "num_layers": num_layers,
        "layers": layers,
        "align_layer": align_layer,
        "pooling": pooling.to_dict(),
        "centering": CENTERING[cfg.center].format(ref=held.ref_split),
    }


@contextlib.contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timing[key] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


def evaluate(
    lm: Any,
    tokenizer: Any,
    units: dict[str, list],
    cfg: EvalConfig,
    *,
    label: str = "model",
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """All metrics of one model on the held-out split; returns the result dict written as ``<label>.json``.

    Args:
        lm, tokenizer: an HF causal LM (eval mode is set here) and its fast tokenizer.
        units: split -> aligned units (:func:`alignx.eval.data.load_eval_units`).
        cfg: which split, pairs, layers and metrics (:class:`~alignx.config.EvalConfig`).
        label, model_name: the result's name (base, stage1, ...) and the model it measured.
    """
    held = held_out(cfg, units)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    lm.eval()
    pooling = resolve_pooling(tokenizer, cfg.exclude_first)
    with _timed(timing, "encode_s"):
        enc = encode(lm, tokenizer, held, pooling, batch_size=cfg.batch_size, progress=progress)
    layers, k = choose_layers(cfg, enc.num_layers)
    scores = {lang: retrieval(enc, held, lang, layers, cfg.center) for lang in held.langs}
    probed, ppl, trans = None, {}, {}
    if held.has_reference:
        with _timed(timing, "probe_s"):
            probed = probe(enc, held, layers, cfg.max_pairs)
    if cfg.perplexity:
        with _timed(timing, "perplexity_s"):
            ppl = perplexities(lm, tokenizer, held, cfg.ppl_pairs, progress=progress)
    if cfg.translate:
        with _timed(timing, "translate_s"):
            trans = translations(lm, tokenizer, held, cfg, progress=progress)
    timing["total_s"] = time.perf_counter() - t_start
    return {
        "label": label,
        "model": model_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result_header(held, cfg, pooling, enc.num_layers, layers, k),
        "retrieval": scores,
        "probe": probed,
        "perplexity": ppl,
        "translation": trans,
        "timing": {key: round(v, 2) for key, v in timing.items()},
    }


def write_result(result: dict[str, Any], out: Path) -> Path:
    """``<out>/<label>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['label']}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@dataclass
class Evaluator:
    """Evaluates models by name or path on one held-out set with one config, each into ``<out>/<label>.json``.

    ``reuse``: a result already in ``out`` is read back instead of measured again. ``timed_load``: the result's
    timing also holds the model's load time (``load_s``).
    """

    units: dict[str, list]
    cfg: EvalConfig
    out: Path
    dtype: str = "fp32"
    cache_dir: str | None = None
    reuse: bool = False
    timed_load: bool = True
    progress: bool = True

    def __call__(self, model: str, label: str, align_layer: int | None = None) -> dict[str, Any]:
        """Load ``model``, evaluate it (highlighting ``align_layer``, default the config's), write and summarise."""
        path = self.out / f"{label}.json"
        if self.reuse and path.is_file():
            return json.loads(path.read_text())
        cfg = self.cfg if align_layer is None else replace(self.cfg, align_layer=align_layer)
        t0 = time.perf_counter()
        lm, tok = load_model(model, self.dtype, self.cache_dir)
        load_s = time.perf_counter() - t0
        result = evaluate(lm, tok, self.units, cfg, label=label, model_name=model, progress=self.progress)
        if self.timed_load:
            result["timing"]["load_s"] = round(load_s, 2)
        write_result(result, self.out)
        print("\n".join(summary_lines(result)), flush=True)
        return result
