"""pagedllm's CPU kernels (`csrc/cpu/*.cpp`), compiled on first use, and their Python calls.

The jobs where eager PyTorch is slow on CPU:
- decode attention (`paged_decode`): PyTorch gathers every block of every sequence into a
  padded copy and runs SDPA over it; the kernel reads each cached key and value once, in place;
- the elementwise ops between the matmuls (RMSNorm + residual, SiLU-and-mul, rotary): several
  ops and passes over memory each in eager PyTorch, one op and one pass here; so are the two
  halves of an int8 linear layer around oneDNN's matmul (`quantization="int8"`: the activation's
  per-token quantisation, and the per-row rescale of the product).

They are built with PyTorch's own extension builder (`torch.utils.cpp_extension.load`: the
system C++ compiler and ninja, about 20 s, once per machine; later processes load the cached
library in well under a second), for this machine's CPU (`-march=native`), so the cache name
carries a digest of the CPU's feature flags, and one of the sources (checkouts never share a
build). Threads come from PyTorch's pool (`at::parallel_for`).

`PAGEDLLM_CPU_ISA` picks the instruction set the kernels are built for: `native` (the default: all
this CPU has), `avx2` (no AVX-512 and no AVX-VNNI, as on Haswell-Skylake client or Zen 2/3 CPUs:
the GGUF kernels take their AVX2 paths) or `avxvnni` (AVX2 plus AVX-VNNI's 256-bit vpdpbusd, no
AVX-512: Alder Lake-like). The choice is part of the library's cache name, so builds coexist; a
narrower build runs and tests on a wider CPU, which is how the fallbacks are tested here.

Without a compiler, or with `PAGEDLLM_CPU_KERNELS=0`, everything keeps the PyTorch path (same
results up to float rounding, slower) and the log says so once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil

import torch

from pagedllm.logger import init_logger
from pagedllm.utils import env_flag

logger = init_logger(__name__)

CPU_KERNELS_ENV = "PAGEDLLM_CPU_KERNELS"
# The storage types every kernel takes (the math is float32 inside).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# What the decode attention kernel reads a KV cache in: also vLLM's fp8 kv_cache_dtypes.
KERNEL_CACHE_DTYPES = KERNEL_DTYPES + (torch.float8_e4m3fn, torch.float8_e5m2)
_SOURCE_DIR = os.path.join(os.path.dirname(__file__), "csrc", "cpu")
_SOURCES = ["registration.cpp", "paged_decode.cpp", "layernorm.cpp", "activation.cpp", "rotary.cpp",
            "quantize.cpp", "gguf_gemm.cpp", "gguf_gemm_tiled.cpp", "gguf_quantize_simd.cpp",
            "decode_attention.cpp", "gguf_decode_layers.cpp"]
# -ffast-math lets the compiler vectorise exp (glibc's vector math) and the float reductions; it
# is a compile flag only, so the flush-to-zero start-up code it implies is never linked in.
# -fopenmp because at::parallel_for is inline OpenMP (without it, it silently runs on one thread);
# the library then needs libgomp.so.1, which resolves to the one torch has already loaded.
# GCC tunes -march=native on AVX-512 CPUs for 256-bit vectors; the kernels' loops are short
# (a head_dim of 64 is four 512-bit vectors), so full-width vectors and unrolled loops with split
# accumulators took decode attention from 1.02 to 0.68 ms per call (one thread, W1's shapes).
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-mprefer-vector-width=512", "-funroll-loops",
           "-fvariable-expansion-in-unroller"]
_LDFLAGS = ["-fopenmp"]
CPU_ISA_ENV = "PAGEDLLM_CPU_ISA"
# Flags added to -march=native: -mno-avx512f turns off every AVX-512 subset (VNNI, BW, BF16 ...).
_ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f", "-mno-avxvnni"], "avxvnni": ["-mno-avx512f"]}


def cpu_isa() -> str:
    """The instruction set the kernels are built for, from `PAGEDLLM_CPU_ISA` (default `native`)."""
    isa = os.environ.get(CPU_ISA_ENV, "").strip().lower() or "native"
    if isa not in _ISA_FLAGS:
        raise ValueError(f"{CPU_ISA_ENV}={os.environ[CPU_ISA_ENV]!r}: expected one of {', '.join(_ISA_FLAGS)}")
    return isa


def _cpu_digest() -> str:
    """A short digest of the CPU model and feature flags, so a cache shared between machines
    never hands one CPU a library built for another's instruction set."""
    try:
        with open("/proc/cpuinfo") as f:
            info = "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        info = platform.processor()
    return hashlib.sha256((platform.machine() + info).encode()).hexdigest()[:10]


