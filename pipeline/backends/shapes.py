"""What a model's architecture looks like, read from its config without loading weights.

Backends use these at plan time (does a group size divide every targeted layer's input width?)
and to name modules; everything is built on the meta device, so no memory is allocated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def meta_model(config):
    """A weightless (meta-device) instance of the architecture: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def matches(name: str, patterns) -> bool:
    """llm-compressor's module-name patterns: ``re:<regex>`` or an exact name / dotted suffix."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def linear_input_widths(config, ignore=(), model=None) -> list[tuple[str, int]]:
    """(name, in_features) of every Linear not matched by ``ignore``."""
    import torch

    model = model if model is not None else meta_model(config)
    return [(n, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not matches(n, ignore)]


def weight_owners(config) -> set[str]:
    """Names of all modules of the architecture that own a ``weight`` parameter."""
    model = meta_model(config)
    return {name.rsplit(".", 1)[0] for name, _p in model.named_parameters() if name.endswith(".weight")}


def fused_experts(config) -> list[str]:
    """Class names of the modules that hold mixture-of-experts weights as stacked (3-D) tensors,
    as transformers 5 builds every MoE family (``Qwen3MoeExperts``, ``MixtralExperts``, ...);
    empty for a dense model."""
    model = meta_model(config)
    return sorted({type(m).__name__ for m in model.modules()
                   if any(p.dim() >= 3 for p in m.parameters(recurse=False))})


def architecture(config) -> str:
    """The model class a config names (``LlamaForCausalLM``), for messages."""
    return (getattr(config, "architectures", None) or [type(meta_model(config)).__name__])[0]


def config_dtype(folder: Path):
    """The checkpoint's storage dtype from its ``config.json`` (float32 when unset)."""
    import torch

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def serving_shape(config) -> dict[str, int | bool]:
    """What the serving cost of the architecture depends on, counted on the weightless model
    (recorded in every manifest; the report's speed estimates are computed from it).

    ``matmul_params`` are the weights one token multiplies through: every Linear (the LM head
    too, tied or not), other modules' matrices (routers), and, for mixture-of-experts models, the
    routed share of the stacked expert tensors (``num_experts_per_tok / num_experts``). ``embedding_params`` are the input
    embedding's, of which a token reads one row (all of them again as a tied LM head).
    """
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model = meta_model(config)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    routed = getattr(text, "num_experts_per_tok", None)
    share = routed / experts if experts and routed else 1.0
    matmul = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            matmul += module.weight.numel()
        elif not isinstance(module, torch.nn.Embedding):
            own = list(module.parameters(recurse=False))
            matmul += sum(p.numel() for p in own if p.dim() == 2) + share * sum(p.numel() for p in own if p.dim() >= 3)
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": int(matmul),
        "embedding_params": embedding.numel(),
        "tied_embeddings": tied,
        "layers": getattr(text, "num_hidden_layers", 0) or 0,
        "attention_heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
    }
