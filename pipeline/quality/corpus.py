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
        DataError: the text holds fewer tokens than requested.
    """
    import torch

    need = (tokens // seq_len) * seq_len
    margin = 64
    chars = max(need * 8, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need + margin or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise DataError(
            f"corpus too short: {len(ids)} tokens, the recipe asks for {need} ({tokens} rounded down to "
            f"{seq_len}-token windows)",
            where=where,
            fix="lower eval.tokens or use a longer corpus",
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(-1, seq_len)
