"""Where a causal LM keeps its decoder blocks and final norm, and how a forward hook reads a layer's output.

A leaf: :class:`alignx.model.AlignXModel` (its contrastive and language-matching hooks) and the recipes that encode
a separate forward at one layer (:func:`alignx.recipes.afp.encode_layer`) share these, so both read HF's
``hidden_states[k]`` the same way: block ``k``'s output for ``1 <= k < N``, the final-norm output for ``k = N``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = [
    "LAYER_PATHS",
    "NORM_PATHS",
    "ROOT_PATHS",
    "ModelLayoutError",
    "find_decoder_parts",
    "first_output",
    "layer_module",
]

# Attribute paths tried, in order, on the decoder module (``get_decoder()``, then common wrappers, then the model).
LAYER_PATHS = ("layers", "h", "blocks", "block", "decoder.layers", "model.layers", "transformer.h")
NORM_PATHS = (
    "norm",
    "final_layernorm",
    "final_layer_norm",
    "ln_f",
    "norm_f",
    "final_norm",
    "decoder.final_layer_norm",
    "model.norm",
    "transformer.ln_f",
)
ROOT_PATHS = ("model", "transformer", "gpt_neox", "decoder")


class ModelLayoutError(ValueError):
    """The decoder blocks or the final norm of a model could not be located."""


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_parts(lm: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """``(decoder blocks, final norm)`` of a causal LM, found without knowing its class.

    Tries ``lm.get_decoder()`` (the HF accessor) first, then the usual wrapper attributes (``model``,
    ``transformer``, ``gpt_neox``, ``decoder``) and ``lm`` itself; on each, the blocks are the first non-empty
    ``nn.ModuleList`` among :data:`LAYER_PATHS` and the norm the first module among :data:`NORM_PATHS`.

    Raises:
        ModelLayoutError: naming the model class and what was looked for.
    """
    roots: list[nn.Module] = []
    get_decoder = getattr(lm, "get_decoder", None)
    if callable(get_decoder):
        try:
            roots.append(get_decoder())
        except Exception:  # some wrappers raise instead of returning None
            pass
    roots += [m for m in (_get_path(lm, p) for p in ROOT_PATHS) if isinstance(m, nn.Module)]
    roots.append(lm)
    for root in roots:
        layers = next(
            (x for x in (_get_path(root, p) for p in LAYER_PATHS) if isinstance(x, nn.ModuleList) and len(x) > 0),
            None,
        )
        norm = next((x for x in (_get_path(root, p) for p in NORM_PATHS) if isinstance(x, nn.Module)), None)
        if layers is not None and norm is not None:
            return layers, norm
    raise ModelLayoutError(
        f"{type(lm).__name__}: cannot find the decoder blocks (an nn.ModuleList at one of {LAYER_PATHS}) and the final "
        f"norm (one of {NORM_PATHS}) on get_decoder(), {ROOT_PATHS} or the model itself"
    )


def layer_module(layers: nn.ModuleList, final_norm: nn.Module, layer: int) -> nn.Module:
    """The module whose output is HF's ``hidden_states[layer]`` (1-based): block ``layer``, or the final norm for
    ``layer = N`` (HF's last hidden state is the normed one, not block N's raw output).

    Raises:
        ValueError: ``layer`` outside ``1..N``.
    """
    n = len(layers)
    if not 1 <= layer <= n:
        raise ValueError(f"layer={layer} is outside 1..{n}")
    return layers[layer - 1] if layer < n else final_norm


def first_output(output: Any) -> Tensor:
    """The hidden state ``[B, T, D]`` in a decoder module's forward output (blocks return tuples, norms a tensor)."""
    return output[0] if isinstance(output, (tuple, list)) else output
