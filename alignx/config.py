"""Typed run configuration: dataclasses with a doc per field, strict YAML loading and dotted overrides.

A run is described by one YAML file with the sections below plus ``--section.key=value`` overrides on the command
line. An unknown or misspelt key is an error that names it and suggests the closest valid key. Derived values (the
gradient-accumulation steps, the align layer of a given depth) are computed, never stored twice. The resolved
config is written to every run directory (:func:`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from alignx.constants import DEFAULT_INSTRUCTION
from alignx.errors import ConfigError
from alignx.recipes import KINDS
from alignx.similarity import SPACES

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RANGES",
    "Stage2Config",
    "TrainConfig",
    "describe",
    "load_config",
    "parse_overrides",
    "save_config",
]


ObjectiveKind = Literal[KINDS]  # type: ignore[valid-type]
"""``objective.kind``: one of the kinds of the recipe registry (:data:`alignx.recipes.KINDS`)."""
SimilarityName = Literal[tuple(SPACES)]  # type: ignore[valid-type]
"""``objective.similarity``: one of the spaces of the registry (:data:`alignx.similarity.SPACES`)."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation (shown by ``alignx config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    name_or_path: str = doc(
        "tiny-llama",
        "Local HF directory, hub id, or a packaged model name (gemma3-270m, "
        "smollm2-135m, tiny-llama, tiny-qwen2, tiny-gemma3).",
    )
    tokenizer: str | None = doc(None, "Tokenizer directory when it differs from the model's.")
    align_layer: int | str | None = doc(
        None,
        "Decoder block whose output feeds the contrastive loss (1-based, as HF hidden_states[k]); null = "
        "num_layers // 2 (reference); 'auto' = before training, measure the base model's source->target retrieval "
        "at every middle layer (num_layers/4 .. 3 num_layers/4) on align_probe_records held-out records and align "
        "the best one (logged, stored in the run's config.yaml and checkpoints).",
    )
    align_probe_records: int = doc(96, "Held-out records (train records if none) measured by align_layer=auto.")
    attn_implementation: str = doc("auto", "auto = flash_attention_2 when flash-attn is importable, else sdpa.")
    gradient_checkpointing: bool = doc(False, "Recompute decoder blocks in backward to save activation memory.")
    trim_logits: bool = doc(
        True,
        "Compute the LM head only from the first position whose next token is counted (HF logits_to_keep): the "
        "same loss and gradients without the prompt's and padding's logits. false = logits at every position.",
    )
    fused_ce: bool = doc(
        True,
        "NTP loss through the fused linear cross-entropy (alignx.kernels.linear_cross_entropy): HF's LM head is "
        "skipped and no logits are ever held; the same loss and gradients (fp32 within 1e-5). Used for the model "
        "types whose head is a plain linear layer (+ soft-cap / logit scaling): llama, mistral, qwen2, qwen3, gemma, "
        "gemma2, gemma3, cohere, granite, phi3, olmo2, smollm3; other models fall back to HF's logits with one log "
        "line. false = always HF's logits (then trim_logits applies).",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Dtype the weights are loaded in before DeepSpeed.")
    cache_dir: str | None = doc(None, "Where dequantised packaged models are cached (default ~/.cache/alignx).")

    def resolved_align_layer(self, num_layers: int) -> int:
        """The 1-based aligned block; ``auto`` resolves to the reference middle until the trainer measures it."""
        layer = num_layers // 2 if self.align_layer in (None, "auto") else self.align_layer
        if isinstance(layer, str):
            raise ConfigError(f"model.align_layer must be an integer, null or 'auto', got {layer!r}")
        if not 1 <= layer <= num_layers:
            raise ConfigError(f"model.align_layer={layer} is outside 1..{num_layers} for this model")
        return layer


@dataclass
class DataConfig:
    train_file: str | None = doc(None, "Stage-1 JSONL of {src_text, tgt_text, src_lang, tgt_lang} records.")
    eval_file: str | None = doc(None, "Held-out JSONL; if null, eval_size records are split off train_file.")
    eval_size: int = doc(2000, "Records held out from train_file when eval_file is null (reference: 2000).")
    cutoff_len: int = doc(512, "Maximum sequence length in tokens (reference: 512).")
    template: str = doc("alpaca", "Prompt template: 'alpaca' (reference) or a path to a JSON template.")
    instruction: str = doc(
        DEFAULT_INSTRUCTION,
        "Stage-1 instruction; {src} and {tgt} are replaced by language names.",
    )
    padding_side: Literal["left", "right"] = doc("left", "Padding side of collated batches (reference: left).")
    group_by_length: bool = doc(True, "Length-grouped batches, as the reference (also decides the negatives).")
    batching: Literal["mixed", "direction"] = doc(
        "mixed",
        "'mixed' = micro-batches draw records of every language direction (reference); 'direction' = every "
        "micro-batch holds one (src_lang, tgt_lang) direction, so all contrastive candidates share the anchor's "
        "target language and language identity cannot be the shortcut (the order then also depends on the micro "
        "batch size; deterministic and resumable as the mixed order).",
    )
    min_target_tokens: int = doc(3, "Records with fewer target tokens after truncation are dropped (reference: 3).")
    labels: Literal["all", "response"] = doc("all", "NTP over the whole sequence (reference) or the response only.")
    packing: bool = doc(
        False,
        "Concatenate each micro-batch's records into one row (position_ids restart per record, cu_seqlens): no "
        "compute on padding; FlashAttention varlen on GPU, a block-diagonal causal mask with sdpa/eager. Same losses "
        "as padded; the micro-batches (and so the negatives) are unchanged.",
    )
    on_bad_lines: Literal["error", "skip"] = doc(
        "error",
        "Lines of an input file that hold no record (not UTF-8, malformed JSON, not an object): 'error' = one "
        "validation pass lists every one of every file, then the run stops before training; 'skip' = they are "
        "dropped and counted (data/dropped/<reason> in the metrics, dropped_records in the summary).",
    )
    num_proc: int = doc(1, "Processes for tokenisation with datasets.map.")
    cache_dir: str | None = doc(None, "datasets cache directory (default: next to the run).")


@dataclass
class ObjectiveConfig:
    kind: ObjectiveKind = doc(
        "alignx", "alignx = NTP + contrastive + language matching; ntp = language modelling only."
    )
    temperature: float = doc(0.1, "InfoNCE temperature tau (reference: 0.1).")
    lambda_ctr: float = doc(0.3, "Weight of the contrastive loss (reference: 0.3).")
    lambda_lam: float = doc(0.4, "Weight of the language-matching loss (reference: 0.4).")
    ctr_scale: float = doc(0.5, "Factor inside the contrastive loss; the official code multiplies by 1/2.")
    symmetric: bool = doc(
        False,
        "Average the source->target InfoNCE with the target->source one (not in the reference); with a queue, a "
        "second queue of detached sources doubles the queue memory.",
    )
    center: Literal["none", "batch"] = doc(
        "none",
        "Legacy spelling of similarity=center: subtract the mean of the micro-batch's pooled states (with "
        "negatives='global' the gathered ones) before the contrastive cosine. 'none' = reference.",
    )
    similarity: SimilarityName = doc(
        "cosine",
        "Space of the contrastive cosine (alignx/similarity.py, docs/alignment.md): cosine = raw pooled states "
        "(reference); center = minus the step's batch mean (= center: batch); standardize = per-dimension running "
        "mean/std; whiten = shrunk ZCA whitening with running statistics. Running statistics are detached, "
        "accumulated over steps and ranks, checkpointed.",
    )
    similarity_per_language: bool = doc(
        False, "Running statistics per language (each language's own mean and scale removed before the cosine)."
    )
    similarity_shrinkage: float = doc(
        0.5, "whiten: correlation shrunk toward the identity, C = (1 - a) R + a I (no direction amplified > 1/sqrt(a))."
    )
    similarity_decay: float = doc(1.0, "Per-step decay of the running statistics (1 = running mean over all rows).")
    similarity_warmup_steps: int = doc(
        1, "Optimizer steps of statistics before the contrastive term is trained in a running space (logged, weight 0)."
    )
    inert_warn_steps: int = doc(
        10, "Warn once when the contrastive term stays near chance for this many steps (0 disables)."
    )
    inert_tolerance: float = doc(
        0.05, "'Near chance': in-batch InfoNCE >= (1 - tolerance) x ln(candidates), averaged over the logged steps."
    )
    lam_hidden: int = doc(128, "Width of the language-matching SwiGLU head (2d -> h -> 2).")
    lam_init_std: float = doc(0.02, "Std of the N(0, std) init of the head (reference: 0.02).")
    include_self_pairs: bool = doc(True, "Language matching over all ordered pairs including i = j (reference).")
    negatives: Literal["local", "global", "global+queue"] = doc(
        "local",
        "Contrastive candidates (docs/negatives.md): 'local' = the micro-batch's targets (reference, m per anchor); "
        "'global' = the targets of all ranks' micro-batches of the micro-step, gathered with gradients (W*m; the "
        "objective becomes that of one process holding all W*m records; costs one all-gather of [W*m, 4D] fp32); "
        "'global+queue' = global plus a FIFO of detached targets of earlier steps (W*m + queue_size; costs "
        "queue_size x D in the training dtype).",
    )
    queue_size: int = doc(
        0,
        "Capacity C (rows) of the FIFO negatives queue, only with negatives=global+queue (up to ~1e6). Memory: "
        "C x D x bytes(training dtype), x2 when symmetric, plus C x D of candidate gradient in the backward.",
    )
    kernel_backend: Literal["auto", "triton", "torch", "reference"] = doc("auto", "Implementation of the ops.")


@dataclass
class OptimConfig:
    lr: float = doc(2e-6, "Peak learning rate (reference: 2e-6).")
    betas: list = doc([0.9, 0.999], "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    warmup_steps: int = doc(100, "Linear warm-up steps, then linear decay to 0 (reference: 100).")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm; 0 disables (reference: 1.0).")


@dataclass
class EngineConfig:
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "Training precision.")
    offload_optimizer: bool = doc(False, "ZeRO optimizer-state offload to CPU (CPUAdam).")
    offload_param: bool = doc(False, "ZeRO-3 parameter offload to CPU.")
    backend: str | None = doc(None, "torch.distributed backend; null = nccl on GPU, gloo on CPU.")
    zero3_param_persistence_threshold: int = doc(
        100000,
        "ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's "
        "stage3_param_persistence_threshold); 0 partitions every parameter.",
    )
    dist_timeout_minutes: int = doc(30, "Timeout of collective operations before a hung rank aborts the run.")
    deepspeed: dict = doc(
        {},
        "Extra DeepSpeed config merged into the generated one, e.g. {zero_optimization: {overlap_comm: true}}; "
        "what alignx derives (batch sizes, optimizer, precision, ZeRO stage, clipping) cannot be set here.",
    )


