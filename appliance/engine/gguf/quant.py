"""GGML tensor types -> MLX arrays.

Three outcomes per tensor, chosen by its GGML type:

- exact affine: types whose blocks are affine over groups of 32 (value = scale * q + bias):
  Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K. Their integers are unpacked from the blocks and
  repacked in MLX's layout with float32 scales and biases, so `mx.dequantize` gives back the
  same values as ggml (within one float32 rounding of the fused multiply-add);
- dense: F32, F16, BF16 (raw bits, never through float16), F64;
- dequantized: every other type the `gguf` package can decode (Q2_K, Q3_K, Q6_K, IQ*, TQ*,
  MXFP4, ...), decoded to float32 with `gguf.quants.dequantize` and, when asked, quantized
  again with `mx.quantize` (their groups are 16 wide or non-uniform, so no MLX layout holds
  them exactly).

A type that none of these covers is refused with its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...errors import ModelLoadError

GROUP = 32  # every exact affine type has groups of 32 along the input axis

Extractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Converted:
    """One tensor in MLX form: dense `weight`, or affine-quantized weight/scales/biases."""

    weight: Any  # mx.array
    scales: Any = None
    biases: Any = None
    bits: int = 0  # 0: dense
    exact: bool = True  # False when re-quantized from a type MLX cannot hold exactly


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block, as float32 of shape (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles first, then high nibbles: the order ggml's 32-element blocks use."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """Bit i of a little-endian uint32 per block -> (n_blocks, n) of 0/1, for Q5_0/Q5_1."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, -8 * d


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    q = _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << 4)
    return q, d, -16 * d


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << 4)
    return q, _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b, 0)
    q = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scale and bias of Q4_K / Q5_K: 8 groups of 32 per 256-element super-block."""
    from gguf.quants import Q4_K

    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * mn.astype(np.float32))


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = b.shape[0]
    qs = b[:, 16:144].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(n, 256), *_k_scales(b)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = b.shape[0]
    ql = b[:, 48:176].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 16:48].reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    q = (ql & 0x0F).reshape(n, 8, 32) | ((qh & 1).reshape(n, 8, 32) << 4)
    return q.reshape(n, 256), *_k_scales(b)


# GGML type name -> (bits, block extractor). Each extractor returns, per block, the integers
# (n_blocks, block) and float32 scales and biases (n_blocks, block // 32).
EXACT: dict[str, tuple[int, Extractor]] = {
    "Q4_0": (4, _q4_0),
    "Q4_1": (4, _q4_1),
    "Q5_0": (5, _q5_0),
    "Q5_1": (5, _q5_1),
    "Q8_0": (8, _q8_0),
    "Q4_K": (4, _q4_k),
    "Q5_K": (5, _q5_k),
}
DENSE = ("F32", "F16", "BF16", "F64")


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers (rows, cols) < 2**bits into MLX's layout: a little-endian bit stream per
    row, element i at bits [i*bits, (i+1)*bits), read as uint32 words."""
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q.astype(np.uint8)).view("<u4")
    if bits == 4:
        q = q.astype(np.uint8).reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(q[..., 0] | (q[..., 1] << 4)).view("<u4")
    planes = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    packed = np.packbits(planes.reshape(rows, cols * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")


def dequantizable(type_name: str) -> bool:
    """Whether the gguf package can decode this GGML type to floats."""
    import gguf
    from gguf import quants

    try:
        qtype = gguf.GGMLQuantizationType[type_name]
    except KeyError:
        return False
    return qtype in quants._type_traits  # the registry of types with a numpy decoder


def supported(type_name: str) -> bool:
    return type_name in EXACT or type_name in DENSE or dequantizable(type_name)


def convert(
    raw: np.ndarray,
    type_name: str,
    shape: tuple[int, ...],
    *,
    requantize_bits: Optional[int],
    row_transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    name: str = "",
) -> Converted:
    """Convert one tensor from its raw bytes (rows, bytes per row) to MLX arrays.

    `row_transform` reorders the rows (output axis) of every array that has them, before
    packing: quantization groups run along the input axis, so reordering rows is exact.
    """
    import mlx.core as mx

    rt = row_transform or (lambda a: a)
    if type_name in DENSE:
        if type_name == "BF16":
            bits16 = rt(np.ascontiguousarray(raw).view("<u2").reshape(shape))
            return Converted(mx.array(bits16).view(mx.bfloat16))
        dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[type_name]
        dense = np.ascontiguousarray(raw).view(dtype).reshape(shape)
        if type_name == "F64":
            dense = dense.astype(np.float32)
        return Converted(mx.array(rt(dense)))
    if len(shape) != 2 or shape[-1] % GROUP:
        raise ModelLoadError(f"tensor {name}: {type_name} tensor of shape {shape} is not a matrix")
    rows, cols = shape
    if type_name in EXACT:
        bits, extract = EXACT[type_name]
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
        blocks = np.ascontiguousarray(raw).reshape(-1, type_size)
        q, scales, biases = extract(blocks)
        q = rt(q.reshape(rows, cols))
        scales = rt(scales.reshape(rows, cols // GROUP))
        biases = rt(biases.reshape(rows, cols // GROUP))
        return Converted(mx.array(pack(q, bits)), mx.array(scales), mx.array(biases), bits)
    if not dequantizable(type_name):
        raise ModelLoadError(
            f"tensor {name} is of GGML type {type_name}, which this appliance cannot read"
        )
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    dense = rt(dequantize(np.asarray(raw), GGMLQuantizationType[type_name]).reshape(shape))
    dense = np.ascontiguousarray(dense, dtype=np.float32)
    if requantize_bits:
        w, s, b = mx.quantize(mx.array(dense), group_size=GROUP, bits=requantize_bits)
        return Converted(w, s, b, requantize_bits, exact=False)
    return Converted(mx.array(dense), exact=True)
