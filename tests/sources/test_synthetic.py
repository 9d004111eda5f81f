"""The synthetic checkpoint generator: real shapes' configs, save_pretrained's names and shapes,
loadable, deterministic, independent of the shard size."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.sources import synthetic

# Small stand-ins of the public shapes (test only): same model types and options, tiny sizes.
TINY = {
    "llama-tied": replace(synthetic.SHAPES["llama-3.2-1b"], config={
        **synthetic.SHAPES["llama-3.2-1b"].config, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
    "llama-untied": replace(synthetic.SHAPES["llama-3.1-8b"], config={
        **synthetic.SHAPES["llama-3.1-8b"].config, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}),
    "olmoe": replace(synthetic.SHAPES["olmoe-1b-7b"], config={
        **synthetic.SHAPES["olmoe-1b-7b"].config, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
        "num_experts_per_tok": 2}),
}

# Published parameter counts (the tied output layer counted once).
REAL = {"llama-3.2-1b": 1.236e9, "llama-3.2-3b": 3.213e9, "llama-3.1-8b": 8.030e9, "olmoe-1b-7b": 6.919e9}


@pytest.mark.parametrize("name", sorted(synthetic.SHAPES))
def test_public_shapes_build_in_transformers_with_the_real_parameter_count(name):
    import torch
    from transformers import AutoModelForCausalLM

    shape = synthetic.SHAPES[name]
    cfg = synthetic.config(shape, bos=1, eos=2, pad=2 if shape.padded else None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == shape.architecture
    assert count == synthetic.parameters(shape)
    assert abs(count - REAL[name]) / REAL[name] < 1e-3
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    ours = {n: s for n, s, _ in synthetic._tensors(shape)}
    if shape.model_type == "llama":  # no fused experts: the in-memory names are the saved ones
        assert ours == {n: s for n, s in expected.items() if not (shape.config["tie_word_embeddings"] and n == "lm_head.weight")}
    assert (cfg.vocab_size, cfg.tie_word_embeddings) == (shape.config["vocab_size"], name.startswith("llama-3.2"))


def test_llama_shapes_keep_the_llama3_rope_scaling():
    for name, factor in (("llama-3.2-1b", 32.0), ("llama-3.2-3b", 32.0), ("llama-3.1-8b", 8.0)):
        rope = synthetic.config(synthetic.SHAPES[name]).rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == factor and rope["rope_theta"] == 500000.0


@pytest.mark.parametrize("kind", sorted(TINY))
def test_names_and_shapes_are_save_pretrained_s(kind, tmp_path):
    """save_pretrained of a tiny instance of the same config writes exactly our keys and shapes
    (per-expert keys for the mixture of experts)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shape = TINY[kind]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(synthetic.config(shape)).save_pretrained(tmp_path)
    saved = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            saved.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    assert saved == {n: s for n, s, _ in synthetic._tensors(shape)}
    if kind == "olmoe":
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in saved


@pytest.fixture
def generate(tmp_path, tiny_model):
    def make(kind: str, folder: str, **kw) -> Path:
        out = tmp_path / folder
        synthetic.write(TINY[kind], out, tokenizer=tiny_model, **kw)
        return out

    return make


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_a_generated_checkpoint_loads_with_no_missing_or_unexpected_key(kind, generate):
    import torch
    from transformers import AutoModelForCausalLM

    out = generate(kind, "ckpt", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == [TINY[kind].architecture]
    assert (out / "generation_config.json").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    weights = dict(model.named_parameters())
    matrix = weights["model.layers.0.self_attn.q_proj.weight"].detach().float()
    assert 0.015 < float(matrix.std()) < 0.025  # initializer_range
    assert torch.equal(weights["model.norm.weight"], torch.ones_like(weights["model.norm.weight"]))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 20]])).logits
    assert torch.isfinite(logits.float()).all()


def test_byte_identical_across_writes_and_independent_of_shard_size(generate):
    from safetensors.torch import load_file

    first, second = generate("olmoe", "a", seed=3), generate("olmoe", "b", seed=3)
    assert _files(first) == _files(second)
    sharded = generate("olmoe", "c", seed=3, max_shard_bytes=50_000)
    tensors = lambda folder: {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
    one, many = tensors(first), tensors(sharded)
    assert one.keys() == many.keys() and all(one[k].equal(many[k]) for k in one)
    other = tensors(generate("olmoe", "d", seed=4))
    assert not other["model.layers.0.mlp.gate.weight"].equal(one["model.layers.0.mlp.gate.weight"])


def test_the_default_tokenizer_is_smollm2_s_from_its_gguf(tmp_path, smollm2_gguf):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "ckpt"
    synthetic.write(TINY["olmoe"], out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert len(tokenizer) == 49152 and config["vocab_size"] == 1000
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ids and None not in ids
    embeddings = load_file(next(out.glob("*.safetensors")))["model.embed_tokens.weight"]
    assert not embeddings[tokenizer.pad_token_id].any() and embeddings[tokenizer.pad_token_id + 1].any()


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="unknown synthetic shape 'llama-9b'"):
        synthetic.write("llama-9b", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(InputError, match="is not empty"):
        synthetic.write("llama-3.2-1b", tmp_path / "full")
