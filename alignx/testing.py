"""Offline fixtures: a small trained tokenizer, tiny random causal LMs, tiny model directories and synthetic pairs.

Nothing here touches the hub. Everything is deterministic: the tokenizer is a byte-level BPE trained with
``tokenizers`` on :data:`CORPUS` (about a hundred lines of multilingual text embedded below plus the Alpaca
template), the models are random-initialised from a seed, and :func:`write_pairs_jsonl` draws from fixed
sentence tables with a seeded generator.

- :func:`test_tokenizer` -- ``PreTrainedTokenizerFast`` with ``<s>`` (BOS, added by the post-processor, as
  Llama's), ``</s>`` (EOS), ``<pad>`` and ``<unk>``; byte-level, so every string round-trips; offsets supported.
- :func:`tiny_causal_lm` -- a random fp32 ``llama`` / ``qwen2`` / ``gemma3`` (text) causal LM.
- :func:`tiny_model_dir` -- tokenizer + tiny model saved as an HF directory (exercises the normal loading path).
- :func:`tiny_pretrained` -- resolves the packaged names ``tiny-llama``, ``tiny-qwen2``, ``tiny-gemma3`` to such a
  directory under a cache directory, created once (atomically, so concurrent ranks agree).
- :func:`write_pairs_jsonl` / :func:`write_instructions_jsonl` -- stage-1 / stage-2 records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignx.constants import DEFAULT_INSTRUCTION
from alignx.languages import lang_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "ARCHS",
    "CORPUS",
    "PARALLEL",
    "TINY_MODELS",
    "test_tokenizer",
    "tiny_causal_lm",
    "tiny_model_dir",
    "tiny_pretrained",
    "write_instructions_jsonl",
    "write_pairs_jsonl",
]

# Not a test: keep pytest from collecting ``test_tokenizer`` when a test module imports it by name.
__test__ = False

ARCHS = ("llama", "qwen2", "gemma3")
TINY_MODELS: dict[str, str] = {f"tiny-{arch}": arch for arch in ARCHS}
"""Packaged tiny model names -> architecture."""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
TOKENIZER_VOCAB_SIZE = 1024

# Parallel sentences (English first) in the languages the tests use. Short, plausible, public-domain style.
PARALLEL: dict[str, list[str]] = {
    "en": [
        "In the beginning was the Word.",
        "The light shines in the darkness.",
        "She reads a book every evening.",
        "We will meet at the market tomorrow.",
        "The children are playing in the garden.",
        "Water is life, and the river is our friend.",
        "He walked to the village before sunrise.",
        "Please close the door when you leave.",
        "The teacher asked a difficult question.",
        "Our family eats dinner together on Sunday.",
        "The rain stopped and the sun came out.",
        "I do not understand this sentence.",
    ],
    "sw": [
        "Hapo mwanzo kulikuwako Neno.",
        "Nuru yang'aa gizani.",
        "Yeye husoma kitabu kila jioni.",
        "Tutakutana sokoni kesho.",
        "Watoto wanacheza bustanini.",
        "Maji ni uhai, na mto ni rafiki yetu.",
        "Alitembea hadi kijijini kabla ya jua kuchomoza.",
        "Tafadhali funga mlango unapoondoka.",
        "Mwalimu aliuliza swali gumu.",
        "Familia yetu hula chakula cha jioni pamoja Jumapili.",
        "Mvua ilikoma na jua likatoka.",
        "Sielewi sentensi hii.",
    ],
    "hi": [
        "आदि में वचन था।",
        "ज्योति अन्धकार में चमकती है।",
        "वह हर शाम एक किताब पढ़ती है।",
        "हम कल बाज़ार में मिलेंगे।",
        "बच्चे बगीचे में खेल रहे हैं।",
        "पानी जीवन है, और नदी हमारी मित्र है।",
        "वह सूर्योदय से पहले गाँव तक पैदल गया।",
        "कृपया जाते समय दरवाज़ा बंद कर दें।",
        "शिक्षक ने एक कठिन प्रश्न पूछा।",
        "हमारा परिवार रविवार को साथ में खाना खाता है।",
        "बारिश रुक गई और सूरज निकल आया।",
        "मैं यह वाक्य नहीं समझता।",
    ],
    "fr": [
        "Au commencement était la Parole.",
        "La lumière brille dans les ténèbres.",
        "Elle lit un livre chaque soir.",
        "Nous nous retrouverons au marché demain.",
        "Les enfants jouent dans le jardin.",
        "L'eau, c'est la vie, et la rivière est notre amie.",
        "Il a marché jusqu'au village avant l'aube.",
        "Fermez la porte en partant, s'il vous plaît.",
        "Le professeur a posé une question difficile.",
        "Notre famille dîne ensemble le dimanche.",
        "La pluie a cessé et le soleil est apparu.",
        "Je ne comprends pas cette phrase.",
    ],
    "zh": [
        "太初有道。",
        "光照在黑暗里。",
        "她每天晚上读一本书。",
        "我们明天在市场见面。",
        "孩子们在花园里玩耍。",
        "水是生命，河流是我们的朋友。",
        "他在日出之前走到了村子。",
        "离开时请关门。",
        "老师问了一个很难的问题。",
        "我们一家人星期天一起吃晚饭。",
        "雨停了，太阳出来了。",
        "我不明白这个句子。",
    ],
    "ja": [
        "初めに言があった。",
        "光は暗闇の中で輝いている。",
        "彼女は毎晩本を読みます。",
        "明日、市場で会いましょう。",
        "子どもたちは庭で遊んでいます。",
        "水は命であり、川は私たちの友です。",
        "彼は日の出前に村まで歩いた。",
        "出るときはドアを閉めてください。",
        "先生は難しい質問をした。",
        "私たちの家族は日曜日に一緒に夕食を食べます。",
        "雨がやんで、太陽が出てきた。",
        "この文が分かりません。",
    ],
    "vi": [
        "Ban đầu có Ngôi Lời.",
        "Ánh sáng chiếu trong bóng tối.",
        "Cô ấy đọc một cuốn sách mỗi tối.",
        "Chúng ta sẽ gặp nhau ở chợ vào ngày mai.",
        "Bọn trẻ đang chơi trong vườn.",
        "Nước là sự sống, và dòng sông là bạn của chúng ta.",
        "Anh ấy đi bộ đến làng trước khi mặt trời mọc.",
        "Xin hãy đóng cửa khi bạn rời đi.",
        "Giáo viên đã hỏi một câu hỏi khó.",
        "Gia đình chúng tôi ăn tối cùng nhau vào Chủ nhật.",
        "Mưa đã tạnh và mặt trời ló ra.",
        "Tôi không hiểu câu này.",
    ],
    "ar": [
        "في البدء كان الكلمة.",
        "النور يضيء في الظلمة.",
        "هي تقرأ كتابا كل مساء.",
        "سنلتقي في السوق غدا.",
        "الأطفال يلعبون في الحديقة.",
        "الماء حياة، والنهر صديقنا.",
        "مشى إلى القرية قبل شروق الشمس.",
        "من فضلك أغلق الباب عندما تغادر.",
        "سأل المعلم سؤالا صعبا.",
        "تتناول عائلتنا العشاء معا يوم الأحد.",
        "توقف المطر وخرجت الشمس.",
        "لا أفهم هذه الجملة.",
    ],
    "es": [
        "En el principio era el Verbo.",
        "La luz resplandece en las tinieblas.",
        "Ella lee un libro cada noche.",
        "Nos veremos en el mercado mañana.",
        "Los niños juegan en el jardín.",
        "El agua es vida, y el río es nuestro amigo.",
        "Caminó hasta el pueblo antes del amanecer.",
        "Por favor, cierra la puerta al salir.",
        "El maestro hizo una pregunta difícil.",
        "Nuestra familia cena junta los domingos.",
        "La lluvia paró y salió el sol.",
        "No entiendo esta oración.",
    ],
}

_EXTRA = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nTranslate the following sentence from English to Swahili.\n\n### Input:\n",
    "### Response:\n",
    "Thank you 🙏 see you soon 😀👍🏽 — ça va? 안녕하세요. Привет, как дела? Xin chào! नमस्ते।",
    "Numbers 1, 2, 3 and 2024; e-mail: name@example.org; C'est l'été. Don't worry, it's fine.",
]

CORPUS: list[str] = [s for sents in PARALLEL.values() for s in sents] + _EXTRA
"""The training text of :func:`test_tokenizer` (also a source of realistic strings for tests)."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the result is a JSON string (cheap to rebuild from)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the template lines so its phrases become single tokens, as in real tokenizers.
    tok.train_from_iterator(CORPUS + _EXTRA[:4] * 8, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def test_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh deterministic byte-level BPE tokenizer (vocab <= 1024) that adds ``<s>`` like Llama.

    Special tokens: ``<unk>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<pad>`` 3. Each call returns a new object
    (built from a per-process cached JSON), so a test that changes padding side or special tokens cannot leak into
    another one.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=4096,
    )
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Tiny models


