"""Score a ModelOpt-exported checkpoint on CPUs as its engine computes it.

transformers cannot be trusted with these files: loading a ModelOpt FP8/INT8 checkpoint as a plain
model silently ignores the scales, and NVFP4 does not load. So the architecture is built from the
config without its ``quantization_config`` (fp32), and every quantized Linear gets its stored
weight dequantized exactly (``dequantize_weight``) with the activation quantization the engine
performs simulated on its input (``ActivationQDQ``): FP8 with the exported static scale, FP8 per
token, NVFP4 groups of 16 with the exported global input scale, SmoothQuant's pre-quant scale then
INT8 with the static scale. AWQ's pre-quant scales (on layers the export could not fold them into
a norm) multiply the weight's input columns, which is the same product. An FP8 KV cache is
simulated on the post-RoPE keys and values through a registered attention function.

The tensor layouts are ModelOpt's export (``modelopt.torch.export.quant_utils.to_quantized_weight``);
tests pin each dequantization to a round trip through that function.

``load_streamed`` builds that model for ``pipeline.quality.streamed``: decoder layers, embeddings and
the output head stay in the files and are dequantized one module at a time as the layer-major pass
reaches them (``ExportedWeights``), so an evaluation holds about one layer, not the model;
``load_exported`` is the same model with every module materialised.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pipeline.backends.simulated_activations import (
    fp8_per_token_qdq,
    fp8_static_qdq,
    round_to_fp4,
)
from pipeline.errors import StageError

NVFP4_BLOCK = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0
_KV_ATTENTION = "modelbuild_fp8_kv"


def load_exported(path: Path, device: str):
    """The exported checkpoint at ``path`` as an fp32 transformers model computing what the
    engine computes (weights dequantized once; activation and KV quantization simulated): the
    ``load_streamed`` model with every module materialised."""
    model, weights = load_streamed(path, device, None)
    for prefix in weights.streamed:
        weights.load(prefix, device)
    if weights.tied:
        model.tie_weights()  # one embedding matrix, as the architecture has it
    return model


def dequantize_weight(weight, scale, scale_2, algo: str | None, group_size: int | None):
    """The fp32 weight an engine multiplies with, from ModelOpt's exported tensors.

    Layouts: FP8 ``[out, in]`` E4M3 with a per-tensor or per-output-channel fp32 scale; INT8
    ``[out, in]`` with per-channel scales; NVFP4 packed two E2M1 codes per byte along the input
    dim (low nibble first), E4M3 scales per 16 inputs and an fp32 global scale; INT4 AWQ packed two
    signed nibbles per byte along the *output* dim (row 2i low, 2i+1 high), fp32 scales per block
    of ``group_size`` inputs.
    """
    import torch

    if weight.dtype == torch.float8_e4m3fn:
        return weight.float() * _per_row(scale)
    if weight.dtype == torch.int8:
        return weight.float() * _per_row(scale)
    if weight.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn and scale_2 is not None:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        shape = (weight.shape[0], weight.shape[1] * 2)
        block = scale.shape[-1] and shape[1] // scale.shape[-1]
        return NVFP4QTensor(torch.Size(shape), torch.float32, weight).dequantize(
            torch.float32, scale=scale, double_scale=scale_2.float(), block_sizes={-1: block}
        )
    if weight.dtype == torch.uint8 and algo in ("W4A16_AWQ", "W4A8_AWQ"):
        low = (weight & 0x0F).to(torch.int8)
        high = (weight >> 4).to(torch.int8)
        # Signed nibbles: 8..15 are -8..-1.
        low = torch.where(low >= 8, low - 16, low)
        high = torch.where(high >= 8, high - 16, high)
        ints = torch.stack((low, high), dim=1).reshape(weight.shape[0] * 2, weight.shape[1])
        block = group_size or weight.shape[1] // scale.shape[-1]
        return ints.float() * scale.float().repeat_interleave(block, dim=-1)
    raise StageError(f"no dequantization for a {weight.dtype} weight with {scale.dtype} scales ({algo})",
                     fix="this ModelOpt format is not supported by modelbuild's CPU evaluation")


def _per_row(scale):
    scale = scale.float()
    return scale if scale.ndim == 0 else scale.reshape(-1, 1)


def activation_spec(algo: str | None, input_scale) -> str | None:
    """Which activation quantization the engine applies to a layer's input (None: none)."""
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return "fp8_per_token"
    if input_scale is None:
        return None
    spec = None if algo is None else {"FP8": "fp8_static", "NVFP4": "nvfp4", "W8A8_SQ_PER_CHANNEL": "int8_static"}.get(algo)
    return spec or _unknown(algo)


def _unknown(algo):
    raise StageError(f"no CPU simulation of {algo}'s activation quantization",
                     fix="this ModelOpt format is not supported by modelbuild's CPU evaluation")


