"""The baseline's cached side of every comparison, written once and read per window.

Files in the baseline stage's cache entry:

- ``reference.safetensors``: ``tokens [W, S]`` (the exact ids every variant is scored on),
  ``target_logprob [W, S-1]``, and per form ``top1``, ``lse16``, ``negentropy [W, S-1]`` (full)
  or ``topk_logprobs`` / ``topk_ids [W, S-1, k]`` (top-k);
- ``logprobs.npy`` (full form only): ``[W, S-1, vocab]`` fp16 in NumPy's ``.npy`` format,
  written and read one window at a time with plain file I/O: neither side holds (or maps) more
  than one window, so memory stays flat however many tokens are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.quality import metrics

TENSORS = "reference.safetensors"
FULL = "logprobs.npy"


def write_reference(out: Path, scored: Iterable, windows, *, vocab: int, top_k: int | None,
                    advance: Callable[[int], None]) -> dict:
    """Store the baseline's side in ``out``.

    Args:
        scored: the baseline's ``(logprobs, next_ids)`` per window of ``windows``, in order.
        vocab: the model's vocabulary size (every distribution must have that many entries).

    Returns:
        ``{ppl, tokens_scored, windows, vocab, form, top_k}``.
    """
    import torch
    from safetensors.torch import save_file

    n, s = windows.shape
    full = _NpyWriter(out / FULL, (n, s - 1, vocab)) if top_k is None else None
    k = top_k or 0  # used only when top_k is set
    per_position: dict[str, list] = {}
    for logprobs, next_ids in scored:
        if logprobs.shape[-1] != vocab:
            raise ValueError(f"logits have {logprobs.shape[-1]} entries, config.vocab_size is {vocab}")
        if full is not None:
            rows, lp16 = metrics.reference_full(logprobs, next_ids)
            full.write(lp16.numpy())
        else:
            target, values, ids = metrics.reference_topk(logprobs, next_ids, k)
            rows = {"target_logprob": target, "topk_logprobs": values, "topk_ids": ids}
        for name, tensor in rows.items():
            per_position.setdefault(name, []).append(tensor)
        advance(1)
    if full is not None:
        full.close()
    tensors = {"tokens": windows.contiguous()}
    tensors.update({name: torch.stack(parts).contiguous() for name, parts in per_position.items()})
    save_file(tensors, str(out / TENSORS))
    target_lp = tensors["target_logprob"]
    return {
        "ppl": metrics.perplexity(target_lp),
        "tokens_scored": int(target_lp.numel()),
        "windows": int(n),
        "vocab": vocab,
        "form": "full" if top_k is None else "top-k",
        "top_k": None if top_k is None else int(tensors["topk_ids"].shape[-1]),
    }


class Reference:
    """Read side of a stored reference."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        self.tensors = load_file(str(folder / TENSORS))
        self.full = _NpyReader(folder / FULL) if (folder / FULL).exists() else None
        self._buffer = None

    @property
    def tokens(self):
        return self.tensors["tokens"]

    def compare(self, i: int, var_logprobs, next_ids):
        """``(target_logprob, kld, same_top1)`` of window ``i``."""
        import torch

        t = self.tensors
        if self.full is not None:
            base16 = torch.from_numpy(self.full.read(i))
            if self._buffer is None:
                self._buffer = torch.empty(base16.shape, dtype=torch.float32)
            rows = {k: t[k][i] for k in ("lse16", "negentropy", "top1")}
            return metrics.compare_full(var_logprobs, next_ids, base16, rows, buffer=self._buffer)
        return metrics.compare_topk(var_logprobs, next_ids, t["topk_logprobs"][i], t["topk_ids"][i])

    @staticmethod
    def describe(result: dict) -> str:
        """How the KLD was computed, for manifests."""
        if result["form"] == "full":
            return ("exact KL(baseline || variant) over the full vocabulary (baseline distributions "
                    "stored in fp16)")
        return (f"lower bound of KL(baseline || variant): the baseline's top-{result['top_k']} tokens "
                "plus the remaining mass as one bucket")


class _NpyWriter:
    """Write a C-order ``.npy`` array one leading-index slice at a time."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        import numpy as np

        self.shape = shape
        self.file = open(path, "wb")
        np.lib.format.write_array_header_2_0(
            self.file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                        "shape": shape}
        )
        self.written = 0

    def write(self, rows) -> None:
        if tuple(rows.shape) != self.shape[1:]:
            raise ValueError(f"slice of shape {rows.shape}, expected {self.shape[1:]}")
        self.file.write(rows.astype("float16", copy=False).tobytes())
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written != self.shape[0]:
            raise ValueError(f"wrote {self.written} of {self.shape[0]} slices")


class _NpyReader:
    """Read one leading-index slice of an ``.npy`` array into a reused buffer."""

    def __init__(self, path: Path):
        import numpy as np

        self.file = open(path, "rb")
        version = np.lib.format.read_magic(self.file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(self.file)
        if fortran or dtype != np.float16:
            raise ValueError(f"{path}: expected a C-order float16 array")
        self.offset = self.file.tell()
        self.shape = shape
        self.buffer: Any = np.empty(shape[1:], dtype=np.float16)

    def read(self, i: int):
        self.file.seek(self.offset + i * self.buffer.nbytes)
        if self.file.readinto(memoryview(self.buffer).cast("B")) != self.buffer.nbytes:
            raise ValueError(f"truncated reference file at slice {i}")
        return self.buffer
