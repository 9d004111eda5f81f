"""Layer-major forward passes: every window goes through one decoder layer before the next layer's
weights are materialised, so peak memory is about one layer plus the windows' hidden states,
however many layers the model has.

Three passes over the windows, each through the model's own ``forward`` (so masks, rotary
embeddings, embedding scaling, final norm and logit soft-capping are the architecture's own):

1. **capture**: the decoder layers are swapped for recorders; the model embeds each window and
   calls the first layer, whose recorder keeps the hidden states and every layer's arguments
   (masks, position embeddings) and stops the forward before the head.
2. **layers**: layer by layer, its weights are materialised, every window's hidden states go
   through it, and its weights are released.
3. **head**: the layers are swapped for pass-throughs returning each window's final hidden
   states, and the model's head (norm, ``lm_head``, soft-capping) turns them into logits.

Weights come from a ``StreamedWeights`` (a checkpoint loaded by transformers with its layers and
embeddings offloaded to the files themselves: read by memory map when needed, in the compute
dtype) or are already in memory (a model a backend loaded whole); the numbers are the same either
way, and the same as one forward per window over the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StageError

# Above this, the windows' hidden states live in a file-backed buffer (page cache, not anonymous
# memory): 8 windows of 512 tokens of an 8B model (hidden 4096) take 64 MiB.
HIDDEN_BUFFER_BYTES = 1 << 30


_SLICE_BYTES = 64 << 20
FILE_BACKED_BYTES = 256 << 20


class _Stop(Exception):
    """Raised by the last layer's recorder: the capture pass needs nothing after the layers."""


