"""Quantization of `nn.Linear` layers for fast CPU inference.

- int8: symmetric per-output-channel int8 weights x activations rounded to 8 bits per token on the fly: the
  project's own AVX-512 VNNI kernel where it is built, else fbgemm's int8 GEMM (`Int8Linear`), or weight-only
  `torch._weight_int8pack_mm` where fbgemm is missing.
- int4: asymmetric group-wise (min/max) 4-bit weights, for every input size on one of the kernels of
  `int4_kernels`: int4 x int8 VNNI dot products (the project's own C++, built on first use) where the CPU has
  AVX-512 VNNI, else `aten._weight_int4pack_mm_for_cpu`.

`quantize_model` casts the unquantized parts of the model to bf16 (aten's int4 kernel is fast only for bf16 inputs). The CLIP tower and projector are int8 in both modes unless `include_vision=False` keeps them in bf16.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mobilevlm.errors import MobileVLMError
from mobilevlm.fast import int4_kernels, native

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
# Above this many rows the weight-only int8 fallback dequantizes and runs a bf16 GEMM (measured cross-over on
# AVX-512 BF16).
INT8_GEMM_ROWS = 16
# fbgemm's AVX2 kernels sum pairs of u8*s8 products in int16, which can saturate unless activations use 7 bits;
# with VNNI the products accumulate in int32 and the full 8 bits are safe.
_REDUCE_RANGE = not torch.cpu._is_vnni_supported()
# Both int4 kernels pack output channels in blocks of rows (the aten one in blocks of 64).
INT4_ROW_BLOCK = int4_kernels.ROW_BLOCK
# The group sizes both int4 kernels take (torch's only these; the VNNI one any multiple of 16), so that a checkpoint
# quantized on one machine runs on any other.
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch, "_make_per_channel_quantized_tensor")


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias with q int8 [out, in] and one bf16 scale per output channel.

    Kernels, all rounding the activations to 8 bits per token on the fly (asymmetric, over the token's range):
    - `vnni` (the project's own, kernels/vnni_matmul.cpp) where the native kernels are available and the shape
      fits (out % 16, in % 4): int32 dot products on the weights reordered in place into blocks of 16 rows, so
      that decoding streams the weights once at memory speed (faster than fbgemm for one token, about as fast
      for a prefill: docs/notes/speed.md).
    - `fbgemm` (`torch.ops.quantized.linear_dynamic`) on other x86 CPUs: its packed copy replaces `qweight`;
      faster than weight-only `torch._weight_int8pack_mm` for one token and than a bf16 GEMM for a prefill.
    - weight-only `torch._weight_int8pack_mm` (bf16 activations) where fbgemm is missing (non-x86).
    `int8_weight()` gives the portable [out, in] weight back for saving.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel: str | None = None
        self._packed = None  # fbgemm's packed weight, or the VNNI layout [out, in] int8
        self._row_sums: torch.Tensor | None = None  # int32 [out], VNNI only

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)
        # rounded against the stored (bf16) scales, so that q * scale is the best int8 fit of what is kept
        qweight = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(qweight, scales, bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, group_size: int = 0) -> "Int8Linear":
        return cls(torch.empty(out_features, in_features, dtype=torch.int8),
                   torch.empty(out_features, dtype=torch.bfloat16),
                   torch.empty(out_features, dtype=torch.bfloat16) if bias else None)

    @classmethod
    def from_packed(cls, weights: torch.Tensor, scales: torch.Tensor, row_sums: torch.Tensor) -> "Int8Linear":
        """A layer over weights already in the VNNI layout (the lean decoder's fused projections)."""
        layer = cls(torch.empty(0, weights.shape[1], dtype=torch.int8, device="meta"), scales, None)
        layer.out_features, layer.qweight = weights.shape[0], None
        layer.kernel, layer._packed, layer._row_sums = "vnni", weights, row_sums
        return layer

    def pack(self) -> None:
        """Moves the weight into the kernel's layout (once, after quantizing or loading)."""
        if self._packed is not None or self.qweight is None:
            return
        if self.out_features % 16 == 0 and self.in_features % 4 == 0 and native.available():
            weight = self.qweight
            self._row_sums = torch.empty(self.out_features, dtype=torch.int32)
            # in place, in slices of whole 16-row blocks (each block's bytes stay where they were), so that the
            # staging copies (the reordered rows, and the int32 upcast the sums take) are a slice's, not the
            # whole matrix's (the lm_head's int32 copy would be 262 MB)
            step = 1024
            for i in range(0, self.out_features, step):
                rows = weight[i:i + step]
                self._row_sums[i:i + step] = rows.sum(1, dtype=torch.int32)
                rows.copy_(rows.reshape(-1, 16, self.in_features // 4, 4).transpose(1, 2).reshape(rows.shape))
            self.kernel, self._packed, self.qweight = "vnni", weight, None
        elif _fbgemm_available():
            with warnings.catch_warnings():
                # torch 2.13 deprecates creating quantized tensors (pytorch#184982); this one exists only to hand
                # fbgemm the weight. The project pins torch; should a later torch drop it, the fallback below runs.
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
            self.kernel, self._packed = "fbgemm", torch.ops.quantized.linear_prepack(weight, None)
            self.qweight = None

    def int8_weight(self) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight
        if self.kernel == "vnni":
            blocks = self._packed.reshape(-1, self.in_features // 4, 16, 4)
            return blocks.transpose(1, 2).reshape(self.out_features, self.in_features)
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def dequantize(self) -> torch.Tensor:
        return self.int8_weight().to(torch.bfloat16) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pack()
        shape = x.shape
        if self.kernel == "vnni":
            x2 = x.reshape(-1, shape[-1])
            weights = self._packed.view(self.out_features // 16, self.in_features // 4, 64)
            y = torch.ops.mobilevlm_vnni.int8_mm(x2, weights, self.scales, self._row_sums)
        elif self.kernel == "fbgemm":
            x2 = x.reshape(-1, shape[-1]).float()
            if x2.shape[0] == 1:
                y = torch.ops.quantized.linear_dynamic(x2, self._packed, _REDUCE_RANGE)
            else:
                # The kernel quantizes the whole input with one scale; scaling every row to the same range first
                # (and back after: the product is linear in each row) gives each token its own scale.
                rows = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12)
                y = torch.ops.quantized.linear_dynamic(x2 / rows, self._packed, _REDUCE_RANGE).mul_(rows)
        else:
            x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            if x2.shape[0] > INT8_GEMM_ROWS:
                y = F.linear(x2, self.dequantize())
            else:
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.int8_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.qweight is None and prefix + "qweight" in state_dict:
            # packed: take the stored weight back into a buffer, to be packed again (without one, as with
            # strict=False, the packed weight stays)
            self.qweight = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
            self.kernel = self._packed = self._row_sums = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel}" if self.kernel else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{kernel}"


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4: w = (q - 8) * scale + zero per group of `group_size` input channels.

    In checkpoints: `qweight` uint8 [out, in/2] (even input channel in the low nibble) and `scales_and_zeros`
    bf16 [in/group, out, 2]. In memory only the kernel's packed weights and scales are kept (`int4_kernels`:
    AVX-512 VNNI where the CPU has it, else torch's own kernel); the portable tensors are rebuilt from them for
    saving, and kept beside them only when the kernel's layout cannot be inverted.
    """

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._portable: torch.Tensor | None = qweight
        self._packed: torch.Tensor | None = None
        self._kernel_scales: torch.Tensor | None = None
        self.kernel = None

    @staticmethod
    def supports(linear: nn.Linear, group_size: int) -> bool:
        return linear.out_features % INT4_ROW_BLOCK == 0 and linear.in_features % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> "Int4Linear":
        out_features, in_features = linear.weight.shape
        weight = linear.weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((weight - low) / scales).clamp(0, 15).to(torch.uint8).reshape(out_features, in_features)
        zeros = low + 8 * scales  # so that (q - 8) * scale + zero == low + q * scale
        scales_and_zeros = torch.stack([scales.squeeze(-1), zeros.squeeze(-1)], -1).transpose(0, 1).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scales_and_zeros.to(torch.bfloat16), group_size, bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, group_size: int) -> "Int4Linear":
        return cls(torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                   torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16), group_size,
                   torch.empty(out_features, dtype=torch.bfloat16) if bias else None)

    @classmethod
    def from_packed(cls, kernel, weights: torch.Tensor, scales: torch.Tensor, group_size: int) -> "Int4Linear":
        """A layer over already packed tensors (the lean decoder's fused projections)."""
        layer = cls(torch.empty(0, weights.shape[1], dtype=torch.uint8), None, group_size, None)
        layer.out_features, layer._portable = weights.shape[0], None
        layer.kernel, layer._packed, layer._kernel_scales = kernel, weights, scales
        return layer

    def _unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernel.unpack(self._packed, self._kernel_scales, self.in_features)

    def values(self) -> torch.Tensor:
        """The unsigned 4-bit values, [out, in] uint8."""
        return _nibbles(self._portable) if self._portable is not None else self._unpacked()[0]

    def portable(self) -> torch.Tensor:
        if self._portable is not None:
            return self._portable
        q = self.values()
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()

    def portable_scales(self) -> torch.Tensor:
        """scales_and_zeros, bf16 [in/group, out, 2]."""
        return self.scales_and_zeros if self.scales_and_zeros is not None else self._unpacked()[1]

    def dequantize(self) -> torch.Tensor:
        """The bf16 weight [out, in], computed as q * scale + (zero - 8 * scale) in one fp32 pass."""
        q = self.values().reshape(self.out_features, -1, self.group_size)
        scales, zeros = self.portable_scales().float().transpose(0, 1).unbind(-1)
        low = (zeros - 8 * scales)[..., None]
        weight = torch.addcmul(low, q.float(), scales[..., None])
        return weight.reshape(self.out_features, self.in_features).to(torch.bfloat16)

    def pack(self) -> None:
        """Builds the kernel's packed weights and scales (once, after quantizing or loading), in slices of rows
        so that the staging copies stay small (the 32000-row lm_head's values are 65 MB)."""
        if self._packed is not None:
            return
        self.kernel = int4_kernels.selected()
        # Both layouts pack whole blocks of rows into the same number of bytes, so where the portable copy is not
        # kept the blocks are packed in place (the lm_head alone would otherwise hold ~100 MB of copies at once).
        in_place = self.kernel.unpack_known()
        weights = self._portable if in_place else torch.empty_like(self._portable)
        scales = []
        step = INT4_ROW_BLOCK * 16
        for i in range(0, self.out_features, step):
            packed, packed_scales = self.kernel.pack(_nibbles(self._portable[i:i + step]),
                                                     self.scales_and_zeros[:, i:i + step])
            weights[i:i + step] = packed
            scales.append(packed_scales)
        self._packed = weights
        self._kernel_scales = torch.cat(scales, dim=self.kernel.scale_rows_dim)
        if in_place:
            self._portable = self.scales_and_zeros = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pack()
        shape = x.shape
        y = self.kernel.mm(x.reshape(-1, shape[-1]), self._packed, self._kernel_scales, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # before packing, a copy: packing rewrites the portable tensor in place
        destination[prefix + "qweight"] = self._portable.clone() if self._packed is None else self.portable()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scales_and_zeros"] = self.portable_scales()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        qweight = state_dict.get(key)
        if qweight is not None and (tuple(qweight.shape) != (self.out_features, self.in_features // 2)
                                    or qweight.dtype != torch.uint8):
            error_msgs.append(f"{key}: expected uint8 {(self.out_features, self.in_features // 2)}, "
                              f"got {qweight.dtype} {tuple(qweight.shape)}")
            qweight = None
        elif qweight is None:
            missing_keys.append(key)
        if self._packed is not None and (qweight is not None or prefix + "scales_and_zeros" in state_dict):
            # back to the portable tensors, since packing in place dropped them: a partial load (strict=False)
            # replaces one of the two and keeps the other; the next forward packs again
            self._portable, self.scales_and_zeros = self.portable(), self.portable_scales()
            self._packed = self._kernel_scales = None
        if qweight is not None:  # copied, as nn.Module copies into its tensors: packing rewrites it in place
            self._portable = qweight.clone()
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel.name}" if self.kernel else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}{kernel}"


def _nibbles(portable: torch.Tensor) -> torch.Tensor:
    return torch.stack([portable & 15, portable >> 4], -1).reshape(portable.shape[0], -1)


QUANTIZED_CLASSES = {"int8": Int8Linear, "int4": Int4Linear}


def quantizable_linears(model: nn.Module, include_vision: bool = True):
    """(parent, attribute name, qualified name, linear) for every quantizable `nn.Linear` of the model."""
    for name, module in model.named_modules():
        if not include_vision and is_vision_module(name):
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Linear:
                yield module, child_name, f"{name}.{child_name}" if name else child_name, child


def is_vision_module(name: str) -> bool:
    return ".vision_tower" in f".{name}" or ".mm_projector" in f".{name}"


# The CLIP tower and projector are int8 in both modes: they see ~600 rows per image, where an int8 GEMM beats a
# bf16 one and int4 is no faster but much less accurate (docs/notes/speed.md).
VISION_MODE = "int8"


def quantized_class(mode: str, name: str, vision_mode: str = VISION_MODE) -> type[nn.Module]:
    return QUANTIZED_CLASSES[vision_mode if is_vision_module(name) else mode]


def to_bfloat16(model: nn.Module) -> nn.Module:
    """Casts parameters and buffers to bf16 except rotary frequencies, which transformers keeps in fp32 (in
    bf16 the positions' angles drift by up to ~0.4 % and every attention score with them)."""
    rotary = {name: buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    model.to(torch.bfloat16)
    for name, buffer in rotary.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buffer
    return model


def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   include_vision: bool = True) -> nn.Module:
    """Replaces the language model's linears (`mode`) and the vision side's (int8; kept in bf16 without
    `include_vision`) in place.

    Everything else is cast to bf16. Returns the model; records the scheme in `model.config.quantization`
    so that `save_quantized` writes it and the loader rebuilds the same modules.
    """
    if mode not in MODES:
        raise MobileVLMError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise MobileVLMError(f"--quantize {mode} uses CPU kernels; the model is on {device} (use --load-8bit/4bit on GPU)")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise MobileVLMError(f"int4 group size {group_size}: use one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    to_bfloat16(model)
    skipped = []
    for parent, attr, name, linear in list(quantizable_linears(model, include_vision)):
        kind = quantized_class(mode, name)
        if kind is Int4Linear and not Int4Linear.supports(linear, group_size):
            skipped.append(name)
            continue
        quantized = Int8Linear.from_linear(linear) if kind is Int8Linear else Int4Linear.from_linear(linear, group_size)
        setattr(parent, attr, quantized)
    if skipped:
        raise MobileVLMError(f"int4 needs out_features % {INT4_ROW_BLOCK} == 0 and in_features % {group_size} == 0; "
                             f"these layers do not fit: {', '.join(skipped[:6])} (try a smaller --group-size)")
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int8Linear)):
            module.pack()
    if hasattr(model, "config"):
        model.config.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                                     "include_vision": include_vision, "vision_mode": VISION_MODE}
    return model
