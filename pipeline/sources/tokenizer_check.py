"""Is a checkpoint's tokenizer plausibly the model's own? Checked before anything is built on it.

A tokenizer can be silently wrong: transformers' GGUF import once rebuilt a SentencePiece
vocabulary whose tokenizer split text into single characters, and the only sign was a library
log line. A baseline, a calibration and published variants were then built on character-level
text. So:

- **GGUF sources** (``match_gguf``): the imported tokenizer, read back from the fetched
  checkpoint, must give token for token the ids llama.cpp gives from the GGUF's own vocabulary on
  a fixed text set (``fixed_texts``), and its vocabulary must be the GGUF's, id for id. The same
  comparison (``compare_tokenizers``) is what the ``gguf_fidelity`` stage runs on the eval text
  for the F16 conversion.
- **Every source** (``check_granularity``): a subword tokenizer whose vocabulary holds many
  multi-character pieces makes at least ``MIN_BYTES_PER_TOKEN`` UTF-8 bytes per token on prose;
  one that makes about one per token is using none of them (character-level), so it is broken.
- **Every baseline** (``check_baseline_perplexity``): perplexity is compared with the vocabulary
  size, the perplexity of a uniform guess (see ``MAX_PPL_OVER_VOCAB``).
- **Library warnings that signal corruption** (``corruption_is_an_error``) are raised as errors.

Every refusal is a ``SourceError``: one line saying what looks wrong and what to do.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import SourceError

# Why bytes rather than characters: on ASCII text they are the same, and a real tokenizer on
# English prose makes 3.5-4.5 per token (SmolLM2: 4.1 on WikiText-2), the tests' 512-entry BPE
# about 2.3; a character-level split makes 1.0 (byte fallback can only lower it). Characters
# would misjudge CJK text, where good tokenizers make 1-1.5 characters per token (but 3-4.5
# bytes). 1.5 sits well clear of both sides.
MIN_BYTES_PER_TOKEN = 1.5
# The granularity bound is only meaningful for a vocabulary that has subword pieces to use: a
# byte- or character-level model (a vocabulary of ~256 single units) is character-level by design.
MIN_SUBWORD_PIECES = 256
# A model that knows nothing but the vocabulary guesses uniformly: perplexity = vocabulary size.
# Random weights sit just above it (logits of small variance σ² give V·exp(σ²/2): 1.01·V for the
# tests' tiny random Llama), so "above V" would refuse them. A trained model fed text cut by a
# wrong tokenizer is confidently wrong and lands far above V. Twice V leaves random-weight
# models their margin and is impossible for a sane model-and-tokenizer pair.
MAX_PPL_OVER_VOCAB = 2.0

# Prose for the granularity check and, with the awkward strings below, the GGUF comparison.
# Written for this project (plain English, numbers, punctuation), fixed so the fetch stage's
# result depends on the source alone.
PROSE = (
    "The river had been rising for three days before anyone in the village thought to move the "
    "boats. On the fourth morning the water reached the steps of the old mill, and the miller, "
    "who had seen two floods in his sixty years, walked down to the bank with a lantern and a "
    "length of rope. He tied the smallest boat to the iron ring by the door, then stood for a "
    "long time watching the current carry branches, a wooden gate and, once, a startled hen.\n\n"
    "By noon the school had closed and the children were helping to carry sacks of grain to the "
    "upper floor of the church. The baker lent his cart; the blacksmith lent his horse, which did "
    "not care for water and had to be led with a bucket of oats. In the evening the rain stopped, "
    "and the sky over the hills turned the colour of a bruised plum. People said the worst was "
    "over, although nobody believed it.\n\n"
    "In 1952 the council built a stone embankment 2.4 metres high along 800 metres of the bank, at "
    "a cost of about £31,000. It has held ever since. Today the mill is a museum, open from April "
    "to October, and the iron ring by its door is still there, worn smooth on one side."
)


# Strings every tokenizer check covers beside the eval text: whitespace runs, unicode, digits,
# special tokens, byte sequences that are not valid words.
AWKWARD_STRINGS = (
    "Hello  world\t\ttabs\n\n\nnewlines\r\n",
    "   leading spaces", "trailing spaces   ", " ", "\n",
    "naïve café Ünïcödé ß ﬁ 日本語 中文 한국어 Ελληνικά русский العربية עברית",
    "emoji 🙂👍🏽 🇫🇷 ZWJ 👩‍👩‍👧",
    "1234567890 3.14159 1,000,000 0x1F 2026-11-28",
    "don't won't I'm you're we've they'll she'd",
    "\u00a0nbsp\u200bzero-width\u2028line-sep",
    "x" * 64, "!!!???...,,,;;;",
    "def f(x):\n    return x ** 2  # code\n",
)


def fixed_texts() -> list[str]:
    """The fixed text set every tokenizer check at fetch covers: ``PROSE`` and the awkward strings
    the GGUF stages also check (whitespace runs, unicode, digits, code)."""
    return [PROSE, *AWKWARD_STRINGS]


# --- llama.cpp against Hugging Face --------------------------------------------------------------


def compare_tokenizers(model: Path, hf, texts: list[str]) -> dict:
    """Token ids of each text from llama.cpp (the GGUF's vocabulary) and from ``hf``.

    Returns:
        ``{texts, tokens, mismatches, first: [{text, position, gguf, hf}]}`` (first three).
    """
    from pipeline.toolchains import llamacpp as toolchain

    llama_cpp = toolchain.import_bindings(toolchain.find())
    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        first: list[dict[str, Any]] = []
        mismatches, total = 0, 0
        for text in texts:
            ours = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            theirs = hf(text, add_special_tokens=False)["input_ids"]
            total += len(theirs)
            if ours != theirs:
                mismatches += 1
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                if len(first) < 3:
                    first.append({"text": text[:60], "position": at, "gguf": ours[at : at + 5], "hf": theirs[at : at + 5]})
    finally:
        vocab.close()
    return {"texts": len(texts), "tokens": total, "mismatches": mismatches, "first": first}


def match_gguf(gguf: Path, hf, gguf_tokens: list[str], *, where: str) -> dict:
    """Refuse an imported tokenizer that is not the GGUF's: a vocabulary that differs id by id
    (holes, shifted or missing entries) or ids that differ from llama.cpp's on ``fixed_texts``.

    Returns:
        ``compare_tokenizers``' summary (for the fetch stage's record).

    Raises:
        SourceError: naming the first differences.
    """
    fix = "the GGUF's tokenizer cannot be imported faithfully; use the model's Hugging Face checkpoint instead"
    # Holes are what tokenizers reports only as a log line ("OrderedVocab … contains holes …
    # your vocabulary could be corrupted!"): ids whose token is not the GGUF's.
    wrong = [i for i, token in enumerate(gguf_tokens) if hf.convert_ids_to_tokens(i) != token]
    if wrong:
        shown = ", ".join(f"id {i}: GGUF {gguf_tokens[i]!r}, imported {hf.convert_ids_to_tokens(i)!r}"
                          for i in wrong[:3])
        raise SourceError(
            f"the imported tokenizer's vocabulary differs from the GGUF's at {len(wrong)} of {len(gguf_tokens)} ids "
            f"({shown}): the vocabulary is corrupted", where=where, fix=fix,
        )
    result = compare_tokenizers(gguf, hf, fixed_texts())
    if result["mismatches"]:
        d = result["first"][0]
        raise SourceError(
            f"the imported tokenizer splits {result['mismatches']} of {result['texts']} check texts differently from "
            f"llama.cpp reading the same GGUF (first in {d['text'][:30]!r} at token {d['position']}: llama.cpp "
            f"{d['gguf']}, imported {d['hf']})", where=where, fix=fix,
        )
    return result


# --- plausibility, for every source ------------------------------------------------------------


def granularity(text: str, tokenizer) -> dict:
    """``{tokens, chars_per_token, bytes_per_token}`` of ``tokenizer`` on ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = max(len(ids), 1)
    return {"tokens": len(ids), "chars_per_token": round(len(text) / n, 3),
            "bytes_per_token": round(len(text.encode("utf-8")) / n, 3)}


