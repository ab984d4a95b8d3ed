"""The native int8 kernel: it computes exactly what its arithmetic says (an independent float64 emulation of the
per-token 8-bit activation rounding), its weight layout round-trips, and checkpoints move between it and fbgemm."""
import pytest
import torch
from torch import nn

from mobilevlm.fast import native
from mobilevlm.fast.quantize import Int8Linear

needs_native = pytest.mark.skipif(not native.available(), reason="the native kernels are not built here")


def _layer(out_features=64, in_features=256, seed=0, bias=False) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear.from_linear(nn.Linear(in_features, out_features, bias=bias))


def _emulated(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 y = x @ (q * scale)^T with x rounded as the kernel rounds it, in float32: over each token's range
    [low, high], u = round_half_even((a - low) * (255 / (high - low))) in 0..255 and a = u * (high - low) / 255 + low."""
    x = x.float()
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    width = high - low
    inverse = torch.where(width > 0, torch.full_like(width, 255) / width, torch.zeros_like(width))
    u = torch.round((x - low) * inverse).clamp(0, 255).double()
    rounded = u * (width / 255).double() + low.double()
    return rounded @ (weight.double() * scales.double()[:, None]).T


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])  # the 8- and 4-token tiles and every remainder
@pytest.mark.parametrize("in_features", [64, 4100])  # 4100: a 4-channel tail past the 16-wide loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_computes_its_arithmetic(rows, in_features, dtype):
    layer = _layer(out_features=48, in_features=in_features, seed=rows)
    weight, scales = layer.qweight.clone(), layer.scales.clone()
    layer.pack()
    assert layer.kernel == "vnni"
    x = torch.randn(rows, in_features)
    x[0, :16] *= 50  # one loud token: the others keep their own range
    x = x.to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = _emulated(x, weight, scales)
    # fp32 out: only the fp32 conversion of the exact int32 sums differs; bf16 out: one rounding to 8 bits
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=1e-5 * expected.abs().max().item())


@needs_native
def test_zero_and_constant_tokens_are_exact_and_bias_is_added():
    layer = _layer(out_features=32, in_features=128, seed=1, bias=True)
    weight = layer.qweight.float() * layer.scales.float()[:, None]
    x = torch.zeros(3, 128)
    x[1] = 0.75
    x[2] = torch.randn(128)
    y = layer(x)
    bias = layer.bias.float()
    assert torch.equal(y[0], bias)
    torch.testing.assert_close(y[1], 0.75 * weight.sum(1) + bias, rtol=1e-5, atol=1e-5)
    exact = x[2] @ weight.T + bias
    assert ((y[2] - exact).norm() / exact.norm()).item() < 0.01


@needs_native
def test_layout_round_trips_in_place():
    layer = _layer(out_features=2048 + 32, in_features=96, seed=2)  # more rows than one packing slice
    weight = layer.qweight.clone()
    storage = layer.qweight.data_ptr()
    layer.pack()
    assert layer.qweight is None and layer._packed.data_ptr() == storage  # reordered where it was
    assert torch.equal(layer.int8_weight(), weight)
    assert torch.equal(layer._row_sums, weight.sum(1, dtype=torch.int32))


def test_shapes_the_layout_does_not_fit_use_fbgemm_or_the_fallback():
    layer = _layer(out_features=24, in_features=64, seed=3)
    layer.pack()
    assert layer.kernel != "vnni"
    x = torch.randn(2, 64)
    exact = x @ layer.dequantize().float().T
    assert ((layer(x).float() - exact).norm() / exact.norm()).item() < 0.02


@needs_native
@pytest.mark.parametrize("native_first", [True, False])
def test_checkpoints_move_between_kernels(monkeypatch, native_first):
    def use_native(flag):
        monkeypatch.setattr(native, "available", lambda: flag)

    use_native(native_first)
    layer = _layer(out_features=64, in_features=128, seed=4)
    weight = layer.qweight.clone()
    layer.pack()
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    assert set(state) == {"qweight", "scales"} and torch.equal(state["qweight"], weight)
    use_native(not native_first)
    loaded = Int8Linear.empty(64, 128, bias=False)
    loaded.load_state_dict(state)
    loaded.pack()
    assert (loaded.kernel == "vnni") == (not native_first)
    assert torch.equal(loaded.int8_weight(), weight)
    x = torch.randn(3, 128)
    torch.testing.assert_close(loaded(x), layer(x), rtol=0.02, atol=0.02 * layer(x).abs().max().item())
    # loading into a packed layer takes the new weight (and packs it again)
    layer.load_state_dict({"qweight": torch.zeros_like(weight), "scales": state["scales"]})
    assert torch.equal(layer(x), torch.zeros(3, 64))


@needs_native
def test_bad_shapes_are_refused():
    weights = torch.zeros(2, 16, 64, dtype=torch.int8)
    scales, sums = torch.ones(32, dtype=torch.bfloat16), torch.zeros(32, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.mobilevlm_vnni.int8_mm(torch.zeros(1, 60), weights, scales, sums)
    with pytest.raises(RuntimeError, match="scales must be"):
        torch.ops.mobilevlm_vnni.int8_mm(torch.zeros(1, 64), weights, scales[:16], sums)
    with pytest.raises(RuntimeError, match="row_sums must be"):
        torch.ops.mobilevlm_vnni.int8_mm(torch.zeros(1, 64), weights, scales, sums.long())
