"""The evaluation's activation quantization is compressed-tensors' arithmetic, bit for bit."""

import pytest

torch = pytest.importorskip("torch")
cq = pytest.importorskip("compressed_tensors.quantization")


def test_fast_fp8_activation_qdq_matches_compressed_tensors_bit_for_bit():
    from compressed_tensors.quantization import QuantizationArgs, forward_quantize

    from pipeline.backends.simulated_activations import fp8_per_token_qdq, is_fp8_per_token

    args = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    assert is_fp8_per_token(args)
    module = torch.nn.Linear(8, 8)
    module.quantization_status = None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 576, generator=g) * torch.logspace(-4, 4, 64)[None, :, None]
    x[0, 3] = 0.0  # an all-zero token takes the eps-scale branch
    x[0, 5, 7] = 1e6  # one outlier dominates its token's scale
    x[0, 9] = -x[0, 9].abs()  # negative-only token
    expected = forward_quantize(module, x, "input", args)
    assert torch.equal(fp8_per_token_qdq(x), expected)


def test_fast_fp8_static_qdq_matches_compressed_tensors_bit_for_bit():
    from compressed_tensors.quantization import QuantizationArgs, forward_quantize

    from pipeline.backends.simulated_activations import fp8_static_qdq, is_fp8_static_tensor

    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    module = torch.nn.Linear(8, 8)
    module.quantization_status = None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 576, generator=g) * 3
    x[0, 5, 7] = 1e4  # beyond the calibrated range: clamps
    for dtype in (torch.float32, torch.bfloat16):
        module.input_scale = torch.nn.Parameter(torch.tensor([0.0123], dtype=dtype), requires_grad=False)
        module.input_zero_point = torch.nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)
        assert is_fp8_static_tensor(args, module)
        assert torch.equal(fp8_static_qdq(x, module.input_scale), forward_quantize(module, x, "input", args))




def test_fp4_rounding_matches_compressed_tensors_on_every_tie():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    from pipeline.backends.simulated_activations import round_to_fp4

    # Every multiple of 1/64 in ±7 (each tie and both sides of it), zeros, and random values.
    grid = torch.arange(-7 * 64, 7 * 64 + 1, dtype=torch.float32) / 64
    edges = [0.0, -0.0, 1e-40, -1e-40, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -5.0, 1.9999999, 3.9999998, 1e6]
    x = torch.cat([grid, torch.tensor(edges), torch.nextafter(torch.tensor(edges), torch.tensor(10.0)),
                   torch.nextafter(torch.tensor(edges), torch.tensor(-10.0)),
                   torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3])
    expected = cast_to_fp4(x.clamp(-6.0, 6.0))
    assert torch.equal(round_to_fp4(x.clone()), expected)


@pytest.mark.parametrize("preset", ["NVFP4", "MXFP4"])
def test_fast_fp4_group_qdq_matches_compressed_tensors_bit_for_bit(preset):
    from compressed_tensors.quantization import forward_quantize, preset_name_to_scheme

    from pipeline.backends.simulated_activations import SharedInputQDQ, is_fp4_group

    args = preset_name_to_scheme(preset, ["Linear"]).input_activations
    module = torch.nn.Linear(8, 8)
    module.quantization_status = None
    if preset == "NVFP4":  # a calibrated global scale, as llm-compressor stores it
        module.input_global_scale = torch.nn.Parameter(torch.tensor([437.5]), requires_grad=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 576, generator=g) * torch.logspace(-3, 3, 48)[None, :, None]
    x[0, 3] = 0.0  # all-zero groups take the eps-scale branch
    x[1, 5, 7] = 1e4  # one outlier dominates its group
    assert is_fp4_group(args, x)
    expected = forward_quantize(module, x, "input", args)
    shared = SharedInputQDQ(forward_quantize)
    assert torch.equal(shared(module, x, args), expected)
    # Shapes it does not cover go to the library's function.
    assert not is_fp4_group(args, x[..., :40]) and not is_fp4_group(args, x.bfloat16())