def subword_pieces(tokenizer) -> int:
    """How many vocabulary entries are longer than one unit (special tokens and ``<0xNN>`` byte
    fallbacks left out): the pieces a subword tokenizer has to merge characters with."""
    special = set(tokenizer.all_special_tokens)
    byte = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    return sum(1 for piece in tokenizer.get_vocab()
               if len(piece) > 1 and piece not in special and not byte.match(piece))


def check_granularity(text: str, tokenizer, *, what: str, where: str) -> dict:
    """Refuse a tokenizer that cuts ``text`` (nearly) into single characters although its
    vocabulary holds subword pieces.

    Returns:
        ``granularity`` of the text plus ``subword_pieces``.

    Raises:
        SourceError: fewer than ``MIN_BYTES_PER_TOKEN`` bytes per token.
    """
    stats = {**granularity(text, tokenizer), "subword_pieces": subword_pieces(tokenizer)}
    if stats["subword_pieces"] >= MIN_SUBWORD_PIECES and stats["bytes_per_token"] < MIN_BYTES_PER_TOKEN:
        raise SourceError(
            f"the tokenizer cuts {what} into {stats['chars_per_token']:.2f} characters "
            f"({stats['bytes_per_token']:.2f} UTF-8 bytes) per token although its vocabulary holds "
            f"{stats['subword_pieces']} multi-character pieces; a working subword tokenizer makes at least "
            f"{MIN_BYTES_PER_TOKEN}: the tokenizer looks character-level (corrupted)", where=where,
            fix="check the source's tokenizer files (tokenizer.json, tokenizer.model) against the model's own",
        )
    return stats