def _source_digest() -> str:
    """A short digest of the kernels' sources: two checkouts (or versions) of pagedllm sharing one
    extension cache get libraries of different names, so neither loads the other's build (torch's
    builder rebuilds a same-named library whose sources changed, under a process that has it loaded)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(_SOURCE_DIR)):
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(_SOURCE_DIR, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:10]


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; an un-activated venv has the pip one off PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def cpu_fast_paths_enabled() -> bool:
    """False under `PAGEDLLM_CPU_KERNELS=0`, which turns off every CPU-only fast path: these kernels
    and the oneDNN-packed linear weights (`layers/cpu_packed_linear.py`). `quantization="int8"` is
    a change of numerics the user asked for, so it still runs (oneDNN's int8 matmul, with PyTorch
    ops in place of the quantisation kernels)."""
    return env_flag(CPU_KERNELS_ENV, default=True)


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (or load the cached build of) the kernels; False, with a logged reason, if it cannot."""
    if not cpu_fast_paths_enabled():
        logger.info("%s=0: the CPU kernels are off; PyTorch ops run instead", CPU_KERNELS_ENV)
        return False
    if hasattr(torch.ops.pagedllm_cpu, "paged_decode"):
        return True
    isa = cpu_isa()  # a wrong value is the user's error, raised; not a reason to fall back quietly
    try:
        from torch.utils.cpp_extension import load

        _ensure_ninja_on_path()
        logger.debug("loading the CPU kernels (the first time on a machine builds them)")
        suffix = "" if isa == "native" else f"_{isa}"
        load(name=f"pagedllm_cpu_kernels_{_cpu_digest()}_{_source_digest()}{suffix}", sources=[os.path.join(_SOURCE_DIR, f) for f in _SOURCES],
             extra_cflags=_CFLAGS + _ISA_FLAGS[isa], extra_ldflags=_LDFLAGS, extra_include_paths=[_SOURCE_DIR], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a read-only cache: fall back, never fail
        logger.warning("could not build the CPU kernels (%s: %s); attention and the elementwise ops use "
                       "the slower PyTorch path", type(e).__name__, " ".join(str(e).strip().splitlines()[-1:]))
        return False
    return True


def paged_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Decode attention into `out` [seqs, heads, dim] for `query` (one token per sequence),
    over `seq_lens[i]` cached keys reached through `block_tables[i]` (both int64); a local layer's
    over its last `sliding_window` keys only, scores capped at `soft_cap` (Gemma 2). An fp8 cache
    holds K / k_scale and V / v_scale."""
    torch.ops.pagedllm_cpu.paged_decode(out, query, k_cache, v_cache, block_tables, seq_lens, scale,
                                        sliding_window or 0, soft_cap or 0.0, k_scale, v_scale)


def decode_attention(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, num_heads: int, num_kv_heads: int,
                     scale: float, sliding_window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """A decode-only step's attention from the fused QKV output `qkv` [seqs, (heads + 2 kv_heads) * dim]:
    rotary on q and k (in place), k/v written at `slot_mapping`, then `paged_decode`; returns the
    attention output [seqs, heads * dim] (o_proj's input). One op for what is ~15 per layer otherwise."""
    return torch.ops.pagedllm_cpu.decode_attention(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                                                   block_tables, seq_lens, num_heads, num_kv_heads, scale,
                                                   sliding_window or 0, soft_cap or 0.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.pagedllm_cpu.rms_norm(out, x, weight, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), into new tensors."""
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.pagedllm_cpu.add_rms_norm(out, residual_out, x, residual, weight, eps)
    return out, residual_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops.pagedllm_cpu.silu_and_mul(out, x)
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, heads, dim] and k [T, kv_heads, dim] in place by the cos/sin tables' rows at
    `positions`; returns them."""
    torch.ops.pagedllm_cpu.rotary_embedding(q, k, positions, cos, sin)
    return q, k


def quantize_per_token(x: torch.Tensor, levels: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 per row of `x` [rows, n], each row's range onto 0..levels: (q, scale,
    zero_point), the last two float32 [rows, 1], with x ≈ scale * (q - zero_point)."""
    q = torch.empty(x.shape, dtype=torch.uint8)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32)
    zero_point = torch.empty(x.shape[0], 1, dtype=torch.float32)
    torch.ops.pagedllm_cpu.quantize_per_token(q, scale, zero_point, x, levels)
    return q, scale, zero_point


def dequantize_int8_output(out: torch.Tensor, acc: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           wsum: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out = scale * (acc - zero_point * wsum) + bias, row by row (`out` may be `acc` itself)."""
    torch.ops.pagedllm_cpu.dequantize_int8_output(out, acc, scale, zero_point, wsum, bias)
    return out


def quantize_q8_blocks(x: torch.Tensor, act_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's q8_1 of `x` [rows, k] per block of 32, in `gguf_gemm`'s byte order: (qa int8
    [rows, k padded to 128], d float32 [rows, k/32], s = d * sum(q) float32 [rows, k/32]).
    `act_bits=15`: d = amax / 16383 and q in two int8 planes (q = 128 h + l), qa twice as wide."""
    if act_bits not in (8, 15):
        raise ValueError(f"act_bits must be 8 or 15, not {act_bits}")
    rows, k = x.shape
    qa = torch.empty(rows, -(-k // 128) * 128 * (2 if act_bits == 15 else 1), dtype=torch.int8)
    d = torch.empty(rows, k // 32, dtype=torch.float32)
    s = torch.empty(rows, k // 32, dtype=torch.float32)
    torch.ops.pagedllm_cpu.quantize_q8_blocks(qa, d, s, x)
    return qa, d, s


def gguf_gemm(out: torch.Tensor, activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor], qweight: torch.Tensor,
              scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None, bits: int,
              vectorised: bool = True) -> torch.Tensor:
    """out [m, n] (float32, rows may be strided: a column slice of a wider output) = the quantised
    activations (8 or 15-bit, as `quantize_q8_blocks` made them) times a block-quantised weight
    (`layers/quantization/gguf_blocks.py`, scales per 32 or per 16), plus bias.
    `vectorised=False` takes the portable loop instead of the build's vector path (AVX-512 VNNI, or
    AVX2 where the build has no AVX-512: `gguf_gemm_vector_isa()`) (for tests)."""
    qa, d, s = activations
    torch.ops.pagedllm_cpu.gguf_gemm(out, qa, d, s, qweight, scales, mins, bias, bits, vectorised)
    return out


def gguf_gemm_tiled(out: torch.Tensor, activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None,
                    bits: int) -> torch.Tensor:
    """`gguf_gemm`'s product by the many-row kernel (`csrc/cpu/gguf_gemm_tiled.cpp`: 16 weight rows
    a vector, repacked per call), at any row count; needs AVX-512 VNNI (`gguf_gemm_tiled_min_rows() > 0`)."""
    qa, d, s = activations
    torch.ops.pagedllm_cpu.gguf_gemm_tiled(out, qa, d, s, qweight, scales, mins, bias, bits)
    return out


def gguf_gemm_auto(out: torch.Tensor, activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """`gguf_gemm` for a few rows, `gguf_gemm_tiled` from `gguf_gemm_tiled_min_rows()` rows on (from
    16 rows for a weight of more than 8 MiB, which the GEMV streams from memory faster)."""
    qa, d, s = activations
    torch.ops.pagedllm_cpu.gguf_gemm_auto(out, qa, d, s, qweight, scales, mins, bias, bits)
    return out


def gguf_gemm_tiled_min_rows() -> int:
    """The row count from which `gguf_linear` takes the tiled kernel on a weight of up to 8 MiB;
    0 where it is not built."""
    return int(torch.ops.pagedllm_cpu.gguf_gemm_tiled_min_rows())
