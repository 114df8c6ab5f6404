"""The language model side of alignx, and the only module that knows Hugging Face internals.

- :func:`load_tokenizer` / :func:`load_causal_lm`: any local HF directory or hub id, the packaged GGUF models
  (``gemma3-270m``, ``smollm2-135m``, via :mod:`alignx.models`) and the offline test models (``tiny-llama``,
  ``tiny-qwen2``, ``tiny-gemma3``, via :mod:`alignx.testing`).
- :func:`find_decoder_parts`: the decoder blocks and the final norm of any ``AutoModelForCausalLM`` layout.
- :class:`LanguageMatchingHead`: the AlignX language-matching SwiGLU classifier, with the official parameter names.
- :class:`AlignXModel`: the HF model + the head + forward hooks on decoder block ``align_layer`` and on the final
  norm; its ``forward`` computes the whole objective (:mod:`alignx.objective`), so that under ZeRO-3 the head's
  parameters are used inside a module forward.

Hidden-state conventions (checked against ``output_hidden_states=True`` for Llama, Qwen2 and Gemma 3): HF's
``hidden_states[k]`` (1 <= k < N) is the output of decoder block k, the residual stream before the final norm, and
``hidden_states[-1]`` is the final-norm output (the input of ``lm_head``). The hooks capture exactly these two
tensors, without ``output_hidden_states`` (which would keep all N + 1 of them alive).

Packed micro-batches (``data.packing``): R records concatenated in one row ``[1, total]`` with ``position_ids``
restarting at 0 per record, ``cu_seqlens [R + 1]`` and NO attention mask. Transformers (5.x, ``masking_utils``)
detects the packed layout from the position-id restarts when the 2D mask is None and builds a block-diagonal causal
mask (sdpa / eager / flex; Gemma 3's sliding-window mask too, in per-record positions); FlashAttention-2/3 gets the
``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs (``FlashAttentionKwargs``) and runs ``flash_attn_varlen_func``.
Either way no record attends to another and no compute is spent on padding (``tests/test_packing.py`` checks the
logits of a packed row against each record alone).

Gemma 3 notes: it multiplies the token embeddings by sqrt(d) (only ``hidden_states[0]`` sees it; no term uses that
index), its RMSNorm scales by ``1 + w`` and its last hidden state is still the final-norm output, and
``final_logit_softcapping`` (None for Gemma 3, 30 for Gemma 2) applies to the logits only — the NTP term reads the
model's own logits, so any soft-capping is included and the pooled states are unaffected.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from . import models
from .constants import IGNORE_INDEX
from .decoder import ModelLayoutError, find_decoder_parts, first_output, layer_module
from .objective import DIAG, TERMS, AlignXObjective, HeadInputs, kernel_op
from .recipes import build_objective
from .testing import tiny_pretrained

if TYPE_CHECKING:
    from .config import Config, ModelConfig

__all__ = [
    "AlignXModel",
    "FusedLMLoss",
    "LMOutputs",
    "LanguageMatchingHead",
    "ModelLayoutError",
    "ModelSource",
    "find_decoder_parts",
    "fused_head",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_attn_implementation",
    "resolve_model_source",
]

PACKAGED_MODELS = ("gemma3-270m", "smollm2-135m")
# Attention implementations that keep packed records apart: the mask builders of masking_utils (position-id restarts
# with attention_mask=None) and the FlashAttention varlen path (cu_seq_lens kwargs).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# model_type -> what the HF causal-LM forward does to ``lm_head(hidden)`` (transformers 5.x, read in each class's
# forward): nothing, Gemma's ``final_logit_softcapping``, Cohere's ``* logit_scale``, Granite's ``/ logits_scaling``.
# The fused NTP loss (model.fused_ce) is exact for these; any other model keeps HF's own logits.
FUSED_HEAD_TYPES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "smollm3"), "plain"),
    **dict.fromkeys(("gemma2", "gemma3_text"), "softcap"),
    "cohere": "scale",
    "granite": "inverse_scale",
}


# ----------------------------------------------------------------------------------------------------------------
# Loading


class ModelSource(NamedTuple):
    """Where ``from_pretrained`` reads a model: a directory or hub id, and the GGUF file inside it if any."""

    path: str
    gguf_file: str | None = None


def resolve_model_source(name: str, cache_dir: str | None = None) -> ModelSource:
    """Map ``model.name_or_path`` (or ``model.tokenizer``) to what ``from_pretrained`` reads.

    Packaged names are resolved by :func:`alignx.models.resolve_pretrained` (the dequantised HF directory in the
    cache; a ``(directory, gguf_file)`` pair is accepted too) and the ``tiny-*`` test models by
    :func:`alignx.testing.tiny_pretrained` (created once in the cache); anything else is passed through (a local HF
    directory or a hub id).
    """
    if name.startswith("tiny-"):
        return ModelSource(str(tiny_pretrained(name, cache_dir)))
    if name in PACKAGED_MODELS:
        resolved = models.resolve_pretrained(name, cache_dir)
        if isinstance(resolved, tuple):
            return ModelSource(str(resolved[0]), resolved[1])
        return ModelSource(str(resolved))
    # Passed through: a tokenizer-only directory or a hub id is for from_pretrained to read. The one-line name check
    # (alignx.models.model_name_problem) runs in train.py's preflight, before any data work.
    return ModelSource(name)


def _gguf_kwargs(src: ModelSource) -> dict[str, Any]:
    return {"gguf_file": src.gguf_file} if src.gguf_file else {}


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The fast tokenizer of ``model.tokenizer`` (default: the model's), with a pad token.

    A tokenizer without a pad token gets its EOS token as pad (the collator masks padding out of every loss). A slow
    tokenizer is an error: the data pipeline computes spans from character offsets, which only fast tokenizers give.
    """
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or model_cfg.name_or_path
    src = resolve_model_source(name, model_cfg.cache_dir)
    tok = AutoTokenizer.from_pretrained(src.path, **_gguf_kwargs(src))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer of {name!r} is not a fast tokenizer; character offsets need a fast tokenizer")
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an EOS token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def resolve_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    """``"auto"`` -> ``"flash_attention_2"`` when ``flash_attn`` imports, a GPU is present and the dtype is 16-bit
    (FlashAttention has no CPU or fp32 kernels), else ``"sdpa"``. Any other value is passed to transformers as is."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401
        except Exception:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(model_cfg: ModelConfig) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in ``model.dtype`` with the resolved attention implementation.

    The KV cache is switched off (training). Gradient checkpointing is switched on by :class:`AlignXModel`.
    """
    from transformers import AutoModelForCausalLM

    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}")
    dtype = DTYPES[model_cfg.dtype]
    src = resolve_model_source(model_cfg.name_or_path, model_cfg.cache_dir)
    # Weights are read from safetensors only: a pickled pytorch_model.bin in a directory someone else prepared could
    # run code when loaded (GGUF files are plain data too).
    lm = AutoModelForCausalLM.from_pretrained(
        src.path,
        dtype=dtype,
        attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation, dtype),
        **(_gguf_kwargs(src) or {"use_safetensors": True}),
    )
    lm.config.use_cache = False
    return lm