def check_baseline_perplexity(ppl: float, vocab: int, *, where: str) -> None:
    """Refuse a baseline perplexity no sane model-and-tokenizer pair produces (see
    ``MAX_PPL_OVER_VOCAB``).

    Raises:
        SourceError: perplexity above ``MAX_PPL_OVER_VOCAB`` × the vocabulary size, or not finite.
    """
    if not ppl < MAX_PPL_OVER_VOCAB * vocab:  # also catches NaN
        raise SourceError(
            f"baseline perplexity {ppl:.1f} is above {MAX_PPL_OVER_VOCAB:g} x the vocabulary size ({vocab}), far worse "
            "than guessing uniformly: the tokenizer or the weights do not belong to this model", where=where,
            fix="check the source's tokenizer and weights; nothing was built on this baseline",
        )


# --- library warnings --------------------------------------------------------------------------

# What transformers and tokenizers say when a tokenizer they built or loaded is damaged.
_CORRUPTION = re.compile(
    r"corrupt|contains holes|could not extract sentencepiece|falling back to tiktoken", re.IGNORECASE
)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _CORRUPTION.search(message):
            self.messages.append(message)


@contextlib.contextmanager
def corruption_is_an_error(where: str):
    """Run the block; if transformers or tokenizers warned (logging or ``warnings``) that what
    they built may be corrupt, raise that warning as a ``SourceError``.

    transformers logs through its own logger, which does not propagate to the root logger, so the
    handler goes on it directly.
    """
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("transformers", "tokenizers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = handler.messages
    for w in caught:
        if _CORRUPTION.search(str(w.message)):
            messages.append(str(w.message))
        else:  # not ours to judge: shown as it would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if messages:
        raise SourceError(
            f"the tokenizer library reported a corrupted tokenizer: {messages[0][:300]}", where=where,
            fix="check the source's tokenizer files; a model is never built on a tokenizer reported as corrupted",
        )
