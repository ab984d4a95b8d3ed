"""The two CPU kernels behind `Int4Linear`, each with its own in-memory weight layout.

- `VnniKernel`: int4 weights x int8 activations with AVX-512 VNNI dot products (kernels/vnni_matmul.cpp, one of
  the `native` kernels, built on first use). Decoding becomes memory-bound instead of compute-bound (several times
  aten's kernel: docs/notes/speed.md), at the price of rounding activations to int8 per group, as llama.cpp's
  Q4_0 x Q8_0 does.
- `AtenKernel`: torch's `aten._weight_int4pack_mm_for_cpu` (bf16 activations), where the native kernels are
  not available (no AVX-512 VNNI, no C++ compiler, or MOBILEVLM_NATIVE_KERNELS=0).

Both keep the weights as a [out, in/2] uint8 tensor whose rows can be concatenated and sliced in whole blocks
(what the lean decoder's q/k/v and gate/up fusion does). Checkpoints never hold either layout: they store the
portable nibbles, so a file written on one machine loads on the other.
"""
from __future__ import annotations

import functools

import torch

from mobilevlm.fast import native

ROW_BLOCK = 64  # rows per packed block of the aten layout; the VNNI layout's 16 divides it


class AtenKernel:
    name = "aten"
    scale_rows_dim = 1  # scales_and_zeros [in/group, out, 2]

    @staticmethod
    def pack(values: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Int4Linear.pack hands over slices of whole row blocks, so the int32 copy the packer takes stays small
        return torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1), scales_and_zeros

    @staticmethod
    def unpack(weights: torch.Tensor, scales: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of the AVX-512 packing: per block of 64 output rows, for each input channel, 32 bytes whose low
        nibbles are rows 0-31 and high nibbles rows 32-63."""
        out_features = weights.shape[0]
        blocks = weights.reshape(out_features // ROW_BLOCK, in_features, ROW_BLOCK // 2)
        rows = torch.cat([blocks & 15, blocks >> 4], -1)
        return rows.transpose(1, 2).reshape(out_features, in_features), scales

    @staticmethod
    def unpack_known() -> bool:
        """Whether `unpack` inverts this torch's packing (the layout is private to torch): if not, the portable
        copy of the weights is kept beside the packed one."""
        return _aten_layout_known()

    @staticmethod
    def mm(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weights, group_size, scales)

    @staticmethod
    def split_scales(scales: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | None:
        return None  # row slices of [in/group, out, 2] are not contiguous: each part keeps its own copy


class VnniKernel:
    name = "vnni"
    scale_rows_dim = 0  # [out, 2 * in/group]: per block of 16 rows and group, 16 scales then 16 zeros

    @staticmethod
    def pack(values: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = values.shape
        # chunk (block b, channels k0..k0+7): row r's 4 bytes hold channels k0+i (low nibble) and k0+4+i (high)
        v = values.reshape(out_features // 16, 16, in_features // 8, 2, 4).permute(0, 2, 3, 1, 4)
        weights = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(out_features, in_features // 2)
        groups = scales_and_zeros.shape[0]
        scales = scales_and_zeros.reshape(groups, out_features // 16, 16, 2).permute(1, 0, 3, 2)
        return weights.contiguous(), scales.reshape(out_features, 2 * groups).contiguous()

    @staticmethod
    def unpack(weights: torch.Tensor, scales: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, groups = weights.shape[0], scales.shape[1] // 2
        chunks = weights.reshape(out_features // 16, in_features // 8, 1, 16, 4)
        v = torch.cat([chunks & 15, chunks >> 4], 2)  # [blocks, in/8, half, 16, 4]
        values = v.permute(0, 3, 1, 2, 4).reshape(out_features, in_features)
        scales_and_zeros = scales.reshape(out_features // 16, groups, 2, 16).permute(1, 0, 3, 2)
        return values, scales_and_zeros.reshape(groups, out_features, 2).contiguous()

    @staticmethod
    def unpack_known() -> bool:
        return True

    @staticmethod
    def mm(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
        out_features, in_features = weights.shape[0], weights.shape[1] * 2
        return torch.ops.mobilevlm_vnni.int4_mm(x, weights.view(out_features // 16, in_features // 8, 64),
                                           scales.view(out_features // 16, in_features // group_size, 2, 16),
                                           group_size)

    @staticmethod
    def split_scales(scales: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        return list(scales.split(sizes))


@functools.lru_cache(maxsize=None)
def _aten_layout_known() -> bool:
    probe = torch.randint(0, 16, (2 * ROW_BLOCK, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    return packed.numel() * 2 == probe.numel() and torch.equal(
        AtenKernel.unpack(packed, None, probe.shape[1])[0].to(torch.int32), probe)


def selected() -> type[AtenKernel] | type[VnniKernel]:
    """The kernel int4 layers use in this process."""
    return VnniKernel if native.available() else AtenKernel
