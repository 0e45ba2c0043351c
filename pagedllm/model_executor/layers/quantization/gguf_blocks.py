"""GGUF's quantised blocks decoded into one form the CPU kernels read, and the PyTorch reference.

llama.cpp's types differ in how a block stores its numbers, not in what they mean: every one
supported here is, per block of 32 weights, an unsigned integer q with a scale and a min,
w = scale * q + min (Q4_0: d, -8d; Q4_1: d, m; Q8_0: q = qs + 128, d, -128d; Q5_0/Q5_1 as Q4_x
with a fifth bit; Q4_K/Q5_K: the super-block's d and dmin times each sub-block's 6-bit scale and
min). So they are decoded once at load (vectorised numpy, seconds for a 0.5 GB file) into
`BlockQuantizedWeight`: q packed in 4 or 8 bits, scale and min as float32 (exact: a f16 times a
6-bit integer). 4-bit rows keep GGUF's own byte order (byte j of a block: element j low, j + 16
high); 8-bit rows are reordered in groups of 4 blocks (first halves, then second halves) so that
both widths meet the same activation layout in the kernel (`csrc/cpu/gguf_gemm.cpp`).

Q6_K has a scale per 16 weights: its q (6 bits, in a byte) gets a scale and a min per 16,
w = d * sc * q - 32 d * sc, and the kernel keeps the two halves of each block apart. The rarer
types (Q2_K, Q3_K, IQ*) are not decoded here: `decode` returns None and the layer keeps those rows
dequantised (`gguf.dequantize`, float32).

The reference arithmetic (`quantize_activations`, `block_linear_reference`) is the kernel's,
written with PyTorch ops: activations as llama.cpp's q8_1 (int8 per block of 32, d = amax / 127,
s = d * sum q) or, with `act_bits=15`, d = amax / 16383 and q in [-16383, 16383]; exact int32 block
sums, then the float scales. It is what the kernels are tested
against, bit for bit on the integer parts, and the path taken where they cannot be built.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

BLOCK = 32
GROUP = 4  # blocks per kernel step: 128 weights, one 512-bit vector of each half


@dataclass
class BlockQuantizedWeight:
    """A [out, in] weight as blocks of `sub` (32, or 16 for Q6_K): w[n, sub * b + j] =
    scales[n, b] * q[n, sub * b + j] + mins[n, b], q held in `bits` bits (`qweight`, the kernel's
    byte order, blocks of 32 either way)."""

    bits: int
    qweight: torch.Tensor  # uint8 [out, in * bits / 8]
    scales: torch.Tensor  # float32 [out, in / sub]
    mins: torch.Tensor  # float32 [out, in / sub]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8 // self.bits

    @property
    def sub(self) -> int:
        """Weights per scale and min: 32, or 16 (Q6_K)."""
        return self.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins))

    def unpacked(self) -> torch.Tensor:
        """q as uint8 [out, in], in natural element order."""
        return unpack(self.qweight, self.bits, self.shape[1])

    def rows(self, ids: torch.Tensor) -> BlockQuantizedWeight:
        """Output rows `ids` (int64, on the weight's device), still in blocks: an embedding lookup
        dequantises only the rows asked for."""
        return BlockQuantizedWeight(self.bits, self.qweight.index_select(0, ids), self.scales.index_select(0, ids),
                                    self.mins.index_select(0, ids))

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix this weight stands for, on its device."""
        out, k = self.shape
        q = self.unpacked().view(out, k // self.sub, self.sub).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(out, k)


# ----- decoding GGUF blocks ----------------------------------------------------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of a little-endian uint32 -> [..., 32] bits."""
    return np.unpackbits(qh, axis=-1, bitorder="little")  # bit j of the uint32 is bit j % 8 of byte j // 8


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit sub-block scales and 8 mins. Bytes 0-3 carry scales 0-3
    in their low 6 bits, 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from bytes
    8-11 and their high 2 bits from the top of bytes 0-3 (scales) and 4-7 (mins)."""
    a, b, c = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


# Q4_0 and Q4_1 bytes are already the kernel's 4-bit bytes: they are copied, not unpacked (`PACKED`).
def _decode_q4_0(b: np.ndarray):
    d = _f16(b[..., 0:2])
    return b[..., 2:18], d, -8 * d


def _decode_q4_1(b: np.ndarray):
    return b[..., 4:20], _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _decode_q5_0(b: np.ndarray):
    d = _f16(b[..., 0:2])
    return _nibbles_32(b[..., 6:22]) | (_fifth_bits(b[..., 2:6]) << 4), d, -16 * d


def _decode_q5_1(b: np.ndarray):
    return _nibbles_32(b[..., 8:24]) | (_fifth_bits(b[..., 4:8]) << 4), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _decode_q8_0(b: np.ndarray):
    d = _f16(b[..., 0:2])
    return b[..., 2:34] ^ np.uint8(0x80), d, -128 * d  # int8 x + 128, as a byte


def _decode_k(b: np.ndarray, fifth_bit: bool):
    """Q4_K (144 bytes) / Q5_K (176 bytes) super-blocks of 256 -> 8 sub-blocks of 32 each."""
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48] if fifth_bit else None
    qs = b[..., 48:176] if fifth_bit else b[..., 16:144]
    # 4 chunks of 32 bytes: the low nibbles are sub-block 2c, the high nibbles sub-block 2c + 1
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    q = ((chunks >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 0x0F).reshape(*qs.shape[:-1], 8, 32)
    if fifth_bit:  # bit i of qh[l] is the fifth bit of element l of sub-block i
        high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        q = q | (high << 4)
    return q, d * sc, -(dmin * mn)


def _decode_q6_k(b: np.ndarray):
    """Q6_K (210 bytes): ql[128] low 4 bits, qh[64] high 2 bits, 16 int8 scales, f16 d. Per half
    (128 weights) h: element 32 i + l (i < 4, l < 32) has its low bits in ql[64 h + 32 (i % 2) + l]
    (low nibble for i < 2, high for i >= 2) and its high bits at bit 2 i of qh[32 h + l]."""
    ql, qh, sc = b[..., 0:128], b[..., 128:192], b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    ql = ql.reshape(*ql.shape[:-1], 2, 1, 2, 32)  # [half, nibble, i % 2, l]
    low = (ql >> np.array([0, 4], dtype=np.uint8).reshape(2, 1, 1)) & 0x0F  # [half, i // 2, i % 2, l]
    qh = qh.reshape(*qh.shape[:-1], 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & 3  # [half, i, l]
    q = low.reshape(*low.shape[:-4], 2, 4, 32) | (high << 4)
    scale = d * sc
    return q.reshape(*q.shape[:-3], 8, 32), scale, -32 * scale


# GGML type name -> (bytes per block, weights per block, decoder, bits the kernel holds q in)
_DECODERS = {
    "Q4_0": (18, 32, _decode_q4_0, 4),
    "Q4_1": (20, 32, _decode_q4_1, 4),
    "Q5_0": (22, 32, _decode_q5_0, 8),
    "Q5_1": (24, 32, _decode_q5_1, 8),
    "Q8_0": (34, 32, _decode_q8_0, 8),
    "Q4_K": (144, 256, lambda b: _decode_k(b, False), 4),
    "Q5_K": (176, 256, lambda b: _decode_k(b, True), 8),
    "Q6_K": (210, 256, _decode_q6_k, 8),
}
KERNEL_TYPES = tuple(_DECODERS)
PACKED = ("Q4_0", "Q4_1")


def decode(raw: np.ndarray, type_name: str) -> BlockQuantizedWeight | None:
    """A GGUF tensor's rows of blocks (uint8 [out, row bytes]) as a `BlockQuantizedWeight`, or None
    for a type the kernels do not take."""
    if type_name not in _DECODERS:
        return None
    with _small_pages():
        return _decode(raw, type_name)


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    """NumPy asks for transparent huge pages on large arrays; where the kernel's THP defrag is
    `madvise`, each first touch of one then waits on memory compaction. Decoding touches fresh
    memory all the time: without huge pages Qwen2.5-0.5B's Q5_0 rows decode in half the time."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # NumPy 2 / 1
    previous = multiarray._set_madvise_hugepage(False)
    try:
        yield
    finally:
        multiarray._set_madvise_hugepage(previous)


def _decode(raw: np.ndarray, type_name: str) -> BlockQuantizedWeight:
    block_bytes, _, decoder, bits = _DECODERS[type_name]
    rows = raw.shape[0]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)
    q, scale, mn = decoder(blocks)
    q = np.asarray(q, dtype=np.uint8).reshape(rows, -1)
    if type_name not in PACKED:
        q = _pack_numpy(q, bits)
    return BlockQuantizedWeight(
        bits=bits,
        qweight=torch.from_numpy(np.ascontiguousarray(q)),
        scales=torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1)),
        mins=torch.from_numpy(np.ascontiguousarray(mn, dtype=np.float32).reshape(rows, -1)),
    )


