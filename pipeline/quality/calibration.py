"""Calibration samples: from a local text file or a Hugging Face dataset, picked with a seed.

The text (file content, or a dataset column joined with blank lines) is tokenized with the
model's tokenizer as one stream, cut into non-overlapping ``seq_len`` windows, and ``samples``
of them are drawn with ``random.Random(seed)``: two runs pick the same samples. With
``chat_template`` each window's text is wrapped as a user turn of the model's chat template.
"""

from __future__ import annotations

import random
from typing import Any

from pipeline.errors import DataError
from pipeline.hashing import digest_json, sha256_file
from pipeline.quality.corpus import read_text


def calibration_digest(cal) -> tuple[str, dict[str, Any]]:
    """A digest of the calibration text and a description of where it came from (plan time).

    Raises:
        DataError: missing file or dataset.
    """
    if cal.path is not None:
        read_text(cal.path, what="calibration.path")
        return sha256_file(cal.path), {"path": str(cal.path)}
    texts = _dataset_texts(cal.dataset)
    return digest_json(texts), {"dataset": cal.dataset.model_dump(exclude_none=True), "rows": len(texts)}


def _dataset_texts(spec) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("calibration.dataset needs the 'datasets' package", where="calibration.dataset",
                        fix="pip install 'modelbuild[llmcompressor]'") from None
    kwargs = {k: v for k, v in {"name": spec.name, "data_files": spec.data_files, "revision": spec.revision}.items() if v}
    try:
        ds = datasets.load_dataset(spec.path, split=spec.split, **kwargs)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise DataError(f"cannot load dataset {spec.path!r}: {type(e).__name__}: {e}", where="calibration.dataset",
                        fix="check path/name/split, or pre-populate the datasets cache when offline") from None
    if spec.column not in ds.column_names:
        raise DataError(f"dataset {spec.path!r} has no column {spec.column!r} (columns: {ds.column_names})",
                        where="calibration.dataset.column", fix="name the text column")
    return [t for t in ds[spec.column] if isinstance(t, str) and t.strip()]


def calibration_samples(cal, *, samples: int, seq_len: int, seed: int, tokenizer) -> list[list[int]]:
    """Token id lists, ``samples`` of them, each at most ``seq_len`` long.

    Raises:
        DataError: fewer than ``samples`` windows of ``seq_len`` tokens in the text.
    """
    text = read_text(cal.path, what="calibration.path") if cal.path is not None else "\n\n".join(_dataset_texts(cal.dataset))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows < samples:
        raise DataError(
            f"calibration text too short: {len(ids)} tokens make {windows} windows of {seq_len}, "
            f"{samples} samples requested",
            where="calibration",
            fix="lower samples or seq_len, or use more text",
        )
    picked = sorted(random.Random(seed).sample(range(windows), samples))
    out = [ids[w * seq_len : (w + 1) * seq_len] for w in picked]
    if cal.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("calibration.chat_template is set but the model has no chat template",
                            where="calibration.chat_template", fix="set it to false")
        out = [
            _as_ids(tokenizer.apply_chat_template([{"role": "user", "content": tokenizer.decode(w)}], tokenize=True))[:seq_len]
            for w in out
        ]
    return out


def _as_ids(encoded) -> list[int]:
    # apply_chat_template returns a list of ids, or a BatchEncoding in newer transformers.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
