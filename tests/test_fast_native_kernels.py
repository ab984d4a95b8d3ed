"""The native kernels and the int4 layouts: the VNNI layout round-trips, the int4 kernel computes exactly what
its arithmetic says (an independent float64 emulation of the int8 activation rounding), both int4 kernels agree
with the dequantized weights, checkpoints move between them, and the decode attention matches SDPA."""
import pytest
import torch
from torch import nn

from mobilevlm.fast import int4_kernels, native
from mobilevlm.fast.int4_kernels import AtenKernel, VnniKernel
from mobilevlm.fast.quantize import Int4Linear

needs_vnni = pytest.mark.skipif(int4_kernels.selected() is not VnniKernel,
                                reason="the VNNI int4 kernel is not built here (no AVX-512 VNNI or no compiler)")


def _layer(out_features=128, in_features=256, group=64, seed=0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(in_features, out_features, bias=False), group)


def _emulated(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """float64 y = x @ W^T with x rounded to int8 per token and group as the kernel does it (in float32:
    q = round_half_even(a * (127 / max|a|)), scale max|a| / 127); the weight side is exact, so only the kernel's
    float32 accumulation differs."""
    group = layer.group_size
    a = x.float().reshape(x.shape[0], -1, group)
    amax = a.abs().amax(-1, keepdim=True)
    # tensor / tensor: a Python number divided by a tensor is computed as number * reciprocal (two roundings)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    qa = torch.round(a * inverse).double()
    a_rounded = (qa * (amax / 127).double()).reshape(x.shape)
    weight = layer.values().double().reshape(layer.out_features, -1, group)
    scales, zeros = layer.portable_scales().double().transpose(0, 1).unbind(-1)
    weight = (weight - 8) * scales[..., None] + zeros[..., None]
    exact_sum = x.double().reshape(x.shape[0], -1, group).sum(-1)  # the zero term uses the exact sum of x
    rounded_sum = a_rounded.reshape(x.shape[0], -1, group).sum(-1)
    return a_rounded @ weight.reshape(layer.out_features, -1).T + (exact_sum - rounded_sum) @ zeros.T


def test_vnni_layout_round_trips():
    layer = _layer(out_features=192, in_features=384, group=128, seed=1)
    values, scales_and_zeros = layer.values(), layer.portable_scales()
    weights, scales = VnniKernel.pack(values, scales_and_zeros)
    assert weights.shape == (192, 192) and scales.shape == (192, 2 * 3)
    back_values, back_scales = VnniKernel.unpack(weights, scales, 384)
    assert torch.equal(back_values, values) and torch.equal(back_scales, scales_and_zeros)
    # row slices in whole blocks of 16 are the packed form of the same rows (what the decoder's fusion relies on)
    part_weights, part_scales = VnniKernel.pack(values[32:96], scales_and_zeros[:, 32:96])
    assert torch.equal(part_weights, weights[32:96]) and torch.equal(part_scales, scales[32:96])


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 11])  # the 4-token tile and every remainder
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_kernel_computes_its_arithmetic(rows, group, dtype):
    layer = _layer(out_features=64, in_features=512, group=group, seed=rows)
    layer.pack()
    assert layer.kernel is VnniKernel
    x = torch.randn(rows, 512)
    x[0, :group] *= 50  # a loud group must not cost the others their precision
    x = x.to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = _emulated(x.float(), layer)
    # fp32 out: only the order of the fp32 sums differs; bf16 out: one rounding to 8 significant bits
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=1e-5 * expected.abs().max().item())


@needs_vnni
def test_vnni_kernel_is_close_to_the_dequantized_weights_and_handles_zero_input():
    layer = _layer(out_features=256, in_features=1024, group=128, seed=3)
    x = torch.randn(7, 1024, dtype=torch.bfloat16)
    x[3] = 0
    exact = x.float() @ layer.dequantize().float().T
    y = layer(x).float()
    assert torch.equal(y[3], torch.zeros_like(y[3]))
    assert ((y - exact).norm() / exact.norm()).item() < 0.01  # int8 rounding of the activations