class StreamedWeights:
    """The offloaded parameters of a model transformers loaded with ``device_map`` entries on
    ``disk``: materialised per module on demand and released back to the meta device.

    A parameter is read through transformers' offload index (in the model's dtype), unless
    ``load_module`` takes the module: it is then handed the module's tensors exactly as stored
    (a quantized format's packed weights and scales) and sets the module's parameters itself.
    Accelerate's own hooks would load and free each linear layer on every call (once per window);
    they are removed so that a layer is read once for all windows.
    """

    def __init__(self, model, dtype, load_module: Callable[[Any, dict[str, Any], str], bool] | None = None,
                 scratch: Path | None = None):
        """
        Args:
            model: loaded with offloaded modules (their parameters on ``meta``).
            dtype: the compute dtype floating-point parameters are materialised in.
            load_module: ``(module, stored tensors by local name, device) -> handled``.
            scratch: where the largest materialised tensors are file-backed (``_empty``).
        """
        from accelerate.hooks import remove_hook_from_submodules

        self.model = model
        self.dtype = dtype
        self.scratch = scratch
        self.load_module = load_module
        self.params: dict[str, list[tuple[str, Any]]] = {}  # module name -> [(parameter, weights map)]
        self.stored: dict[str, dict[str, tuple[str, str]]] = {}  # module name -> local name -> (file, key)
        for qualified, module in model.named_modules():
            weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            if weights is None:
                continue
            names = [n for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
            if names:
                self.params[qualified] = [(n, weights) for n in names]
            for key, info in weights.dataset.index.items():
                owner, _, local = key.rpartition(".")
                if "safetensors_file" in info:
                    self.stored.setdefault(owner, {})[local] = (info["safetensors_file"], info.get("weight_name", key))
        remove_hook_from_submodules(model)
        for module in model.modules():  # what stays in memory, in the compute dtype
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.device.type != "meta" and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)

    def load(self, prefix: str, device: str) -> None:
        """Materialise every offloaded parameter of the module ``prefix`` (a qualified name)."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        with contextlib.ExitStack() as files:
            opened: dict[str, Any] = {}

            def file(path: str):  # each file's header parsed once per layer, not once per tensor
                if path not in opened:
                    opened[path] = files.enter_context(safe_open(path, framework="pt"))
                return opened[path]

            for qualified, entries in self._under(prefix):
                module = self.model.get_submodule(qualified)
                stored_here = self.stored.get(qualified, {})
                if self.load_module is not None:
                    stored = {local: file(path).get_tensor(key) for local, (path, key) in stored_here.items()}
                    if self.load_module(module, stored, device):
                        continue
                for name, weights in entries:
                    if name in stored_here:
                        path, key = stored_here[name]
                        value = _read(file(path), key, self.dtype, self.scratch if device == "cpu" else None)
                    else:  # converted on load (fused MoE experts): from transformers' offload folder
                        value = weights[name]
                        if value.is_floating_point():
                            value = value.to(self.dtype)
                    set_module_tensor_to_device(module, name, device, value=value, dtype=value.dtype)

    def release(self, prefix: str) -> None:
        """Every parameter of the module ``prefix`` back to meta (whatever ``load`` made of them)."""
        from accelerate.utils import set_module_tensor_to_device

        for qualified, _ in self._under(prefix):
            module = self.model.get_submodule(qualified)
            for name, _ in list(module.named_parameters(recurse=False)):
                set_module_tensor_to_device(module, name, "meta")

    def _under(self, prefix: str):
        return [(q, e) for q, e in self.params.items() if q == prefix or q.startswith(prefix + ".")]


def _read(file, key: str, dtype, scratch: Path | None = None):
    """One stored tensor of an open safetensors ``file``, floating point cast to ``dtype`` a slice
    at a time: the peak is the result plus one slice, not the result plus the whole stored tensor
    (an 8B model's embedding is 1 GB in bf16, 2 GB in fp32). A result above ``FILE_BACKED_BYTES``
    lives in a file in ``scratch`` (see ``_empty``)."""
    stored = file.get_slice(key)
    shape = stored.get_shape()
    if stored.get_dtype() not in ("BF16", "F16", "F32", "F64"):
        return file.get_tensor(key)  # integers, FP8: as stored
    if not shape:
        return file.get_tensor(key).to(dtype)
    out = _empty(shape, dtype, scratch)
    rows = max(1, _SLICE_BYTES // max(1, out[0].numel() * 4))
    for start in range(0, shape[0], rows):
        out[start : start + rows] = stored[start : start + rows]
    return out


def _empty(shape, dtype, scratch: Path | None):
    """An uninitialised tensor; above ``FILE_BACKED_BYTES`` (embeddings and ``lm_head`` of large
    vocabularies, the largest tensors of most models), mapped from an unlinked file in
    ``scratch``: its pages are then page cache the kernel can write back and drop under a memory
    limit, not anonymous memory it cannot, and the file is gone with the last reference."""
    import torch

    numel = math.prod(shape)
    if scratch is None or numel * torch.empty((), dtype=dtype).element_size() <= FILE_BACKED_BYTES:
        return torch.empty(shape, dtype=dtype)
    fd, name = tempfile.mkstemp(dir=scratch, prefix="tensor-")
    try:
        tensor = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the pages; nothing is left on disk after it
    return tensor


def load_offloaded(path: Path, *, dtype, device: str, offload_folder: Path,
                   load_module: Callable[[Any, dict[str, Any], str], bool] | None = None,
                   **kwargs) -> tuple[Any, StreamedWeights | None]:
    """A transformers causal LM whose decoder layers and embeddings stay in the checkpoint's files
    (offloaded to ``disk`` in transformers' device map; weights transformers converts on load,
    such as fused MoE experts, are written to ``offload_folder``), everything else (norms, rotary
    tables: small) on ``device``.

    A checkpoint in pickle files (``allow_pickle``) cannot be read a tensor at a time: it is
    loaded whole, and the layer-major pass computes the same numbers from memory.

    Returns:
        ``(model, StreamedWeights)``, or ``(model, None)`` for a pickle checkpoint.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not any(Path(path).glob("*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device), None

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    names = {module: name for name, module in skeleton.named_modules()}
    offloaded = [names[m] for m in _layers(skeleton)]
    offloaded += [names[m] for m in (skeleton.get_input_embeddings(), skeleton.get_output_embeddings()) if m is not None]
    device_map = {name: "disk" for name in offloaded}
    for name, module in skeleton.named_modules():  # everything else (norms, rotary tables) in memory
        owns = next(module.named_parameters(recurse=False), None) or next(module.named_buffers(recurse=False), None)
        if owns and not any(name == o or name.startswith(o + ".") for o in offloaded):
            device_map[name] = device
    del skeleton
    # Loaded in the stored dtype: asked for another, transformers reads every offloaded tensor
    # whole to convert it (the largest twice over, at once). The layers are cast as they are
    # materialised; what stays in memory (norms, rotary tables) by StreamedWeights.
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device_map,
                                                 offload_folder=str(offload_folder), **kwargs)
    return model, StreamedWeights(model, dtype, load_module, scratch=offload_folder)


def streamed_logprobs(model, windows, device: str, weights: StreamedWeights | None = None, *,
                      scratch: Path | None = None, buffer_bytes: int = HIDDEN_BUFFER_BYTES) -> Iterator:
    """For each window, ``(logprobs [S-1, vocab] fp32, targets [S-1])`` on the CPU, computed layer
    by layer (see the module docstring); the same tuples as ``runner.window_logprobs``.

    Args:
        model: a transformers causal LM; with ``weights``, its offloaded parameters are on meta.
        weights: where offloaded parameters come from (None: the model is in memory).
        scratch: folder for the hidden-state buffer when it exceeds ``buffer_bytes``.

    Raises:
        StageError: the architecture's decoder layers do not map hidden states to hidden states.
    """
    import torch

    from pipeline.quality.runner import to_logprobs

    layers = _layers(model)
    names = {module: name for name, module in model.named_modules()}
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    n = windows.shape[0]
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]  # per layer, per window: (args, kwargs)
    with contextlib.ExitStack() as stack, torch.no_grad():
        hidden = None

        def record(index: int, w: int):
            def forward(hidden_states, *args, **kwargs):
                nonlocal hidden
                if index == 0:
                    if hidden is None:
                        hidden = stack.enter_context(_buffer((n, *hidden_states.shape[1:]), hidden_states.dtype,
                                                             scratch, buffer_bytes))
                    hidden[w].copy_(hidden_states[0])
                calls[index].append((args, kwargs))
                if index == len(layers) - 1:
                    raise _Stop
                return hidden_states
            return forward

        # 1. capture
        _load(weights, names[embed_in], device)
        for w in range(n):
            with _swapped(layers, functools.partial(record, w=w)), contextlib.suppress(_Stop):
                model(input_ids=windows[w : w + 1].to(device), use_cache=False)
        _release(weights, names[embed_in])
        if hidden is None:
            raise StageError("the model's forward never reached its decoder layers", fix="report the architecture")
        # 2. layers
        for i, layer in enumerate(layers):
            _load(weights, names[layer], device)
            for w in range(n):
                args, kwargs = calls[i][w]
                out = layer(hidden[w : w + 1].to(device), *args, **kwargs)
                if not isinstance(out, torch.Tensor) or out.shape[1:] != hidden.shape[1:]:
                    raise StageError(
                        f"decoder layer {i} of {type(model).__name__} returned {type(out).__name__}, not hidden states",
                        fix="this architecture cannot be evaluated layer by layer by this version")
                hidden[w].copy_(out[0])
            _release(weights, names[layer])
            calls[i] = []  # masks and position embeddings of a finished layer
        # 3. head
        _load(weights, names[embed_out], device)
        for w in range(n):
            final = hidden[w : w + 1].to(device)
            with _swapped(layers, functools.partial(_pass_through, last=len(layers) - 1, final=final)):
                logits = model(inputs_embeds=torch.zeros_like(final), use_cache=False).logits[0]
            yield to_logprobs(logits), windows[w, 1:]
        _release(weights, names[embed_out])


def _layers(model) -> list:
    """The decoder layers, in the order the model calls them."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise StageError(f"{type(model).__name__} keeps its decoder layers somewhere other than .layers",
                         fix="this architecture cannot be evaluated layer by layer by this version")
    return list(layers)


@contextlib.contextmanager
def _swapped(layers, make: Callable[[int], Callable]):
    """Each layer's ``forward`` replaced by ``make(index)`` for the duration."""
    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _pass_through(index: int, *, last: int, final):
    """Layer ``index``'s stand-in in the head pass: hidden states through unchanged, except the
    last layer, which returns the window's final hidden states."""
    def forward(hidden_states, *args, **kwargs):
        return final if index == last else hidden_states
    return forward


def _load(weights: StreamedWeights | None, prefix: str, device: str) -> None:
    if weights is not None:
        weights.load(prefix, device)


def _release(weights: StreamedWeights | None, prefix: str) -> None:
    if weights is not None:
        weights.release(prefix)


@contextlib.contextmanager
def _buffer(shape: tuple[int, ...], dtype, scratch: Path | None, limit: int):
    """``[windows, S, hidden]`` hidden states: in memory, or a file-backed tensor above ``limit``."""
    import torch

    size = math.prod(shape)
    if size * torch.empty((), dtype=dtype).element_size() <= limit:
        yield torch.empty(shape, dtype=dtype)
        return
    with tempfile.TemporaryDirectory(dir=scratch, prefix="hidden-") as folder:
        buffer = torch.from_file(str(Path(folder) / "hidden.bin"), shared=True, size=size, dtype=dtype)
        yield buffer.view(shape)
