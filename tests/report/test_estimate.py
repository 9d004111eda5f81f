"""Speed estimates for GPU engines (the stated model, by hand), the serving shape every manifest
records, and the fastest pick per target weighing measured and estimated speed."""

from __future__ import annotations

import pytest

from pipeline import hardware
from pipeline.report.estimate import CONTEXT, estimate, unquantized

SHAPE = {"params": 1_000_000_000, "matmul_params": 900_000_000, "embedding_params": 100_000_000,
         "tied_embeddings": False, "layers": 10, "attention_heads": 16, "kv_heads": 4, "head_dim": 64}


def _manifest(weights: int, compute: str, kv: str = "16-bit", shape=SHAPE) -> dict:
    return {"architecture": shape, "format": {"compute": compute, "kv_cache": kv},
            "files": [{"path": "model.safetensors", "size": weights}, {"path": "tokenizer.json", "size": 10**7}]}


def test_decode_reads_the_weights_and_the_kv_cache_at_the_bandwidth():
    est = estimate(_manifest(600_000_000, "fp8"), "h100")
    # Untied: a token reads one row of the input embedding, not its 2 x 1e8 bytes; tokenizer files are not weights.
    read = 600_000_000 - 2 * 100_000_000 + 2 * 10 * 4 * 64 * 2 * CONTEXT
    assert est.gpu == "H100" and est.kind == "estimate"
    assert est.decode_tps == pytest.approx(0.7 * 3350e9 / read)
    # An FP8 KV cache halves the cache's bytes.
    fp8_kv = estimate(_manifest(600_000_000, "fp8", kv="fp8"), "H100")
    assert fp8_kv.decode_tps == pytest.approx(0.7 * 3350e9 / (read - 2 * 10 * 4 * 64 * CONTEXT))


def test_prefill_runs_at_the_peak_of_the_formats_matmul_precision():
    flops = 2 * 900_000_000 + 4 * 10 * 16 * 64 * 512
    fp8 = estimate(_manifest(600_000_000, "fp8"), "H100")
    weight_only = estimate(_manifest(400_000_000, "16-bit"), "H100")
    assert fp8.prefill_tps == pytest.approx(0.5 * 1979e12 / flops)
    assert weight_only.prefill_tps == pytest.approx(0.5 * 989e12 / flops)
    # Fewer bytes decode faster; weight-only 4-bit prefills no faster than 16-bit.
    assert weight_only.decode_tps > fp8.decode_tps and weight_only.prefill_tps < fp8.prefill_tps


def test_a_precision_the_gpu_lacks_gets_no_prefill_figure_and_says_why():
    est = estimate(_manifest(600_000_000, "fp8"), "A100")
    assert est.decode_tps and est.prefill_tps is None and est.why_not == "no published fp8 tensor-core peak for A100"
    bandwidth_only = estimate(_manifest(600_000_000, "16-bit"), "A10G")
    assert bandwidth_only.decode_tps and bandwidth_only.prefill_tps is None


def test_uncertain_gpu_figures_are_marked():
    assert estimate(_manifest(1, "16-bit"), "GB200").uncertain and not estimate(_manifest(1, "16-bit"), "H100").uncertain


def test_a_manifest_without_the_serving_shape_is_not_estimated():
    est = estimate({"format": {"compute": "fp8"}, "files": [{"path": "model.safetensors", "size": 5}]}, "H100")
    assert est.decode_tps is None and est.prefill_tps is None and "republish" in est.why_not


def test_the_reference_is_the_model_in_sixteen_bits():
    ref = estimate(unquantized(_manifest(600_000_000, "fp8")), "H200")
    read = 2 * 1_000_000_000 - 2 * 100_000_000 + 2 * 10 * 4 * 64 * 2 * CONTEXT
    assert ref.decode_tps == pytest.approx(0.7 * 4800e9 / read) and ref.compute == "16-bit"


def test_every_recipe_gpu_has_a_bandwidth():
    assert all(g.bandwidth_gbs for g in hardware.GPUS.values())
    assert set(hardware.GPU_COMPUTE_CAPABILITY) == set(hardware.GPUS)


@pytest.mark.parametrize("tied", [True, False])
def test_the_serving_shape_counts_what_a_token_multiplies_through(tied):
    from transformers import LlamaConfig

    from pipeline.backends.shapes import serving_shape

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=tied)
    shape = serving_shape(config)
    # Per layer q, o 64x64; k, v 64x32; gate, up, down 64x128; then the LM head, 1000x64, tied or not.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert shape["matmul_params"] == 2 * per_layer + 64_000
    assert shape["tied_embeddings"] is tied and shape["embedding_params"] == 64_000
    assert (shape["layers"], shape["attention_heads"], shape["kv_heads"], shape["head_dim"]) == (2, 4, 2, 16)


def test_the_serving_shape_of_a_mixture_of_experts_counts_the_routed_experts():
    from transformers import Qwen3MoeConfig

    from pipeline.backends.shapes import serving_shape

    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000, num_experts=8,
                            num_experts_per_tok=2, tie_word_embeddings=False)
    shape = serving_shape(config)
    attention = 2 * 64 * 64 + 2 * 64 * 32
    experts = 8 * (64 * 2 * 32 + 32 * 64) * 2 / 8  # 2 of 8 experts per token
    router = 64 * 8
    assert shape["matmul_params"] == 2 * (attention + experts + router) + 64_000