def _tiny_config(arch: str, vocab_size: int, num_layers: int, hidden: int, special: dict[str, int]) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    heads = max(2, hidden // 16)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **special,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        # Gemma 3 interleaves sliding-window and global layers (5:1 in the real models); keep both kinds.
        layer_types = ["sliding_attention"] * num_layers
        layer_types[-1] = "full_attention"
        return Gemma3TextConfig(
            **common,
            head_dim=hidden // heads,
            query_pre_attn_scalar=hidden // heads,
            sliding_window=64,
            layer_types=layer_types,
        )
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int | None = None,
    num_layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    **overrides: Any,
) -> PreTrainedModel:
    """A random-initialised fp32 HF causal LM of architecture ``arch`` in {"llama", "qwen2", "gemma3"}.

    ``vocab_size`` defaults to the size of :func:`test_tokenizer`; BOS/EOS/PAD ids match it. Initialisation is
    seeded (``seed``) without touching the global RNG state. ``overrides``: further config values (e.g.
    ``tie_word_embeddings=True``, Gemma's ``final_logit_softcapping=30.0``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden % 16:
        raise ValueError(f"hidden must be a multiple of 16 (head dim 16), got {hidden}")
    tok = test_tokenizer()
    vocab_size = len(tok) if vocab_size is None else vocab_size
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = _tiny_config(arch, vocab_size, num_layers, hidden, special)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.float().eval()


def tiny_model_dir(arch: str, path: str | Path, *, num_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Save :func:`test_tokenizer` and ``tiny_causal_lm(arch, ...)`` as an HF model directory at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    test_tokenizer().save_pretrained(path)
    tiny_causal_lm(arch, num_layers=num_layers, hidden=hidden, seed=seed).save_pretrained(path)
    return path


def _fixture_version() -> str:
    """Hash of what a tiny model directory is made of (tokenizer, config code, library versions)."""
    import inspect

    import transformers

    h = hashlib.sha256(_tokenizer_json().encode())
    h.update(inspect.getsource(_tiny_config).encode())
    h.update(transformers.__version__.encode())
    return h.hexdigest()[:10]


def tiny_pretrained(name: str, cache_dir: str | Path | None = None) -> Path:
    """Directory of the packaged tiny model ``name`` ("tiny-llama", "tiny-qwen2", "tiny-gemma3").

    Created on first use as ``<cache_dir>/<name>-<version>`` (default cache ``~/.cache/alignx``; the version hashes
    the tokenizer and the config code, so a stale directory is never reused) in a temporary directory that is then
    renamed into place, so several processes asking at once all end with the same complete directory.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; valid: {', '.join(TINY_MODELS)}")
    root = Path(cache_dir or os.path.join(Path.home(), ".cache", "alignx")).expanduser()
    final = root / f"{name}-{_fixture_version()}"
    if (final / "config.json").is_file() and (final / "tokenizer.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        tiny_model_dir(TINY_MODELS[name], tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its (identical) directory first.
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------------
# Synthetic records


def _pair_texts(src: str, tgt: str, rng: random.Random, seen: set | None = None) -> tuple[str, str]:
    """One parallel pair, sometimes two consecutive sentences joined (so lengths vary).

    With ``seen``, a pair already drawn in that direction is drawn again (until the 2 x 12 pairs of the direction are
    used up): the fixtures hold no exact duplicates, which preprocessing would remove (alignx.data.records)."""
    n = len(PARALLEL["en"])
    while True:
        i = rng.randrange(n)
        joined = rng.random() < 0.3
        if seen is None or (src, tgt, i, joined) not in seen or sum(k[:2] == (src, tgt) for k in seen) >= 2 * n:
            break
    if seen is not None:
        seen.add((src, tgt, i, joined))
    if joined:
        j = (i + 1) % n
        return (PARALLEL[src][i] + " " + PARALLEL[src][j], PARALLEL[tgt][i] + " " + PARALLEL[tgt][j])
    return PARALLEL[src][i], PARALLEL[tgt][i]


def write_pairs_jsonl(path: str | Path, n: int, langs: tuple[str, ...] = ("sw", "hi"), seed: int = 0) -> Path:
    """Write ``n`` stage-1 records ``{src_text, tgt_text, src_lang, tgt_lang}`` to ``path`` (JSONL).

    Pairs are English <-> one of ``langs`` (both directions, alternating), drawn from fixed parallel sentence
    tables with ``random.Random(seed)``. Available languages: the keys of :data:`PARALLEL`.
    """
    bad = [lang for lang in (*langs, "en") if lang not in PARALLEL]
    if bad:
        raise ValueError(f"no test sentences for {bad}; available: {', '.join(PARALLEL)}")
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set = set()
    with path.open("w", encoding="utf-8") as f:
        for k in range(n):
            other = langs[k % len(langs)]
            src, tgt = ("en", other) if (k // len(langs)) % 2 == 0 else (other, "en")
            src_text, tgt_text = _pair_texts(src, tgt, rng, seen)
            rec = {"src_text": src_text, "tgt_text": tgt_text, "src_lang": src, "tgt_lang": tgt}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def write_instructions_jsonl(path: str | Path, n: int, langs: tuple[str, ...] = ("sw", "hi"), seed: int = 0) -> Path:
    """Write ``n`` stage-2 records ``{instruction, input, output, lang}``: translation instructions (with input)
    alternating with no-input instructions (empty ``input``)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[int, set] = {0: set(), 1: set()}  # per kind (translate / repeat): no exact duplicate record
    with path.open("w", encoding="utf-8") as f:
        for k in range(n):
            lang = langs[k % len(langs)]
            src_text, tgt_text = _pair_texts("en", lang, rng, seen[k % 2])
            if k % 2 == 0:
                rec = {
                    "instruction": DEFAULT_INSTRUCTION.format(src="English", tgt=_lang_name(lang)),
                    "input": src_text,
                    "output": tgt_text,
                    "lang": lang,
                }
            else:
                rec = {"instruction": f"Repeat this sentence: {tgt_text}", "input": "", "output": tgt_text}
                rec["lang"] = lang
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def _lang_name(code: str) -> str:
    return lang_name(code)


# pytest collects any imported callable named test_*; this one is a fixture factory, not a test.
test_tokenizer.__test__ = False  # type: ignore[attr-defined]