class ActivationQDQ:
    """Input quantize-dequantize per quantized layer. Layers fed the very same tensor with equal
    scales (q/k/v, gate/up: one fused GEMM in the engine, one quantization of its input) share
    one result."""

    def __init__(self):
        self.last: tuple | None = None

    def hook(self, spec: str, input_scale, pre_quant, device: str):
        scale = None if input_scale is None else input_scale.float().to(device)
        pre = None if pre_quant is None else pre_quant.float().to(device)

        def run(module, inputs):
            x = inputs[0]
            last = self.last
            if (last is not None and last[0] is x and last[1] == x._version and last[2] == spec
                    and _same(last[3], scale) and _same(last[4], pre)):
                return (last[5],) + tuple(inputs[1:])
            out = quantize_activation(spec, x if pre is None else x * pre, scale)
            self.last = (x, x._version, spec, scale, pre, out)
            return (out,) + tuple(inputs[1:])

        return run


def _same(a, b) -> bool:
    import torch

    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def quantize_activation(spec: str, x, scale):
    if spec == "fp8_static":
        return fp8_static_qdq(x, scale)
    if spec == "fp8_per_token":
        return fp8_per_token_qdq(x)
    if spec == "int8_static":
        return (x / scale).round_().clamp_(-128, 127).mul_(scale)
    if spec == "nvfp4":
        return nvfp4_qdq(x, scale)
    raise StageError(f"unknown activation quantization {spec}")


def nvfp4_qdq(x, global_scale):
    """NVFP4 quantize-dequantize of an activation with ModelOpt's arithmetic (pinned in tests to
    ``NVFP4QTensor.quantize``/``dequantize``): per 16 values, scale = amax / (6 * global) cast to
    E4M3 (zeros become 1, clamped to [2^-9, 448]), values divided by scale * global and rounded to
    E2M1."""
    import torch

    groups = x.unflatten(-1, (x.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK))
    block = groups.abs().amax(dim=-1, keepdim=True) / (E2M1_MAX * global_scale)
    block = torch.where(block == 0, torch.ones_like(block), block)
    block = block.clamp_(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn).float() * global_scale
    q = round_to_fp4(groups / block)
    return q.mul_(block).flatten(start_dim=-2).to(x.dtype)


