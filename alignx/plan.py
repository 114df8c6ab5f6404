"""Memory plan before launch: ``alignx plan --config FILE [--gpus N] [--nodes M]``.

The model is built on the meta device from its config (no weights are read), so its parameters are counted exactly;
the architecture comes from a local directory's ``config.json``, the hub cache, the packaged tiny models, or
:data:`KNOWN_ARCHITECTURES` (published ``config.json`` values of the models the configs name, for machines that
cannot reach the hub). The plan then gives, per GPU:

* **model states** per ZeRO stage, precision and offload setting (bytes per parameter, ``P`` parameters of the
  model plus the language-matching head, ``N`` GPUs in all, ``L`` parameters of the largest single module):

  ============  =====================  ================  ==============================  =====================
  stage         16-bit params          16-bit grads      fp32 master + Adam m, v         fp32 grads of the step
  ============  =====================  ================  ==============================  =====================
  0             2 P                    2 P               12 P                            4 P
  1             2 P                    2 P               12 P / N                        4 P / N
  2             2 P                    2 P / N           12 P / N                        4 P / N
  3             2 P / N (+ 2 L live)   2 P / N (+ 2 L)   12 P / N                        4 P / N (step only)
  ============  =====================  ================  ==============================  =====================

  (mixed precision, as DeepSpeed 0.19.8 allocates them: ``stage_1_and_2.py`` and ``stage3.py`` keep the 16-bit
  gradient partition and cast a flat fp32 copy of it for the optimizer step). At stage 3 the gathered module (4 L)
  is live during forward/backward and the fp32 step gradients only during the step: the model-state peak is the
  larger of the two phases. fp32 training: 4 bytes where the table says 2, no separate step cast at stage 0.
  Optimizer offload moves the fp32 columns (and the gradients) to CPU memory; parameter offload (stage 3) leaves
  the live module only. DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``) are printed next
  to the mixed-precision rows.

* **activations** of one micro-batch of ``b`` rows at ``data.cutoff_len`` tokens (the worst case: every row full),
  from the tensors autograd saves in a Hugging Face decoder layer (Llama/Qwen2/Mistral or Gemma layout), plus the
  attention mask SDPA materialises per layer when rows are padded, the LM head (fused: the fp32 head gradients
  formed in the forward and one chunk of logits; HF's head: the logits, their gradient and the fp32 cross-entropy
  chunk), and the contrastive and language-matching buffers of the objective (bounded chunks). With
  gradient checkpointing only each layer's input is kept, plus one layer recomputed in backward.

* **the largest micro-batch** that fits a given GPU memory, for the configured settings and for the settings that
  change it (activation checkpointing, optimizer offload, parameter offload).

Checked in ``tests/test_plan.py``: model states against DeepSpeed's estimators, and the activation estimate of the
tiny CPU config against the peak of a measured step (``benchmarks.bench_step.step_memory_job``: a fresh process,
the resident-set peak of one forward + backward beyond the model, its gradients and the batch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignx.config import Config, ConfigError, load_config
from alignx.kernels.info_nce import DEFAULT_CHUNK_BYTES
from alignx.kernels.lang_match import _TORCH_CHUNK_BYTES
from alignx.kernels.linear_ce import DEFAULT_CHUNK_BYTES as LCE_TORCH_CHUNK_BYTES
from alignx.kernels.linear_ce import TRITON_CHUNK_BYTES as LCE_TRITON_CHUNK_BYTES
from alignx.model import FUSED_HEAD_TYPES
from alignx.models import PACKAGED, packaged_model_dir
from alignx.objective import CE_CHUNK_ELEMENTS
from alignx.testing import TINY_MODELS, _tiny_config, test_tokenizer

__all__ = [
    "KNOWN_ARCHITECTURES",
    "Architecture",
    "activation_terms",
    "architecture_of",
    "deepspeed_estimate",
    "largest_micro_batch",
    "main",
    "model_states",
    "plan",
]

GIB = 1 << 30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# What DeepSpeed 0.19.8 uses when the config does not say (runtime/zero/config.py).
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e7), "sub_group_size": int(1e9)}

# Published config.json values of models that configs name but this machine may not be able to download. Exact
# parameter counts follow from building them on the meta device (Llama-3-8B: 8,030,261,248).
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "gemma3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The architecture


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a causal LM: its shapes, exact parameter counts, and where the config came from."""

    name: str
    source: str
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    params: int  # the HF model's parameters, tied ones once
    largest_module: int  # parameters of the largest single module (DeepSpeed's "largest layer")

    @property
    def gemma(self) -> bool:
        return self.model_type.startswith("gemma")


