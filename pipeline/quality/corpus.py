"""Eval and calibration text: read, tokenize, cut into windows."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError


def read_text(path: Path, *, what: str) -> str:
    """Read a UTF-8 corpus file.

    Raises:
        DataError: missing, unreadable or empty file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}", where=what, fix="check the path in the recipe") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} file {path}: {e}", where=what, fix="give a UTF-8 text file") from None
    if not text.strip():
        raise DataError(f"{what} file is empty: {path}", where=what, fix="give a file with text in it")
    return text


def token_windows(text: str, tokenizer, *, tokens: int, seq_len: int, where: str):
    """The first ``tokens`` tokens of ``text`` as a ``[windows, seq_len]`` int64 tensor.

    Only a prefix of the text is tokenized (doubled until long enough), with a margin so the cut
    never falls inside the last kept token.

    Raises:
        DataError: the text holds fewer than ``tokens`` tokens.
    """
    import torch

    need = (tokens // seq_len) * seq_len
    ids = _prefix_ids(text, tokenizer, tokens)
    # Against what the recipe asks, not the rounded-down windows: a corpus of fewer tokens than
    # eval.tokens would otherwise be gated on what there is without a word.
    if len(ids) < tokens:
        raise DataError(
            f"eval corpus too short: it has {len(ids)} tokens, eval.tokens asks {tokens}",
            where=where,
            fix="lower eval.tokens or use a longer corpus",
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(-1, seq_len)


def _prefix_ids(text: str, tokenizer, tokens: int) -> list[int]:
    """Token ids of a prefix of ``text`` holding at least ``tokens`` tokens (all of it when it
    holds fewer), with a margin so the cut never falls inside the last kept token."""
    margin = 64
    chars = max(tokens * 8, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens + margin or chars >= len(text):
            return ids
        chars *= 2


def check_eval_tokens(recipe, checkpoint: Path | None, *, identity: dict, corpus_sha256: str,
                      memo: Path | None) -> None:
    """Plan time: the eval corpus must hold ``eval.tokens`` tokens of the model's own tokenizer,
    refused before the fetch rather than at the baseline after it. ``checkpoint`` is a folder
    holding the tokenizer without a download (a local source, a cached fetch), else None and the
    baseline checks. A pass is remembered in ``memo`` for this source, corpus and tool versions.

    Raises:
        DataError: fewer tokens than asked.
    """
    if checkpoint is None:
        return
    from pipeline.hashing import digest_json
    from pipeline.toolchains import tool_version

    ev = recipe.eval
    token = digest_json({"check": "eval_tokens", "source": identity, "corpus": corpus_sha256, "tokens": ev.tokens,
                         "tools": {t: tool_version(t) for t in ("transformers", "tokenizers")}})
    if memo is not None and (memo / token).exists():
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=recipe.source.trust_remote_code)
    except Exception:  # noqa: BLE001 - fetch and baseline load it again and refuse it with their own line
        return
    count = len(_prefix_ids(read_text(ev.corpus, what="eval.corpus"), tokenizer, ev.tokens))
    if count < ev.tokens:
        raise DataError(f"eval corpus too short: it has {count} tokens, eval.tokens asks {ev.tokens}",
                        where="eval.corpus", fix="lower eval.tokens or use a longer corpus")
    if memo is not None:
        memo.mkdir(parents=True, exist_ok=True)
        (memo / token).touch()