@dataclass
class TrainConfig:
    output_dir: str = doc("runs/alignx", "Run directory; stage 1 and stage 2 write stage1/ and stage2/ in it.")
    epochs: float = doc(2.0, "Passes over the training records (reference: 2).")
    max_steps: int = doc(-1, "Optimizer steps; -1 = from epochs.")
    global_batch_size: int = doc(128, "Records per optimizer step over all ranks (reference: 128).")
    micro_batch_size: int = doc(16, "Records per forward on one rank (reference: 16; also the negatives).")
    eval_every: int = doc(200, "Evaluation loss on held-out records every N steps; 0 disables.")
    save_every: int = doc(200, "Checkpoint every N steps (and on SIGTERM); 0 = only at the end.")
    keep_checkpoints: int = doc(3, "Checkpoints kept on disk.")
    log_every: int = doc(10, "Metrics logging interval in steps.")
    seed: int = doc(42, "Seed of data order, splits and initialisation.")
    resume: str = doc("none", "'auto' = latest checkpoint in the run directory, 'none', or a checkpoint path.")
    trust_checkpoint: bool = doc(
        False,
        "Resume a checkpoint that this user's key did not sign (copied from elsewhere, written by an older alignx). "
        "Resuming unpickles it, which can run code: only for checkpoints you trust (alignx/trust.py).",
    )
    tensorboard: bool = doc(True, "Write TensorBoard events next to the JSONL metrics.")

    def grad_accum_steps(self, world_size: int) -> int:
        """Derived, never stored: global batch = micro batch x world size x accumulation steps."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{self.micro_batch_size} x world size {world_size}"
            )
        return self.global_batch_size // per_step


@dataclass
class Stage2Config:
    train_file: str | None = doc(None, "Stage-2 JSONL of {instruction, input, output, lang} records.")
    eval_file: str | None = doc(None, "Stage-2 held-out JSONL; if null, data.eval_size records are split off.")
    epochs: float = doc(2.0, "Stage-2 passes over its records (reference: 2).")
    max_steps: int = doc(-1, "Stage-2 optimizer steps; -1 = from epochs.")
    lr: float | None = doc(None, "Stage-2 learning rate; null = optim.lr (reference: same 2e-6).")
    labels: Literal["all", "response"] = doc("all", "Stage-2 NTP over the whole sequence (reference) or response.")
    init_from: str | None = doc(
        None, "HF model directory stage 2 starts from; null = stage 1's verified export (<output_dir>/stage1/export)."
    )


@dataclass
class EvalConfig:
    """The held-out evaluation of one model (:func:`alignx.eval.pipeline.evaluate`): its pairs, layers and metrics.

    ``alignx eval`` fills it from its flags, the demo and ``alignx compare`` from theirs; :func:`load_config` reads it
    from a run's YAML like every other section.
    """

    langs: list = doc([], "Languages evaluated against English; empty = those of the evaluated split.")
    split: Literal["train", "dev", "test"] = doc(
        "test", "The evaluated split; the reference split (centring means, probe training) is dev, or train for dev."
    )
    max_pairs: int = doc(200, "Held-out parallel pairs per language for retrieval and translation.")
    layers: str = doc("all", "'all' or comma-separated layers (0 = embeddings, num_layers = the last block).")
    align_layer: int | None = doc(None, "The layer the report's tables highlight; null = num_layers // 2.")
    center: Literal["ref", "eval", "none"] = doc(
        "ref", "Per-language mean-centring before cosine: on the reference split, the evaluated set, or none."
    )
    exclude_first: Literal["auto", "yes", "no"] = doc(
        "auto", "Leave the first token out of the sentence means (auto: when the tokenizer adds no BOS)."
    )
    batch_size: int = doc(16, "Sentences per forward.")
    perplexity: bool = doc(True, "Include held-out perplexity.")
    ppl_pairs: int | None = doc(None, "Sentences per language scored for perplexity; null = max_pairs.")
    translate: bool = doc(True, "Include greedy translation (chrF++, BLEU).")
    translate_pairs: int | None = doc(None, "Pairs translated per direction; null = max_pairs.")
    directions: list = doc(["en-x", "x-en"], "Translation directions: en-x and/or x-en.")
    max_new_tokens: int = doc(256, "Upper bound on the tokens generated per translation.")
    instruction: str | None = doc(None, "Translation instruction; null = the training's default instruction.")
    schedule: list = doc(
        ["base", "stage1", "stage2"], "Which models a demo or comparison run evaluates: base, stage1, stage2."
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _all_keys(cls: type = Config) -> list[str]:
    keys = []
    for sec in dataclasses.fields(cls):
        for f in dataclasses.fields(_field_type(cls, sec.name)):
            keys.append(f"{sec.name}.{f.name}")
    return keys


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check and convert ``value`` to the annotated type ``tp``; errors name the key."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        # NaN passes every comparison of a range check; infinities are never a meaningful setting.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string: accept what float() accepts
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    valid = _all_keys()
    if key not in valid:
        raise _unknown(key, valid)
    section, name = key.split(".", 1)
    sec = getattr(cfg, section)
    setattr(sec, name, _coerce(key, value, _field_type(type(sec), name)))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--objective.temperature=0.05", "--train.max_steps", "10"]`` -> ``{"objective.temperature": 0.05, ...}``.

    Values are parsed as YAML scalars (numbers, booleans, null, lists like ``[en, sw]``).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"expected an override like --section.key=value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 1
        out[key] = yaml.safe_load(raw) if raw != "" else ""
        i += 1
    return out


def _flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    sections = [f.name for f in dataclasses.fields(Config)]
    for section, body in tree.items():
        if section not in sections:
            raise _unknown(str(section), sections)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping, got {body!r}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, checked key by key. Raises :class:`ConfigError` naming the bad key."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in _flatten(tree, str(path)).items():
            _apply(cfg, key, value)
    if overrides:
        items = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        for key, value in items.items():
            _apply(cfg, key, value)
    _validate(cfg)
    return cfg


# The allowed values of every numeric key, checked at load time (tests/test_config.py fails on a numeric key missing
# here). Notation: "> 0", ">= 1", "[0, 1)" / "(0, 1]" intervals, a bare number, alternatives joined by " or ";
# null passes.
RANGES: dict[str, str] = {
    "model.align_layer": ">= 1",
    "model.align_probe_records": ">= 4",
    "data.eval_size": ">= 0",
    "data.cutoff_len": ">= 8",
    "data.min_target_tokens": ">= 1",  # 0 would let an empty target span reach the pooling (0 / 0)
    "data.num_proc": ">= 1",
    "objective.temperature": "> 0",
    "objective.lambda_ctr": ">= 0",
    "objective.lambda_lam": ">= 0",
    "objective.ctr_scale": ">= 0",
    "objective.similarity_shrinkage": "(0, 1]",  # a = 0 would amplify a direction by 1 / sqrt(0)
    "objective.similarity_decay": "(0, 1]",
    "objective.similarity_warmup_steps": ">= 0",
    "objective.inert_warn_steps": ">= 0",
    "objective.inert_tolerance": "[0, 1]",
    "objective.lam_hidden": ">= 1",
    "objective.lam_init_std": "> 0",  # an all-zero SwiGLU head gets zero gradients and never learns
    "objective.queue_size": ">= 0",
    "optim.lr": ">= 0",  # 0 keeps the weights put: the multi-rank tests compare every step with one model
    "optim.eps": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.warmup_steps": ">= 0",
    "optim.max_grad_norm": ">= 0",
    "engine.zero_stage": "[0, 3]",
    "engine.zero3_param_persistence_threshold": ">= 0",
    "engine.dist_timeout_minutes": ">= 1",
    "train.epochs": "> 0",
    "train.max_steps": "-1 or >= 1",
    "train.global_batch_size": ">= 1",
    "train.micro_batch_size": ">= 1",
    "train.eval_every": ">= 0",
    "train.save_every": ">= 0",
    "train.keep_checkpoints": ">= 0",
    "train.log_every": ">= 1",
    "train.seed": ">= 0",
    "stage2.epochs": "> 0",
    "stage2.max_steps": "-1 or >= 1",
    "stage2.lr": "> 0",
    "eval.max_pairs": ">= 1",
    "eval.align_layer": ">= 0",
    "eval.batch_size": ">= 1",
    "eval.ppl_pairs": ">= 1",
    "eval.translate_pairs": ">= 0",
    "eval.max_new_tokens": ">= 1",
}


def _satisfies(value: float, spec: str) -> bool:
    """``value`` against one :data:`RANGES` entry."""
    for part in spec.split(" or "):
        if part[0] in "[(":
            lo, hi = (float(x) for x in part[1:-1].split(","))
            above = lo <= value if part[0] == "[" else lo < value
            below = value <= hi if part[-1] == "]" else value < hi
            if above and below:
                return True
            continue
        op, bound = part.split() if " " in part else ("==", part)
        if {">": value > float(bound), ">=": value >= float(bound), "==": value == float(bound)}[op]:
            return True
    return False


def _check_ranges(cfg: Config) -> None:
    for key, spec in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _satisfies(value, spec):
            raise ConfigError(f"{key} must be {'in ' if spec[0] in '[(' else ''}{spec}, got {value!r}")


def _validate(cfg: Config) -> None:
    if isinstance(cfg.model.align_layer, str) and cfg.model.align_layer != "auto":
        raise ConfigError(f"model.align_layer must be an integer, null or 'auto', got {cfg.model.align_layer!r}")
    _check_ranges(cfg)
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    if cfg.engine.offload_param and cfg.engine.zero_stage != 3:
        raise ConfigError("engine.offload_param needs engine.zero_stage=3")
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        # Checked again with the world size when the ranks are known (TrainConfig.grad_accum_steps).
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{cfg.train.micro_batch_size}"
        )
    if cfg.objective.negatives == "global+queue" and cfg.objective.queue_size <= 0:
        raise ConfigError("objective.negatives=global+queue needs objective.queue_size > 0")
    if cfg.objective.negatives != "global+queue" and cfg.objective.queue_size != 0:
        raise ConfigError(
            f"objective.queue_size={cfg.objective.queue_size} only applies to objective.negatives=global+queue "
            f"(this config has negatives={cfg.objective.negatives!r}); set queue_size to 0 or use global+queue"
        )


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cfg: Config | None = None) -> str:
    """Every key with its default (or its value in ``cfg``) and documentation, one per line."""
    lines = []
    cfg = cfg if cfg is not None else Config()
    for sec in dataclasses.fields(Config):
        section = getattr(cfg, sec.name)
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(section):
            lines.append(f"  {f.name}: {getattr(section, f.name)!r}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