# ----- the kernel's byte order ---------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _group_order(k: int, padded: bool = False) -> torch.Tensor:
    """Index i of the kernel's 8-bit order -> the element it holds: per group of 4 blocks, the
    first 16 elements of each block, then the last 16 of each. `padded`: the activations' order,
    where a last group of fewer blocks still takes 64 bytes a half (-1 marks the padding). Cached
    (an embedding lookup unpacks a row every step): callers must not write to it."""
    nb = k // BLOCK
    order = []
    for g in range(0, nb, GROUP):
        blocks = list(range(g, min(g + GROUP, nb)))
        for half in (0, 16):
            order += [b * BLOCK + j for b in blocks for j in range(half, half + 16)]
            if padded:
                order += [-1] * (16 * (GROUP - len(blocks)))
    return torch.tensor(order, dtype=torch.long)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 q [out, in] (natural order) -> the kernel's bytes."""
    out, k = q.shape
    if bits == 4:
        blocks = q.reshape(out, k // BLOCK, BLOCK)
        return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(out, k // 2).contiguous()
    return q[:, _group_order(k)].contiguous()


def _pack_numpy(q: np.ndarray, bits: int) -> np.ndarray:
    """`pack` at load, in numpy: one strided copy rather than a gather (Qwen2.5-0.5B's 8-bit rows
    took seconds through `pack`'s index tensor)."""
    rows, k = q.shape
    if bits == 4:
        blocks = q.reshape(rows, k // BLOCK, BLOCK)
        return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(rows, k // 2)
    nb = k // BLOCK
    full = nb // GROUP * GROUP * BLOCK  # elements in whole groups of 4 blocks
    out = np.empty((rows, k), dtype=np.uint8)
    # per group: [block][half][16] -> [half][block][16]; a last, shorter group the same way
    out[:, :full].reshape(rows, -1, 2, GROUP, 16)[...] = q[:, :full].reshape(rows, -1, GROUP, 2, 16).transpose(0, 1, 3, 2, 4)
    tail = (k - full) // BLOCK
    if tail:
        out[:, full:].reshape(rows, 2, tail, 16)[...] = q[:, full:].reshape(rows, tail, 2, 16).transpose(0, 2, 1, 3)
    return out


def unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    out = qweight.shape[0]
    if bits == 4:
        blocks = qweight.reshape(out, k // BLOCK, 16)
        return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(out, k)
    q = torch.empty(out, k, dtype=torch.uint8, device=qweight.device)
    q[:, _group_order_on(k, qweight.device)] = qweight
    return q


@functools.lru_cache(maxsize=64)
def _group_order_on(k: int, device: torch.device) -> torch.Tensor:
    """`_group_order(k)` on `device`, copied there once."""
    return _group_order(k).to(device)


# ----- the reference arithmetic -------------------------------------------------------------------

ACT_BITS = (8, 15)


def quantize_activations(x: torch.Tensor, act_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of 32: (q [m, k], d float32 [m, k/32], s = d * sum q). act_bits 8: llama.cpp's q8_1
    (d = amax / 127, q int8); 15: d = amax / 16383, q int16 in [-16383, 16383]."""
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be 8 or 15, not {act_bits}")
    m, k = x.shape
    qmax = 127 if act_bits == 8 else 16383
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) * (1 / qmax)  # the kernel's rounding: times float32(1/qmax)
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).to(torch.int8 if act_bits == 8 else torch.int16)
    s = d * q.sum(dim=-1, dtype=torch.int32).float()
    return q.reshape(m, k), d, s


def block_sums(qa: torch.Tensor, q: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Exact int32 dot products per block: qa [m, k], q uint8 [n, k] -> [m, n, k/block]."""
    m, k = qa.shape
    a = qa.reshape(m, k // block, block).to(torch.int32).transpose(0, 1)  # [nb, m, block]
    w = q.reshape(q.shape[0], k // block, block).to(torch.int32).permute(1, 2, 0)  # [nb, block, n]
    return torch.bmm(a.to(torch.float64), w.to(torch.float64)).to(torch.int32).permute(1, 2, 0)


def block_linear_reference(x: torch.Tensor, weight: BlockQuantizedWeight, chunk: int = 4096,
                           act_bits: int = 8) -> torch.Tensor:
    """x W^T in float32, as the kernel computes it: quantised activations, exact block sums, float
    scales. (Float64 products of small integers are exact, so the bmm's sums are the int32 ones.)
    Per-16 weights (Q6_K) take each half block's sum and the activations' own per-16 integer sums
    for the min term: d[b] * (scale * sumi + min * sum q) per half."""
    qa, d, s = quantize_activations(x, act_bits)
    q = weight.unpacked()
    sub = weight.sub
    if sub != BLOCK:
        m, k = qa.shape
        d_sub = d.repeat_interleave(BLOCK // sub, dim=1)  # [m, k/16]
        a_sums = qa.reshape(m, k // sub, sub).sum(-1, dtype=torch.int32).float()  # [m, k/16]
    outs = []
    for n0 in range(0, q.shape[0], chunk):
        sl = slice(n0, n0 + chunk)
        sumi = block_sums(qa, q[sl], sub).float()  # [m, n, k/sub]
        if sub == BLOCK:
            scaled = (sumi * (weight.scales[sl][None] * d[:, None])).sum(-1)
            outs.append(scaled + s @ weight.mins[sl].T)
        else:
            t = sumi * weight.scales[sl][None] + a_sums[:, None] * weight.mins[sl][None]
            outs.append((t * d_sub[:, None]).sum(-1))
    return torch.cat(outs, dim=1)