# ----------------------------------------------------------------------------------------------------------------
# Layout


def _hidden_size(lm: nn.Module) -> int:
    config = lm.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    raise ModelLayoutError(f"{type(lm).__name__}: the config has no hidden_size / n_embd / d_model")


def _param_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(module.parameters(), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# The language-matching head


class LanguageMatchingHead(nn.Module):
    """The AlignX "same language?" classifier on a pair of pooled states, with the official names and layout.

    ``logits(z) = down_proj(silu(gate_proj(z)) * up_proj(z))`` for ``z = [E_i ; E_j]`` (``2d``), widths
    ``2d -> hidden -> 2`` (reference 128), no bias, weights ``N(0, init_std^2)`` (reference 0.02):
    ``gate_proj.weight [hidden, 2d]``, ``up_proj.weight [hidden, 2d]``, ``down_proj.weight [2, hidden]`` — the
    official checkpoint's ``language_matching_classifier.*`` tensors load as they are
    (:meth:`load_official_state_dict`).
    """

    OFFICIAL_PREFIX = "language_matching_classifier."

    def __init__(self, hidden_size: int, intermediate_size: int = 128, init_std: float = 0.02) -> None:
        super().__init__()
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(f"hidden_size and intermediate_size must be >= 1, got {hidden_size}, {intermediate_size}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(2 * hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(2 * hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, 2, bias=False)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    def pair_logits(self, z: Tensor) -> Tensor:
        """The classifier itself on concatenated pairs: ``z [..., 2d]`` -> logits ``[..., 2]``."""
        return self.down_proj(nn.functional.silu(self.gate_proj(z)) * self.up_proj(z))

    def forward(self, emb: Tensor, lang: Tensor, *, include_self_pairs: bool = True, backend: str = "auto") -> Tensor:
        """Mean cross-entropy over all ordered pairs (i, j) of ``emb [M, d]`` of "lang[i] == lang[j]" (fp32 0-dim).

        Computed by ``alignx.kernels.lang_match_loss`` without the ``[M, M, 2d]`` pair tensor; runs inside this
        module's forward so that ZeRO-3 gathers the weights.
        """
        if emb.dim() != 2 or emb.shape[1] != self.hidden_size:
            raise ValueError(f"emb must be [M, {self.hidden_size}], got {tuple(emb.shape)}")
        w_gate = self.gate_proj.weight
        lang_match_loss = kernel_op("lang_match_loss")
        return lang_match_loss(
            emb.to(w_gate.dtype),
            lang,
            w_gate,
            self.up_proj.weight,
            self.down_proj.weight,
            include_self_pairs=include_self_pairs,
            backend=backend,
        )

    def load_official_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load the head from an official AlignX state dict (``language_matching_classifier.*`` keys, or bare
        ``gate_proj.weight`` ...). Shapes must match: ``[hidden, 2d]``, ``[hidden, 2d]``, ``[2, hidden]``."""
        names = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        picked = {}
        for name in names:
            for key in (self.OFFICIAL_PREFIX + name, name):
                if key in state_dict:
                    picked[name] = state_dict[key]
                    break
            else:
                raise KeyError(f"the state dict has no {self.OFFICIAL_PREFIX + name} (nor {name})")
        self.load_state_dict(picked, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# The fused LM head + NTP loss (model.fused_ce)


class FusedLMLoss(nn.Module):
    """The model's LM head and the summed NTP cross-entropy in one op that never holds the logits.

    ``forward(hidden [N, D], labels [N])`` -> ``(loss_sum fp32 0-dim, count int64 0-dim)`` over the rows whose
    label is not ``IGNORE_INDEX``: :func:`alignx.kernels.linear_cross_entropy` with the head's weight ``[V, D]`` (the
    embedding matrix when the model ties them), the model's soft-cap and logit scaling, fp32 maths.

    The head is referenced, not owned (no second copy of a tied weight in ``state_dict``). It runs as a module of
    its own so that under ZeRO-3 the partitioned weight, registered as this module's external parameter, is gathered
    for this module's forward and backward only (inside the engine's forward), never for the whole step.
    """

    def __init__(self, head: nn.Module, *, softcap: float | None, logit_scale: float, backend: str) -> None:
        super().__init__()
        self._head = (head,)  # a tuple: not registered as a submodule
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.backend = backend
        try:
            from deepspeed.zero import register_external_parameter
        except ImportError:  # no DeepSpeed: no ZeRO-3 to tell
            return
        register_external_parameter(self, head.weight)

    @property
    def weight(self) -> Tensor:
        """The head weight ``[V, D]`` (gathered while this module runs under ZeRO-3)."""
        return self._head[0].weight

    def forward(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.weight
        return kernel_op("linear_cross_entropy")(
            hidden.to(weight.dtype),
            weight,
            labels,
            ignore_index=IGNORE_INDEX,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}, logit_scale={self.logit_scale}, backend={self.backend!r}"


def fused_head(lm: nn.Module, backend: str = "auto") -> tuple[nn.Module, FusedLMLoss] | str:
    """``(decoder body, FusedLMLoss)`` for a causal LM whose logits are ``post(lm_head(body(...).last_hidden_state))``
    with ``post`` one of :data:`FUSED_HEAD_TYPES`, else the reason it cannot be fused (a string).

    The body is the model's ``base_model`` (``lm.model`` for Llama, Qwen2, Gemma 3, ...); the head a bias-free
    ``nn.Linear``.
    """
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    post = FUSED_HEAD_TYPES.get(model_type)
    if post is None:
        return f"model type {model_type!r} is not one whose LM head is known to be a plain linear layer"
    body = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or body is lm:
        return f"{type(lm).__name__} has no decoder body at .{getattr(lm, 'base_model_prefix', 'model')}"
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return f"{type(lm).__name__}'s output layer is not a bias-free nn.Linear ({type(head).__name__})"
    softcap = getattr(config, "final_logit_softcapping", None) if post == "softcap" else None
    scale = 1.0
    if post == "scale":
        scale = float(getattr(lm, "logit_scale", getattr(config, "logit_scale", 1.0)))
    elif post == "inverse_scale":
        scale = 1.0 / float(config.logits_scaling)
    return body, FusedLMLoss(head, softcap=softcap, logit_scale=scale, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# The trained module


class LMOutputs(NamedTuple):
    """One forward of the language model: ``logits [B, T, V]`` (with the fused head: a
    :class:`alignx.objective.HeadInputs`, what the NTP term reads instead), the hooked ``hidden_align [B, T, D]``
    (output of block ``align_layer``) and ``hidden_final [B, T, D]`` (final-norm output); the hidden states are None
    when the objective does not need them."""

    logits: Tensor | HeadInputs
    hidden_align: Tensor | None
    hidden_final: Tensor | None


class _HiddenCapture:
    """Forward-hook target that keeps the outputs of two modules during one forward.

    Hooks are bound methods of this object (not closures), so a ``copy.deepcopy`` of the model gets hooks that write
    into its own copy. Outputs are kept only between :meth:`start` and :meth:`stop`: a gradient checkpoint's
    recomputation in backward (or any forward outside :meth:`AlignXModel.run_lm`) is ignored.
    """

    def __init__(self) -> None:
        self.active = False
        self.tensors: dict[str, Tensor] = {}

    def start(self, active: bool) -> None:
        self.tensors = {}
        self.active = active

    def stop(self) -> dict[str, Tensor]:
        self.active = False
        tensors, self.tensors = self.tensors, {}
        return tensors

    def _keep(self, key: str, output: Any) -> None:
        if self.active:
            self.tensors[key] = first_output(output)

    def align(self, module: nn.Module, args: Any, output: Any) -> None:
        self._keep("align", output)

    def final(self, module: nn.Module, args: Any, output: Any) -> None:
        self._keep("final", output)


class AlignXModel(nn.Module):
    """An HF causal LM with the AlignX objective computed inside ``forward``.

    ``self.lm`` is the HF model, ``self.lang_head`` the :class:`LanguageMatchingHead` (a submodule, so DeepSpeed
    partitions, clips and checkpoints it; None for ``objective.kind="ntp"``). Forward hooks on decoder block
    ``align_layer`` (1-based, as HF ``hidden_states[k]``; default ``num_layers // 2``) and on the final norm capture
    their outputs during :meth:`forward` only (never parameters, which ZeRO-3 may have released); they work with
    gradient checkpointing, whose backward recomputation they ignore. As in HF, ``align_layer = num_layers`` means
    the final-norm output (``hidden_states[N]`` is the normed state, not block N's raw output).
    """

    # Keys of ``state_dict()`` that the exported HF directory leaves out.
    hf_state_dict_keys_excluded = ("lang_head.",)

    def __init__(self, lm: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.lm = lm
        # objective.kind -> AlignXObjective or a recipe's own class (alignx.recipes.RECIPES)
        self.objective: AlignXObjective = build_objective(cfg.objective, min_target_tokens=cfg.data.min_target_tokens)
        layers, final_norm = find_decoder_parts(lm)
        self.num_layers = len(layers)
        self.align_layer = cfg.model.resolved_align_layer(self.num_layers)
        if getattr(lm, "config", None) is not None:
            lm.config.use_cache = False
        if cfg.model.gradient_checkpointing:
            _enable_gradient_checkpointing(lm)

        self.lang_head: LanguageMatchingHead | None = None
        self.diagnostics: dict[str, Tensor] = {}  # diag/... of the last forward (alignx.objective)
        self._capture = _HiddenCapture()
        self._hooks: list[Any] = []
        if self.objective.uses_head:
            head = LanguageMatchingHead(_hidden_size(lm), cfg.objective.lam_hidden, cfg.objective.lam_init_std)
            dtype, device = _param_dtype_device(lm)
            self.lang_head = head.to(device=device, dtype=dtype)
            self._align_hook = self._hook_align_layer(layers, final_norm)
            self._hooks.append(final_norm.register_forward_hook(self._capture.final))
        if cfg.data.packing:
            self._packed_attention_kwargs(torch.tensor([0, 1]))  # fail at build time on an unsupported attention
        self.trim_logits = cfg.model.trim_logits and "logits_to_keep" in inspect.signature(lm.forward).parameters
        # model.fused_ce: the decoder body and the fused head + loss replace HF's LM head (no logits at all).
        self._body: tuple[nn.Module, ...] = ()  # the decoder body of self.lm (a tuple: not a second submodule)
        self.lm_loss: FusedLMLoss | None = None
        self.fused_ce_problem: str | None = None  # why the NTP term reads HF's logits although fused_ce is on
        if cfg.model.fused_ce:
            fused = fused_head(lm, cfg.objective.kernel_backend)
            if isinstance(fused, str):
                self.fused_ce_problem = fused
            else:
                self._body = (fused[0],)
                self.lm_loss = fused[1]

    @property
    def fused_ce(self) -> bool:
        """Whether the NTP term runs through :class:`FusedLMLoss` (``model.fused_ce`` and a known head)."""
        return self.lm_loss is not None

    def _hook_align_layer(self, layers: nn.ModuleList, final_norm: nn.Module) -> Any:
        # HF's hidden_states[N] is the final-norm output, not block N's: align_layer = N reads the norm too.
        return layer_module(layers, final_norm, self.align_layer).register_forward_hook(self._capture.align)

    def set_align_layer(self, layer: int) -> None:
        """Move the contrastive hook to block ``layer`` (1-based; ``model.align_layer=auto`` measures it first)."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"align layer {layer} is outside 1..{self.num_layers}")
        self.align_layer = layer
        if self.lang_head is None:
            return
        self._align_hook.remove()
        self._align_hook = self._hook_align_layer(*find_decoder_parts(self.lm))

    def run_state(self) -> dict[str, Any]:
        """Everything a checkpoint must keep besides parameters and optimizer, by name (None = this run keeps none):
        ``negatives_queue`` (the queues of ``global+queue``), ``similarity_stats`` (the running statistics of the
        similarity space) and ``align_layer``; the same on every rank."""
        return {
            "negatives_queue": self.objective.negatives_state(),
            "similarity_stats": self.objective.similarity_state(),
            "align_layer": self.align_layer,
        }

    def load_run_state(self, name: str, state: Any, device: torch.device | str | None = None) -> None:
        """Restore one entry of :meth:`run_state` exactly."""
        if name == "negatives_queue":
            self.objective.load_negatives_state(state, device)
        elif name == "similarity_stats":
            self.objective.load_similarity_state(state)
        elif name == "align_layer":
            self.set_align_layer(int(state))
        else:
            raise KeyError(f"unknown run state {name!r}; known: {sorted(self.run_state())}")

    @staticmethod
    def logits_to_keep(labels: Tensor) -> int:
        """How many trailing positions need logits: ``T - p`` for the first position ``p`` whose next label is
        counted (1 when none is; 0 = all, HF's convention, when that is position 0). One host sync.

        With ``data.labels="response"`` and left padding every row's response is at the end, so this skips the
        instruction, the source sentence and the padding of all rows and the LM head (``T x D x V``, the largest matmul
        of a small model with a large vocabulary) runs on the responses only; with the reference ``labels="all"`` it
        skips the padding that all rows share.
        """
        t = labels.shape[1]
        counted = (labels[:, 1:] != IGNORE_INDEX).any(0)
        if t < 2 or not bool(counted.any()):
            return 1
        first = int(counted.to(torch.int8).argmax())
        return 0 if first == 0 else t - first

    def _packed_attention_kwargs(self, cu_seqlens: Tensor) -> dict[str, Any]:
        """Extra ``self.lm(...)`` kwargs for a packed row: FlashAttention's varlen offsets, nothing for the mask-based
        implementations (their block-diagonal mask comes from the position ids). Unknown implementations are refused:
        they could silently attend across records."""
        impl = getattr(getattr(self.lm, "config", None), "_attn_implementation", None) or "eager"
        if impl not in PACKED_ATTENTION:
            raise ValueError(
                f"data.packing needs an attention implementation that keeps packed records apart ({PACKED_ATTENTION}); "
                f"the model uses {impl!r} (model.attn_implementation)"
            )
        if not impl.startswith("flash_attention"):
            return {}
        cu = cu_seqlens.to(torch.int32)
        max_len = int(cu.diff().max()) if cu.numel() > 1 else 0
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}

    def run_lm(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        logits_to_keep: int = 0,
        fused: bool = False,
    ) -> LMOutputs:
        """One forward of the HF model, returning the logits and the two hooked hidden states.

        ``logits_to_keep = K > 0``: logits ``[B, K, V]`` of the last K positions only (needs a model whose forward
        takes HF's ``logits_to_keep``); 0: all positions. The hidden states always cover every position.
        ``fused=True`` with a fused head (:attr:`fused_ce`): only the decoder body runs and ``logits`` is a
        :class:`alignx.objective.HeadInputs` (the final-norm states and :attr:`lm_loss`): no logits exist.
        Packed (``cu_seqlens`` given): ``input_ids [1, total]``, ``position_ids`` restarting at 0 at every
        ``cu_seqlens[i]`` (required) and no attention mask (an all-ones mask is dropped; a mask with zeros is an
        error), see the module docstring.
        """
        extra: dict[str, Any] = {}
        if cu_seqlens is not None:
            _check_packed(input_ids, attention_mask, position_ids, cu_seqlens)
            # transformers detects packing from the position ids only when the 2D mask is None.
            attention_mask = None
            extra = self._packed_attention_kwargs(cu_seqlens)
        self._capture.start(self.lang_head is not None)
        try:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            if fused and self._body and self.lm_loss is not None:
                out = self._body[0](**inputs, use_cache=False, **extra)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                logits: Any = HeadInputs(hidden, self.lm_loss)
            else:
                keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
                out = self.lm(**inputs, use_cache=False, **keep, **extra)
                logits = out.logits if hasattr(out, "logits") else out[0]
        finally:
            captured = self._capture.stop()
        if self.lang_head is None:
            return LMOutputs(logits, None, None)
        missing = [k for k in ("align", "final") if k not in captured]
        if missing:
            raise RuntimeError(f"{type(self.lm).__name__}: the forward hooks did not fire for {missing}")
        h_align, h_final = captured["align"], captured["final"]
        if logits.requires_grad and not (h_align.requires_grad and h_final.requires_grad):
            raise RuntimeError(
                "the hooked hidden states carry no gradient although the logits do: the gradient checkpointing of this "
                "model wraps the module call (hooks inside the checkpoint); use a non-reentrant checkpoint of forward"
            )
        return LMOutputs(logits, h_align, h_final)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        span_ids: Tensor | None = None,
        src_lang: Tensor | None = None,
        tgt_lang: Tensor | None = None,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        **extra: Tensor,
    ) -> dict[str, Tensor]:
        """The objective on one micro-batch.

        Args: ``input_ids``, ``attention_mask``, ``labels`` (-100 = not counted), ``span_ids`` (0 other, 1 source,
        2 target) ``[B, T]``; ``src_lang``, ``tgt_lang`` ``[B]`` integer language ids; ``position_ids`` optional
        (default: HF's, as the reference). The last four may be None for ``objective.kind="ntp"``. Packed batches
        (:class:`alignx.data.PackedCollator`): ``[1, total]`` tensors, ``attention_mask`` None, ``position_ids``
        restarting per record and ``cu_seqlens [B + 1]``; ``src_lang``/``tgt_lang`` stay ``[B]``. ``extra``: further
        batch tensors of a recipe's collator, passed to an objective that runs the model itself (``forward_model``,
        e.g. :class:`alignx.recipes.afp.AFPObjective`, which encodes the pair sentences separately).

        Returns: ``loss`` (the total, with its graph: what the engine back-propagates), ``ntp``, ``ctr``, ``lam``
        (detached fp32 0-dim copies for logging), ``rows_kept``, ``rows_dropped`` (int64 0-dim).
        """
        if labels is None:
            raise ValueError("AlignXModel.forward needs labels (-100 where a token is not counted)")
        batch = {"labels": labels, "span_ids": span_ids, "src_lang": src_lang, "tgt_lang": tgt_lang, **extra}
        if cu_seqlens is not None:
            batch["cu_seqlens"] = cu_seqlens
        forward_model = getattr(self.objective, "forward_model", None)
        if forward_model is not None:  # a recipe objective that runs the model itself (alignx.recipes)
            terms = forward_model(self, input_ids, attention_mask, position_ids, batch)
            return {k: terms[k] if k == "loss" else terms[k].detach() for k in TERMS}
        if extra:
            raise ValueError(f"objective.kind={self.objective.cfg.kind!r} takes no batch keys {sorted(extra)}")
        keep = self.logits_to_keep(labels) if self.trim_logits and not self.fused_ce else 0
        out = self.run_lm(input_ids, attention_mask, position_ids, cu_seqlens, logits_to_keep=keep, fused=self.fused_ce)
        terms = self.objective(out.logits, out.hidden_align, out.hidden_final, batch, self.lang_head)
        # The contrastive diagnostics (diag/..., detached, host) stay beside the contract terms: the trainer logs them.
        self.diagnostics = {k: v for k, v in terms.items() if k.startswith(DIAG)}
        return {k: terms[k] if k == "loss" else terms[k].detach() for k in TERMS}

    # -- negatives queue (objective.negatives = "global+queue"), driven by the trainer ----------------------------

    @property
    def candidates(self) -> int:
        """Contrastive candidates per anchor in the last forward (0 before the first or without the term)."""
        return self.objective.last_candidates

    def end_step(self, step: int = -1) -> int:
        """Call after each optimizer step: the rows staged by its forwards enter the negatives queue."""
        return self.objective.end_step(step)


def _check_packed(
    input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cu_seqlens: Tensor
) -> None:
    """A packed batch is one row ``[1, total]`` without padding, positions restarting at 0 at every record."""
    if position_ids is None:
        raise ValueError("a packed batch (cu_seqlens) needs position_ids restarting at 0 for every record")
    if input_ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row [1, total], got input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("a packed batch has no padding: pass attention_mask=None (or all ones)")
    starts = cu_seqlens[:-1].long()
    if bool((position_ids.reshape(-1)[starts[starts < input_ids.shape[1]]] != 0).any()):
        raise ValueError("position_ids must be 0 at every record start cu_seqlens[i] of a packed batch")


def _enable_gradient_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder block (hidden states keep their graph; hooks stay outside)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing (model.gradient_checkpointing)")