def _use_fp8_kv_attention(model) -> None:
    """Route attention through a function that quantize-dequantizes keys and values with each
    layer's exported FP8 scale (the KV cache stores them in FP8), then runs SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):
        k_scale = getattr(module, "modelbuild_k_scale", None)
        v_scale = getattr(module, "modelbuild_v_scale", None)
        if k_scale is not None:
            key = fp8_static_qdq(key, k_scale)
        if v_scale is not None:
            value = fp8_static_qdq(value, v_scale)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(_KV_ATTENTION, fp8_kv_attention)
    model.set_attn_implementation(_KV_ATTENTION)


def load_streamed(path: Path, device: str, scratch: Path | None):
    """The exported checkpoint at ``path`` as an fp32 model computing what the engine computes
    (see the module docstring), with the decoder layers, embeddings and output head left in the files (their parameters on meta) for the returned
    ``ExportedWeights`` to materialise one at a time; everything else (norms), the activation
    simulation and the KV-cache scales are set up now.

    Returns:
        ``(model, weights)`` for ``pipeline.quality.streamed.streamed_logprobs``.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.quality.streamed import _layers

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers' own ModelOpt path would drop the scales
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = {module: name for name, module in model.named_modules()}
    streamed = [names[m] for m in _layers(model)]
    streamed += [names[m] for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    weights = ExportedWeights(model, path, scratch, streamed)
    weights.set_up(device)
    for module in model.modules():  # buffers (rotary tables) are real tensors: on the device now
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
    return model.eval(), weights


class ExportedWeights:
    """The parameters of a ``load_streamed`` model, read from the exported files per module on
    demand (quantized Linear weights dequantized as ``load_exported`` does) and released back to
    meta: ``pipeline.quality.streamed``'s ``load(prefix, device)`` / ``release(prefix)``."""

    def __init__(self, model, path: Path, scratch: Path | None, streamed: list[str]):
        """``streamed``: the modules read on demand (decoder layers, embeddings, head)."""
        from safetensors import safe_open

        self.model, self.scratch, self.streamed = model, scratch, streamed
        self.quant = json.loads((path / "hf_quant_config.json").read_text(encoding="utf-8"))["quantization"]
        self.files: dict[str, str] = {}
        for shard in sorted(path.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), str(shard)))
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.fold: dict[str, Any] = {}  # Linear -> pre-quant scale folded into its dense weight
        self.used: set[str] = set()

    def set_up(self, device: str) -> None:
        """Activation simulation, KV-cache scales and the parameters outside ``streamed``; the
        checkpoint checked against the architecture (nothing missing, nothing left over)."""
        import torch

        algo = self.quant.get("quant_algo")
        qdq, simulated, kv_layers = ActivationQDQ(), 0, 0
        with self._opened() as files:
            get = files.get
            for name, module in self.model.named_modules():
                if not isinstance(module, torch.nn.Linear) or f"{name}.weight" not in self.files:
                    continue
                for kind in ("k", "v"):  # ModelOpt stores KV-cache scales on k_proj / v_proj
                    kv_scale = get(f"{name}.{kind}_scale")
                    if kv_scale is not None:
                        parent = self.model.get_submodule(name.rsplit(".", 1)[0])
                        setattr(parent, f"modelbuild_{kind}_scale", kv_scale.float().to(device))
                        kv_layers += kind == "k"
                if f"{name}.weight_scale" not in self.files:
                    continue  # left unquantized by the export
                input_scale, pre_quant = get(f"{name}.input_scale"), get(f"{name}.pre_quant_scale")
                spec = activation_spec(algo, input_scale)
                if spec is not None:
                    module.register_forward_pre_hook(qdq.hook(spec, input_scale, pre_quant, device))
                    simulated += 1
                elif pre_quant is not None:
                    self.fold[name] = pre_quant.float()  # W(x * s) == (W * s) x
            expected = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
            missing = sorted(n for n in expected if self._key(n) not in self.files)
            unexpected = sorted(k for k in self.files if k not in self.used and k not in expected
                                and not k.endswith(("_scale", "_scale_2")))
            if missing or unexpected:
                raise StageError(
                    f"exported checkpoint does not match its architecture: missing {missing[:4]}, unexpected {unexpected[:4]}",
                    fix="the export may come from another ModelOpt version; rebuild the variant",
                )
        kept = {n.rpartition(".")[0] for n, _ in self.model.named_parameters()}
        for owner in sorted(kept):
            if not any(owner == s or owner.startswith(s + ".") for s in self.streamed):
                self.load(owner, device, recurse=False)
        if self.quant.get("kv_cache_quant_algo"):
            if self.quant["kv_cache_quant_algo"] != "FP8":
                raise StageError(f"no CPU simulation for KV cache {self.quant['kv_cache_quant_algo']}")
            if kv_layers == 0:
                raise StageError("hf_quant_config.json names an FP8 KV cache but the export has no k/v scales")
            _use_fp8_kv_attention(self.model)
        self.model.modelbuild_simulated_layers = simulated

    def _key(self, name: str) -> str:
        """The stored tensor of parameter ``name`` (a tied output head reads the embedding's)."""
        if name not in self.files and self.tied and name.endswith("lm_head.weight"):
            embedding = self.model.get_input_embeddings()
            return next(f"{n}.weight" for n, m in self.model.named_modules() if m is embedding)
        return name

    @contextlib.contextmanager
    def _opened(self):
        """The files for a block of reads (each header parsed once)."""
        with contextlib.ExitStack() as stack:
            yield _Files(self.files, stack, self.used)

    def load(self, prefix: str, device: str, *, recurse: bool = True) -> None:
        """Materialise the parameters of module ``prefix`` (and of its submodules) in fp32."""
        import torch
        from accelerate.utils import set_module_tensor_to_device

        from pipeline.quality.streamed import _read

        algo, group_size = self.quant.get("quant_algo"), self.quant.get("group_size")
        module = self.model.get_submodule(prefix)
        owners = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
        with self._opened() as files:
            get = files.get
            for qualified, owner in owners:
                for name, param in list(owner.named_parameters(recurse=False)):
                    if param.device.type != "meta":
                        continue
                    key = self._key(f"{qualified}.{name}")
                    if name == "weight" and f"{qualified}.weight_scale" in self.files:
                        scale_2 = get(f"{qualified}.weight_scale_2")
                        value = dequantize_weight(get(key), get(f"{qualified}.weight_scale"), scale_2, algo, group_size)
                        if qualified in self.fold:
                            value = value * self.fold[qualified][None, :]
                    else:
                        value = _read(files.file(key), key, torch.float32, self.scratch if device == "cpu" else None)
                    set_module_tensor_to_device(owner, name, device, value=value, dtype=value.dtype)

    def release(self, prefix: str) -> None:
        """Every parameter of module ``prefix`` back to meta."""
        from accelerate.utils import set_module_tensor_to_device

        for _qualified, owner in self.model.get_submodule(prefix).named_modules():
            for name, _ in list(owner.named_parameters(recurse=False)):
                set_module_tensor_to_device(owner, name, "meta")


class _Files:
    """Safetensors files opened on first use within one block (``ExportedWeights._opened``)."""

    def __init__(self, index: dict[str, str], stack: contextlib.ExitStack, used: set[str]):
        self.index, self.stack, self.used = index, stack, used
        self.opened: dict[str, Any] = {}

    def file(self, key: str):
        """The open file holding ``key`` (which counts as read)."""
        from safetensors import safe_open

        path = self.index[key]
        if path not in self.opened:
            self.opened[path] = self.stack.enter_context(safe_open(path, framework="pt"))
        self.used.add(key)
        return self.opened[path]

    def get(self, key: str):
        """The stored tensor ``key``, or None when the export has none."""
        return self.file(key).get_tensor(key) if key in self.index else None
