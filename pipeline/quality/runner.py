"""The device stages compute on (``--device`` checked up front), and forward passes over token
windows yielding next-token log-probabilities per window."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def _parsed(requested: str) -> str:
    """``--device`` normalised (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

    Raises:
        InputError: not one of those.
    """
    device = requested.strip().lower()
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise InputError(f"unknown device {requested!r}", where="--device", fix="use auto, cpu, cuda or cuda:N")
    return device


def check_device(requested: str) -> str:
    """``--device`` checked before any stage runs (a stage would fail only after the fetch, with
    torch's own text); returns it normalised (``cuda`` or ``cuda:N`` for a GPU).

    Raises:
        InputError: an unknown device, or a CUDA device this machine's torch cannot use.
    """
    device = _parsed(requested)
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return device
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise InputError(f"--device {device} but {why} (torch {torch.__version__})", where="--device",
                         fix="use --device cpu or auto, or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                         where="--device", fix="choose an index below that")
    return device


def compute_device(requested: str, *, here: bool) -> str:
    """The device the GPU-capable stages compute on, fixed before planning: their keys name it
    (a GPU computes in bf16, a CPU in fp32, so the bytes and figures differ; see
    ``pipeline.plan.build``). Never ``auto``.

    ``here``: the stages run on this machine (checked; ``auto`` is its GPU when torch can use
    one). Otherwise they run on a cluster (Ray), where a stage is given a GPU only under
    ``--device cuda``, so ``auto`` is the CPU; ``cuda`` is checked there, by the stages.

    Raises:
        InputError: an unknown device, or (``here``) a CUDA device this machine cannot use.
    """
    if not here:
        device = _parsed(requested)
        return "cpu" if device == "auto" else device
    device = check_device(requested)
    if device != "auto":
        return device
    from pipeline.hardware import gpu_architectures

    # No NVIDIA driver reporting a GPU: the CPU, without importing torch (a cached run needs none).
    return pick_device("auto") if gpu_architectures() else "cpu"


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
            logprobs = to_logprobs(forward(windows[i : i + 1].to(device)))
            if on_window is not None:
                on_window(i)
            yield logprobs, windows[i, 1:]


def to_logprobs(logits):
    """``logits [S, vocab]`` -> fp32 log-probabilities on the CPU of the positions that predict a
    token of the window (all but the last)."""
    import torch

    return torch.log_softmax(logits[:-1].float(), dim=-1).cpu()
