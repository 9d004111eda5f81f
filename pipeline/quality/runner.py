"""Forward passes over token windows, yielding next-token log-probabilities per window."""

from __future__ import annotations

from typing import Callable, Iterator


def pick_device(requested: str = "auto") -> str:
    """``cuda`` when asked or when auto finds a GPU, else ``cpu``."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def torch_forward(model) -> Callable:
    """``ids [1, S] -> logits [S, vocab]`` of a transformers causal LM."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits[0]


def window_logprobs(forward: Callable, windows, device: str, on_window: Callable[[int], None] | None = None) -> Iterator:
    """For each window, ``(logprobs [S-1, vocab] fp32, targets [S-1])`` on the CPU.

    ``forward`` maps ``ids [1, S]`` to ``logits [S, vocab]`` (a torch model through
    ``torch_forward``, or an engine such as llama.cpp). Position t's distribution predicts token
    t+1, so the last position of a window is not scored. Work stays vectorised per window: one
    forward, one log_softmax.
    """
    import torch

    # no_grad rather than inference_mode: tensors keep version counters, which the activation
    # simulation relies on to share one quantized input safely.
    with torch.no_grad():
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1].to(device)
            logits = forward(ids)[:-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            if on_window is not None:
                on_window(i)
            yield logprobs, windows[i, 1:]