@pytest.mark.parametrize("source,target", [(VnniKernel, AtenKernel), (AtenKernel, VnniKernel)])
def test_checkpoints_move_between_kernels(monkeypatch, source, target):
    if VnniKernel in (source, target) and int4_kernels.selected() is not VnniKernel:
        pytest.skip("the VNNI int4 kernel is not built here")
    monkeypatch.setattr(int4_kernels, "selected", lambda: source)
    layer = _layer(out_features=128, in_features=256, group=64, seed=4)
    values = layer.values().clone()
    layer.pack()
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales_and_zeros"}
    saved = {key: value.clone() for key, value in state.items()}
    monkeypatch.setattr(int4_kernels, "selected", lambda: target)
    loaded = Int4Linear.empty(128, 256, bias=False, group_size=64)
    loaded.load_state_dict(state)
    loaded.pack()
    assert loaded.kernel is target and torch.equal(loaded.values(), values)
    assert all(torch.equal(state[key], saved[key]) for key in state)  # packing in place left the caller's dict alone
    x = torch.randn(3, 256)
    reference = x @ layer.dequantize().float().T
    assert ((loaded(x).float() - reference).norm() / reference.norm()).item() < 0.01


def test_switch_selects_torchs_kernels(monkeypatch):
    monkeypatch.setenv(native.SWITCH, "0")
    native.available.cache_clear()
    try:
        assert int4_kernels.selected() is AtenKernel
    finally:
        native.available.cache_clear()


def test_a_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    if not (torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()):
        pytest.skip("the build is not attempted without AVX-512 VNNI")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    problem = native.build.__wrapped__((broken,), "mobilevlm_broken_test")
    assert problem is not None and "broken.cpp" in problem


needs_native = pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not built here")


@needs_native
@pytest.mark.parametrize("heads,kv_heads,length", [(4, 4, 1), (4, 4, 37), (8, 2, 130)])
def test_decode_attention_matches_sdpa(heads, kv_heads, length):
    torch.manual_seed(length)
    capacity, dim = 160, 32
    k = torch.randn(kv_heads, capacity, dim).bfloat16()
    v = torch.randn(kv_heads, capacity, dim).bfloat16()
    k[:, length:] = float("nan")  # positions past the length must not be read
    q = torch.randn(heads, dim).bfloat16()
    out = torch.ops.mobilevlm_attention.decode(q, k, v, length, dim ** -0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, None].double(), k[None, :, :length].double(), v[None, :, :length].double(), enable_gqa=True)
    torch.testing.assert_close(out.double(), expected[0, :, 0], rtol=1e-5, atol=1e-5)


@needs_native
def test_decode_attention_rejects_bad_shapes():
    k = torch.zeros(2, 8, 24, dtype=torch.bfloat16)  # head dim not a multiple of 16
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        torch.ops.mobilevlm_attention.decode(torch.zeros(2, 24), k, k, 4, 1.0)


@needs_native
def test_int4_kernel_rejects_bad_arguments_instead_of_reading_past_them():
    x, weights = torch.randn(1, 256), torch.zeros(4, 32, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="scales must be"):  # 4 * 2 scales where 4 * 2 * 32 are read
        torch.ops.mobilevlm_vnni.int4_mm(x, weights, torch.zeros(4, 2, 1, 1, dtype=torch.bfloat16), 128)
    with pytest.raises(RuntimeError, match="shapes do not match"):  # K % 0 would be a SIGFPE
        torch.ops.mobilevlm_vnni.int4_mm(x, weights, torch.zeros(4, 2, 2, 16, dtype=torch.bfloat16), 0)


@needs_native
def test_decode_attention_rejects_an_empty_kv_cache():
    k = torch.zeros(0, 8, 32, dtype=torch.bfloat16)  # heads % 0 would be a SIGFPE
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        torch.ops.mobilevlm_attention.decode(torch.zeros(2, 32), k, k, 4, 1.0)
