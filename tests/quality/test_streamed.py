"""Layer-major evaluation gives the numbers of one forward per window over the whole model, with
one decoder layer materialised at a time, on every architecture shape it meets."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import StageError

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers as t

    return {
        "llama-tied": lambda: t.LlamaConfig(**COMMON, tie_word_embeddings=True),
        "qwen3": lambda: t.Qwen3Config(**COMMON, head_dim=16),
        # soft-capping of attention and logits; alternating sliding-window layers
        "gemma2": lambda: t.Gemma2Config(**COMMON, head_dim=16, sliding_window=4, final_logit_softcapping=30.0,
                                         attn_logit_softcapping=50.0),
        "gemma3": lambda: t.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4),
        "phi3": lambda: t.Phi3Config(**COMMON),
        # fused experts: transformers converts the per-expert tensors on load
        "mixtral": lambda: t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen3-moe": lambda: t.Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2),
    }[family]()


FAMILIES = ("llama-tied", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3-moe")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's tiny random model saved in bf16, as checkpoints are published."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family)).to(torch.bfloat16)
        model.save_pretrained(root / family)
        made[family] = root / family
    return made


@pytest.fixture(scope="module")
def windows():
    import torch

    return torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(1))


def _whole(path: Path, windows):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.quality.runner import torch_forward, window_logprobs

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return list(window_logprobs(torch_forward(model), windows, "cpu"))


def _streamed(path: Path, windows, scratch: Path, **kwargs):
    import torch

    from pipeline.quality.streamed import load_offloaded, streamed_logprobs

    model, weights = load_offloaded(path, dtype=torch.float32, device="cpu", offload_folder=scratch)
    return model, weights, streamed_logprobs(model.eval(), windows, "cpu", weights, scratch=scratch, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_whole_model(family, checkpoints, windows, tmp_path):
    import torch

    expected = _whole(checkpoints[family], windows)
    _, _, scored = _streamed(checkpoints[family], windows, tmp_path)
    got = list(scored)
    assert len(got) == len(expected)
    for (lp, ids), (want, want_ids) in zip(got, expected, strict=True):
        torch.testing.assert_close(lp, want, rtol=0, atol=0)
        assert torch.equal(ids, want_ids)


def test_hidden_states_spilled_to_disk_give_the_same_numbers(checkpoints, windows, tmp_path):
    import torch

    expected = _whole(checkpoints["llama-tied"], windows)
    spilled = []
    _, _, scored = _streamed(checkpoints["llama-tied"], windows, tmp_path, buffer_bytes=0)
    for lp, _ in scored:
        spilled.append(next(tmp_path.glob("hidden-*/hidden.bin"), None))  # the buffer exists while scoring
        torch.testing.assert_close(lp, expected[len(spilled) - 1][0], rtol=0, atol=0)
    assert all(spilled)
    assert not list(tmp_path.glob("hidden-*"))  # and is gone afterwards


def test_one_decoder_layer_is_materialised_at_a_time(checkpoints, windows, tmp_path):
    model, weights, scored = _streamed(checkpoints["mixtral"], windows, tmp_path)
    layers = list(model.get_decoder().layers)

    def materialised() -> int:
        return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)

    assert materialised() == 0  # nothing of the layers is read at load time
    peak = 0
    load = weights.load

    def counting(prefix, device):
        nonlocal peak
        load(prefix, device)
        peak = max(peak, materialised())

    weights.load = counting
    list(scored)
    assert peak == 1
    assert materialised() == 0


def test_a_model_without_decoder_layers_is_refused(windows):
    import torch

    from pipeline.quality.streamed import streamed_logprobs

    class NoLayers(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Identity()

    with pytest.raises(StageError, match="decoder layers"):
        list(streamed_logprobs(NoLayers(), windows, "cpu"))