def _hf_config(name: str) -> tuple[Any, str]:
    """The transformers config of ``name`` without downloading anything, and where it was found."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if name in TINY_MODELS:
        tok = test_tokenizer()
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        return _tiny_config(TINY_MODELS[name], len(tok), 4, 64, special), "alignx.testing (tiny model)"
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), f"{path / 'config.json'}"
    if name in PACKAGED and (packaged_model_dir(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(str(packaged_model_dir(name))), f"{packaged_model_dir(name)}/config.json"
    if name in KNOWN_ARCHITECTURES:
        values = dict(KNOWN_ARCHITECTURES[name])
        return CONFIG_MAPPING[values.pop("model_type")](**values), "alignx.plan.KNOWN_ARCHITECTURES"
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "hub cache"
    except (OSError, ValueError) as e:
        known = ", ".join([*TINY_MODELS, *KNOWN_ARCHITECTURES])
        raise ConfigError(
            f"no config for model {name!r} here: not a directory with config.json, not in the hub cache and not a "
            f"known architecture ({known}); point model.name_or_path at a directory holding its config.json ({e})"
        ) from None


def architecture_of(name: str) -> Architecture:
    """Shapes and exact parameter counts of model ``name``, built on the meta device (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    config, source = _hf_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return Architecture(
        name=name,
        source=source,
        model_type=str(text.model_type),
        vocab=int(text.vocab_size),
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate=int(text.intermediate_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        params=sum(unique.values()),
        largest_module=largest,
    )


def head_params(hidden: int, lam_hidden: int) -> int:
    """Parameters of the language-matching head (2d -> h -> 2 SwiGLU, no bias), trained with the model in stage 1."""
    return 2 * (2 * hidden) * lam_hidden + 2 * lam_hidden


# ----------------------------------------------------------------------------------------------------------------
# Model states


@dataclass
class ModelStates:
    """Per-GPU bytes of one (stage, precision, offload) setting; ``total`` is the larger of the two phases."""

    stage: int
    precision: str
    offload: str  # none | optimizer | optimizer+param
    params: int
    grads: int
    optimizer: int  # fp32 master weights + Adam m and v
    step_grads: int  # fp32 gradient copy cast for the optimizer step
    live_module: int  # ZeRO-3: the gathered largest module (params + grads), live in forward/backward
    cpu: int  # what the offload keeps in CPU memory per GPU
    total: int = 0
    deepspeed: int | None = None  # DeepSpeed's estimator, mixed precision only

    def __post_init__(self) -> None:
        base = self.params + self.grads + self.optimizer
        self.total = max(base + self.live_module, base + self.step_grads)


def model_states(P: int, L: int, N: int, stage: int, precision: str, offload: str = "none") -> ModelStates:
    """Bytes per GPU of parameters, gradients and optimizer state (see the module docstring's table)."""
    s = BYTES[precision]
    mixed = s == 2
    shard = lambda nbytes: math.ceil(nbytes / N)  # noqa: E731
    params = s * P if stage < 3 else shard(s * P)
    grads = s * P if stage < 2 else shard(s * P)
    optimizer = 12 * P if stage == 0 else shard(12 * P)
    if not mixed and stage == 0:
        optimizer = 8 * P  # torch AdamW on the fp32 weights themselves: no master copy
    step = (4 * P if stage == 0 else shard(4 * P)) if (mixed or stage > 0) else 0
    live = 2 * s * L if stage == 3 else 0
    cpu = 0
    if offload != "none":
        cpu, optimizer, step, grads = optimizer + step + grads, 0, 0, 0
        if offload == "optimizer+param":
            cpu, params = cpu + params, 0
    return ModelStates(stage, precision, offload, params, grads, optimizer, step, live, cpu)


def deepspeed_estimate(P: int, L: int, gpus: int, nodes: int, stage: int, offload: str) -> int | None:
    """DeepSpeed's own per-GPU estimate of the mixed-precision model states (stages 2 and 3; None elsewhere)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=offload != "none")[1]
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        off, off_p = offload != "none", offload == "optimizer+param"
        return estimate_zero3_model_states_mem_needs(P, L, gpus, nodes, cpu_offload=off, cpu_offload_params=off_p)[1]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Term:
    name: str
    nbytes: int
    kind: str  # saved (held until backward) | transient (the largest short-lived buffer at the peak)


def _attention(arch: Architecture, n: int, b: int, T: int, s: int, attn: str) -> list[Term]:
    """Per layer: what the attention saves for backward (q, k, v, output) and its mask or score matrix."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if attn.startswith("flash"):
        # varlen: unpadded copies of q, k, v are saved, the padded output feeds o_proj; no mask, no repeat of k, v
        return [Term("attention q, k, v, output (flash)", n * s * (3 * q + 2 * kv) + n * arch.heads * 4, "saved")]
    if attn == "sdpa":
        # HF repeats k, v to every head when a padding mask is passed; SDPA turns the boolean mask into a float one
        # per layer and keeps it for backward: b x T x T per layer.
        return [
            Term("attention q, k, v, output (sdpa)", n * s * 4 * q + n * arch.heads * 4, "saved"),
            Term("attention mask (sdpa, padded rows)", b * T * T * s, "saved"),
        ]
    # eager: the fp32 softmax output (and its cast) for every head
    probs = b * arch.heads * T * T * (4 + (s if s < 4 else 0))
    return [Term("attention q, k, v, output (eager)", n * s * 3 * q, "saved"), Term("attention scores", probs, "saved")]


def _norm(width: int, n: int, s: int, gemma: bool, feeds_linear: bool) -> int:
    """Saved bytes of one RMSNorm over ``width``: its fp32 upcast input (16-bit training), the normalised values
    (fp32 in Gemma's norm) and its output when a linear layer consumes it."""
    upcast = 4 * width if s < 4 else 0
    normed = (4 if gemma else s) * width
    out = s * width if feeds_linear else 0
    return n * (upcast + normed + out)


def layer_bytes(arch: Architecture, b: int, T: int, s: int, attn: str) -> list[Term]:
    """Saved activations of one decoder layer for ``b`` rows of ``T`` tokens."""
    n, d = b * T, arch.hidden
    terms = [Term("residual stream (layer input, mid-layer sum)", 2 * n * s * d, "saved")]
    if arch.gemma:  # input, post-attention, pre-feed-forward, post-feed-forward norms; q and k norms per head
        norms = 2 * _norm(d, n, s, True, True) + 2 * _norm(d, n, s, True, False)
        norms += _norm(arch.heads * arch.head_dim, n, s, True, False)
        norms += _norm(arch.kv_heads * arch.head_dim, n, s, True, False)
    else:
        norms = 2 * _norm(d, n, s, False, True)
    terms.append(Term("RMSNorms", norms, "saved"))
    terms += _attention(arch, n, b, T, s, attn)
    terms.append(Term("MLP (gate, act(gate), up, product)", 4 * n * s * arch.intermediate, "saved"))
    return terms


@dataclass
class Activations:
    """The activation terms of one micro-batch; ``total`` is saved tensors + the largest transient."""

    micro_batch: int
    tokens: int
    checkpointing: bool
    terms: list[Term] = field(default_factory=list)

    @property
    def saved(self) -> int:
        return sum(t.nbytes for t in self.terms if t.kind == "saved")

    @property
    def total(self) -> int:
        return self.saved + max((t.nbytes for t in self.terms if t.kind == "transient"), default=0)


def lm_head_terms(arch: Architecture, cfg: Config, n: int, s: int, device: str = "cuda") -> list[Term]:
    """The LM head's and the NTP loss's memory for ``n`` positions of ``s``-byte activations.

    Fused (``model.fused_ce`` and a head :data:`alignx.model.FUSED_HEAD_TYPES` knows): no logits; the fp32 gradients
    ``dW [V, D]`` and ``dH [n, D]`` formed in the forward live until the backward, beside one chunk of logits (Triton
    on a GPU: fp32 logits + ``dZ`` in the input dtype within 1 GiB; the torch path on CPU: 256 MiB of fp32 logits and
    an fp32 copy of the counted rows). Else HF's head: the logits are kept for the cross-entropy and the backward
    holds their gradient and an fp32 chunk.
    """
    d, V = arch.hidden, arch.vocab
    if cfg.model.fused_ce and arch.model_type in FUSED_HEAD_TYPES:
        if device == "cuda":
            rows = max(1, min(n, LCE_TRITON_CHUNK_BYTES // (V * (4 + s))))
            chunk = rows * V * (4 + s)
        else:
            chunk = min(n, max(1, LCE_TORCH_CHUNK_BYTES // (4 * V))) * V * 4 + 4 * n * d
        return [
            Term("fused LM head: fp32 gradients formed in the forward (dW [V, D], dH [n, D])", 4 * (V + n) * d,
                 "saved"),
            Term("fused LM head: one chunk of logits", chunk, "transient"),
        ]  # fmt: skip
    chunk = min(CE_CHUNK_ELEMENTS, n * V)
    one_fp32_chunk = s == 4 and chunk == n * V  # the fp32 chunk is the logits' gradient itself
    lm_backward = n * V * s + (0 if one_fp32_chunk else 4 * chunk)
    return [
        Term("logits (LM head output, kept for the cross-entropy)", n * V * s, "saved"),
        Term("LM head backward: logits gradient + fp32 cross-entropy chunk", lm_backward, "transient"),
    ]


def activation_terms(arch: Architecture, cfg: Config, b: int, *, world: int = 1, attn: str | None = None,
                     checkpointing: bool | None = None, precision: str | None = None,
                     device: str = "cuda") -> Activations:  # fmt: skip
    """Activation memory of a stage-1 step of ``b`` rows at ``data.cutoff_len`` (see the module docstring) on a GPU
    (``device="cpu"``: the LM head's CPU path, for checks against a CPU measurement)."""
    T = cfg.data.cutoff_len
    n, d = b * T, arch.hidden
    s = BYTES[precision or cfg.engine.precision]
    attn = attn or planned_attention(cfg)
    ckpt = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    layer = layer_bytes(arch, b, T, s, attn)
    one_layer = sum(t.nbytes for t in layer)
    out = Activations(b, n, ckpt)
    if ckpt:
        out.terms.append(Term(f"layer inputs kept by checkpointing ({arch.layers} layers)", arch.layers * n * s * d,
                              "saved"))  # fmt: skip
        out.terms.append(Term("one layer recomputed in backward", one_layer, "saved"))
    else:
        for t in layer:
            out.terms.append(Term(f"{t.name} x {arch.layers} layers", t.nbytes * arch.layers, t.kind))
    final = _norm(d, n, s, arch.gemma, True)
    out.terms.append(Term("embeddings output and final norm", n * s * d + final, "saved"))
    out.terms += lm_head_terms(arch, cfg, n, s, device)
    out.terms += _objective_buffers(cfg, d, b, world, s)
    return out


def _objective_buffers(cfg: Config, d: int, b: int, world: int, s: int) -> list[Term]:
    """Contrastive and language-matching buffers: pooled states, gathered candidates, queue, bounded chunks."""
    obj = cfg.objective
    if obj.kind == "ntp":
        return []
    gathered = world if obj.negatives != "local" else 1
    N = gathered * b + obj.queue_size
    pooled = 2 * 2 * b * d * 4  # source and target means at the align layer and at the final norm, fp32
    terms = [Term("pooled span means (align layer, final norm)", pooled, "saved")]
    if gathered > 1:
        terms.append(Term(f"negatives gathered from {world} ranks ([W*m, 4D] fp32)", gathered * b * 4 * d * 4, "saved"))
    if obj.queue_size:
        copies = 2 if obj.symmetric else 1
        terms.append(Term("negatives queue (+ its gradient rows in backward)",
                          obj.queue_size * d * (s * copies + 4), "saved"))  # fmt: skip
    terms.append(Term("contrastive similarity chunk", min(DEFAULT_CHUNK_BYTES, 4 * b * N + 8 * N * d), "transient"))
    M = 2 * gathered * b
    lam = M * 4 * obj.lam_hidden * 4 + min(_TORCH_CHUNK_BYTES, 16 * M * M * obj.lam_hidden)
    terms.append(Term("language-matching projections + pair chunk", lam, "transient"))
    return terms


def planned_attention(cfg: Config) -> str:
    """The attention kernel a GPU run of ``cfg`` uses: ``auto`` = flash_attention_2 when flash-attn is installed
    here (``pip install -e .[gpu]``), else sdpa."""
    impl = cfg.model.attn_implementation
    if impl != "auto":
        return impl
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Setting:
    """One way to run: what is switched on, its model states, and the largest micro-batch that fits."""

    label: str
    stage: int
    precision: str
    offload: str
    checkpointing: bool
    states: ModelStates
    activations_at_micro: Activations
    fixed: int
    max_micro_batch: int


def largest_micro_batch(budget: int, activations_of: Any, limit: int = 1 << 14) -> int:
    """Largest ``b`` with ``activations_of(b).total <= budget`` (0 when not even one row fits); bisection on the
    monotone estimate."""
    if activations_of(1).total > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and activations_of(hi).total <= budget:
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if activations_of(mid).total <= budget else (lo, mid)
    return lo


def _buckets(cfg: Config, P: int, stage: int, s: int) -> int:
    """Communication buffers DeepSpeed allocates besides the model states: its reduce bucket (ZeRO-1/2) or prefetch
    bucket (ZeRO-3), in elements of the training dtype (``engine.deepspeed.zero_optimization`` or its defaults)."""
    zero = cfg.engine.deepspeed.get("zero_optimization", {})
    if stage in (1, 2):
        return s * min(P, int(zero.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"])))
    if stage == 3:
        return s * min(P, int(zero.get("stage3_prefetch_bucket_size", DS_DEFAULTS["stage3_prefetch_bucket_size"])))
    return 0


def plan(cfg: Config, *, gpus: int = 1, nodes: int = 1, gpu_memory_gib: float = 80.0, reserve_gib: float = 2.0,
         attn: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The whole plan of ``cfg`` on ``nodes`` x ``gpus`` GPUs of ``gpu_memory_gib`` each (``reserve_gib`` kept for
    the CUDA context, NCCL and allocator fragmentation), as a JSON-serialisable dict."""
    arch = architecture_of(cfg.model.name_or_path)
    head = head_params(arch.hidden, cfg.objective.lam_hidden) if cfg.objective.kind != "ntp" else 0
    P, L, N = arch.params + head, arch.largest_module, gpus * nodes
    attn = attn or planned_attention(cfg)
    m = cfg.train.micro_batch_size
    budget_all = int(gpu_memory_gib * GIB) - int(reserve_gib * GIB)

    states = _states_table(cfg, P, L, gpus, nodes)
    eng = cfg.engine
    settings = []
    s = BYTES[eng.precision]
    for label, stage, offload, ck in _variants(cfg):
        st = model_states(P, L, N, stage, eng.precision, offload)
        fixed = st.total + _buckets(cfg, P, stage, s)

        def acts(b: int, ck: bool = ck) -> Activations:
            return activation_terms(arch, cfg, b, world=N, attn=attn, checkpointing=ck)

        best = largest_micro_batch(budget_all - fixed, acts) if budget_all > fixed else 0
        settings.append(Setting(label, stage, eng.precision, offload, ck, st, acts(m), fixed, best))

    return {
        "model": asdict(arch),
        "head_params": head,
        "params_planned": P,
        "gpus_per_node": gpus,
        "nodes": nodes,
        "gpu_memory_gib": gpu_memory_gib,
        "reserve_gib": reserve_gib,
        "attention": attn,
        "cutoff_len": cfg.data.cutoff_len,
        "micro_batch": m,
        "precision": eng.precision,
        "zero_stage": eng.zero_stage,
        "model_states": [asdict(x) for x in states],
        "activations": _acts_dict(settings[0].activations_at_micro),
        "settings": [
            {
                "label": x.label,
                "stage": x.stage,
                "precision": x.precision,
                "offload": x.offload,
                "checkpointing": x.checkpointing,
                "model_states": x.states.total,
                "buffers": x.fixed - x.states.total,
                "activations_at_micro_batch": x.activations_at_micro.total,
                "total_at_micro_batch": x.fixed + x.activations_at_micro.total,
                "max_micro_batch": x.max_micro_batch,
            }
            for x in settings
        ],  # fmt: skip
    }


def _states_table(cfg: Config, P: int, L: int, gpus: int, nodes: int) -> list[ModelStates]:
    """Model states per ZeRO stage in bf16 and fp32, then with the offloads, in the configured precision (with
    DeepSpeed's own estimate where it has one)."""
    N, states = gpus * nodes, []
    for precision in ("bf16", "fp32"):
        for stage in range(4):
            st = model_states(P, L, N, stage, precision)
            if precision != "fp32":
                st.deepspeed = deepspeed_estimate(P, L, gpus, nodes, stage, "none")
            states.append(st)
    for stage, offload in ((2, "optimizer"), (3, "optimizer"), (3, "optimizer+param")):
        st = model_states(P, L, N, stage, cfg.engine.precision, offload)
        if cfg.engine.precision != "fp32":
            st.deepspeed = deepspeed_estimate(P, L, gpus, nodes, stage, offload)
        states.append(st)
    return states


def _variants(cfg: Config) -> list[tuple[str, int, str, bool]]:
    """``(label, ZeRO stage, offload, checkpointing)``: the configured setting first, then one change at a time."""
    eng = cfg.engine
    configured_offload = "optimizer+param" if eng.offload_param else ("optimizer" if eng.offload_optimizer else "none")
    ckpt = cfg.model.gradient_checkpointing
    variants = [("as configured", eng.zero_stage, configured_offload, ckpt)]
    variants += [(f"ZeRO-{z}", z, "none", ckpt) for z in range(4) if z != eng.zero_stage]
    variants.append(
        (("-" if ckpt else "+") + " activation checkpointing", eng.zero_stage, configured_offload, not ckpt)
    )
    if configured_offload == "none" and eng.zero_stage >= 1:
        variants.append(("+ optimizer offload", eng.zero_stage, "optimizer", ckpt))
    if eng.zero_stage == 3 and configured_offload != "optimizer+param":
        variants.append(("+ parameter offload", 3, "optimizer+param", ckpt))
    return variants


def _acts_dict(a: Activations) -> dict[str, Any]:
    return {"micro_batch": a.micro_batch, "tokens": a.tokens, "checkpointing": a.checkpointing, "saved": a.saved,
            "total": a.total, "terms": [asdict(t) for t in a.terms]}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Printing


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: (
        "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    )  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def render(p: dict[str, Any]) -> str:
    """The plan as markdown tables (GiB per GPU)."""
    arch = p["model"]
    n_gpus = p["gpus_per_node"] * p["nodes"]
    out = [
        f"Memory plan: {arch['name']} ({arch['model_type']}, {arch['params']:,} parameters + {p['head_params']:,} "
        f"language-matching head; config from {arch['source']}) on {p['nodes']} node(s) x {p['gpus_per_node']} "
        f"GPU(s) of {p['gpu_memory_gib']:g} GiB ({p['reserve_gib']:g} GiB reserved for the CUDA context, NCCL and "
        f"fragmentation); micro-batch {p['micro_batch']} x cutoff_len {p['cutoff_len']}, attention {p['attention']}.",
        "",
        f"Model states per GPU (GiB; {n_gpus} GPUs share the partitions; largest module "
        f"{arch['largest_module']:,} parameters):",
        "",
    ]
    rows = []
    for st in p["model_states"]:
        ds = st["deepspeed"]
        diff = f"{100 * (st['total'] / ds - 1):+.1f}%" if ds else "-"
        rows.append([f"ZeRO-{st['stage']}", st["precision"], st["offload"], _gib(st["params"]), _gib(st["grads"]),
                     _gib(st["optimizer"]), _gib(st["step_grads"]), _gib(st["live_module"]), _gib(st["total"]),
                     _gib(ds), diff, _gib(st["cpu"])])  # fmt: skip
    out.append(
        _table(
            [
                "stage",
                "precision",
                "offload",
                "params",
                "grads",
                "fp32 master+Adam",
                "fp32 step grads",
                "live module",
                "total",
                "DeepSpeed estimate",
                "vs DeepSpeed",
                "CPU (offload)",
            ],
            rows,
        )
    )
    a = p["activations"]
    out += [
        "",
        f"Activations of one micro-batch ({a['micro_batch']} x {p['cutoff_len']} = {a['tokens']:,} tokens, "
        f"{p['precision']}, checkpointing {'on' if a['checkpointing'] else 'off'}), largest terms first:",
        "",
    ]
    terms = sorted(a["terms"], key=lambda t: -t["nbytes"])
    out.append(_table(["term", "kind", "GiB"], [[t["name"], t["kind"], _gib(t["nbytes"])] for t in terms]))
    out.append(f"\nActivation total: {_gib(a['total'])} GiB (saved tensors + the largest transient).")
    out += ["", f"Per GPU at the configured micro-batch, and the largest micro-batch that fits {p['gpu_memory_gib']:g} "
            "GiB:", ""]  # fmt: skip
    rows = [[s["label"], f"ZeRO-{s['stage']}", s["offload"], "on" if s["checkpointing"] else "off",
             _gib(s["model_states"]), _gib(s["buffers"]), _gib(s["activations_at_micro_batch"]),
             _gib(s["total_at_micro_batch"]), s["max_micro_batch"]] for s in p["settings"]]  # fmt: skip
    out.append(_table(["setting", "stage", "offload", "checkpointing", "model states", "comm buffers",
                       "activations", "total", "max micro-batch"], rows))  # fmt: skip
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``alignx plan --config FILE [--gpus N] [--nodes M] [--gpu-memory GIB] [--json OUT] [--section.key=value]``."""
    ap = argparse.ArgumentParser(prog="alignx plan", description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--config", help="YAML run config")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (80: H100/A100 80GB)")
    ap.add_argument("--reserve", type=float, default=2.0, help="GiB per GPU kept for CUDA context, NCCL, fragmentation")
    ap.add_argument("--attention", choices=("flash_attention_2", "sdpa", "eager"), default=None,
                    help="attention kernel of the GPU run (default: model.attn_implementation; auto = flash when "
                    "flash-attn is installed here)")  # fmt: skip
    ap.add_argument("--json", help="also write the plan as JSON to this file")
    args, rest = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.gpus < 1 or args.nodes < 1:
        print("alignx: usage error: --gpus and --nodes must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, rest)
        p = plan(cfg, gpus=args.gpus, nodes=args.nodes, gpu_memory_gib=args.gpu_memory, reserve_gib=args.reserve,
                 attn=args.attention)  # fmt: skip
    except ConfigError as e:
        print(f"alignx: config error: {e}", file=sys.stderr)
        return 2
    print(render(p))
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
