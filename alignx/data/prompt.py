"""Prompt rendering that knows where the source and the target sit, in characters.

The reference template is Alpaca-LoRA's ``alpaca.json`` (used by the official AlignX code)::

    <BOS> + "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\\n\\n### Instruction:\\n" + instruction
          + "\\n\\n### Input:\\n" + input + "\\n\\n### Response:\\n" + output + <EOS>

and, without input, ``prompt_no_input`` (no "### Input:" block). BOS and EOS are tokens, added at tokenisation
(:mod:`alignx.data.tokenize`), not characters of the text.

A custom template is a JSON file with the same keys and placeholders as ``alpaca.json``::

    {"prompt_input": "...{instruction}...{input}...", "prompt_no_input": "...{instruction}..."}

``prompt_input`` must hold ``{input}`` exactly once and may hold ``{instruction}`` once; ``prompt_no_input``
(optional; needed only for stage-2 records without input) may hold ``{instruction}`` once and no ``{input}``.
Literal braces are written ``{{`` and ``}}``. The response (``output``) always follows the rendered prompt
directly. Other keys (e.g. ``description``, ``response_split``) are ignored.

:meth:`Template.render` returns the text and the character ranges ``[start, end)`` of the input (the source ``x``)
and of the output (the target ``y``); the token spans are derived from these ranges and the tokenizer's offsets.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from alignx.data.records import DataError
from alignx.languages import lang_name

__all__ = ["ALPACA", "Segment", "Template", "instruction_text", "load_template"]

_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Segment:
    """A text to tokenise and where its parts are (character ranges ``[start, end)`` into ``text``).

    ``source`` is the range of the source (a template's input; empty ``(p, p)`` for the no-input variant),
    ``target`` the range of the target (a template's output, which then ends the text). A record format renders its
    records to segments (:mod:`alignx.data.formats`); the token regions come from these ranges
    (:func:`alignx.data.segments.token_regions`).
    """

    text: str
    source: tuple[int, int] = (0, 0)
    target: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Template:
    """A prompt template with ``{instruction}`` / ``{input}`` placeholders (see the module docstring)."""

    prompt_input: str
    prompt_no_input: str | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_fields(self.prompt_input, {"input"}, {"instruction"}, f"template {self.name!r} prompt_input")
        if self.prompt_no_input is not None:
            _check_fields(self.prompt_no_input, set(), {"instruction"}, f"template {self.name!r} prompt_no_input")

    def render(self, instruction: str, input: str | None, output: str) -> Segment:
        """``prompt(instruction, input) + output`` with the character ranges of ``input`` and ``output``.

        ``input`` None or "" selects ``prompt_no_input`` (an error if the template has none).
        """
        if input:
            pattern, values = self.prompt_input, {"instruction": instruction, "input": input}
        else:
            if self.prompt_no_input is None:
                raise DataError(f"template {self.name!r} has no prompt_no_input, needed for a record without input")
            pattern, values = self.prompt_no_input, {"instruction": instruction}
        parts: list[str] = []
        pos = 0
        source = None
        for literal, field, _, _ in string.Formatter().parse(pattern):
            parts.append(literal)
            pos += len(literal)
            if field is None:
                continue
            value = values[field]
            if field == "input":
                source = (pos, pos + len(value))
            parts.append(value)
            pos += len(value)
        parts.append(output)
        return Segment("".join(parts), source or (pos, pos), (pos, pos + len(output)))


def _check_fields(pattern: str, required: set[str], optional: set[str], what: str) -> None:
    """Placeholders of ``pattern``: each of ``required`` exactly once, each of ``optional`` at most once."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as e:
        raise DataError(f"{what}: {e} (write literal braces as '{{{{' and '}}}}')") from None
    allowed = required | optional
    for f in fields:
        if f not in allowed:
            raise DataError(f"{what}: unknown placeholder {{{f}}}; allowed: {', '.join(sorted(allowed))}")
    for f in allowed:
        n = fields.count(f)
        if n > 1 or (f in required and n != 1):
            raise DataError(
                f"{what}: placeholder {{{f}}} must appear {'exactly' if f in required else 'at most'} once, found {n}"
            )


ALPACA = Template(
    prompt_input=_PREAMBLE_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    prompt_no_input=_PREAMBLE_NO_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    name="alpaca",
)
"""The reference template (Alpaca-LoRA ``alpaca.json``), character for character."""


def load_template(spec: str) -> Template:
    """``"alpaca"`` (the reference) or the path of a JSON template (``data.template``)."""
    if spec == "alpaca":
        return ALPACA
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data.template={spec!r} is neither 'alpaca' nor an existing JSON file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON template: {e.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt_input"), str):
        raise DataError(f"{path}: a template is a JSON object with a string 'prompt_input'")
    no_input = obj.get("prompt_no_input")
    if no_input is not None and not isinstance(no_input, str):
        raise DataError(f"{path}: 'prompt_no_input' must be a string")
    return Template(obj["prompt_input"], no_input, name=str(path))


def instruction_text(pattern: str, src_lang: str, tgt_lang: str) -> str:
    """``data.instruction`` with ``{src}``/``{tgt}`` replaced by the English language names.

    ``instruction_text("Translate the following sentence from {src} to {tgt}.", "sw", "en")`` ->
    ``"Translate the following sentence from Swahili to English."``
    """
    try:
        return pattern.format(src=lang_name(src_lang), tgt=lang_name(tgt_lang))
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"data.instruction={pattern!r}: only {{src}} and {{tgt}} may be used ({e})") from None
