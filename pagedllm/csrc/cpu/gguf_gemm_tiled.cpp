// The many-row product on GGUF blocks (a prefill, a batch of decode rows): a register-blocked
// AVX-512 VNNI GEMM on the same operands as `gguf_gemm.cpp` (its blocked weights, its q8 activations).
//
// The GEMV kernel puts 4 blocks of ONE weight row in a vector: every 128 weights it converts and
// scales 16 int32 lanes per activation row, so float work is half its instructions (~45 GMAC/s on
// one thread). Here a vector holds 16 weight ROWS instead, 4 bytes each (lane r = row r), and the
// matching 4 activation bytes are broadcast (vpdpbusd's {1to16} memory operand): the 8 vpdpbusd
// of a block of 32 accumulate into one int32 vector whose lane r is row r's exact block sum. Then,
// per activation row and block, one conversion and three float ops apply
//     acc[r] += scale[r, b] * (d[b] * sumi[r]) + min[r, b] * s[b]
// (1/3 of the instructions per MAC the GEMV spends on floats, and the output row's 16 columns are
// one store). This is the arrangement of llama.cpp's repacked Q4_0 GEMMs.
//
// That layout is not the one the weights are held in (the GEMV's, one row after another, as the
// file has them), so each call repacks a tile of 16 rows at a time into a small per-thread
// scratch (a 16x16 int32 transpose per 128 weights, 4-bit weights unpacked to bytes: 16 * k bytes,
// 24 KB for k = 1536, in L1/L2) and runs every activation row against it, 8 rows at a time. The
// repack is paid once per tile per 256 activation rows, so the path pays off from a few rows on
// (`kTiledMinRows`, set from benchmarks/gguf_gemm.py); memory stays the held blocks.
//
// The integer block sums are exact, as the GEMV's, so outputs equal the PyTorch reference
// (gguf_blocks.block_linear_reference) up to the order of the float additions.
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace pagedllm {
namespace {

// The blocked form's constants (gguf_gemm.cpp, gguf_blocks.py): blocks of 32, groups of 4 blocks,
// activations padded to whole groups of 128 bytes (64 low-half bytes, then 64 high-half bytes).
constexpr int64_t kBlock = 32;
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kGroupBytes = kBlock * kGroupBlocks;
constexpr int64_t kTileN = 16;       // weight rows per tile: the 16 int32 lanes of a vector
constexpr int64_t kChunkM = 256;     // activation rows per pass over a packed tile (kept in L2)
// Fewer rows than this take the GEMV (no repack): measured with benchmarks/gguf_gemm.py. A matrix
// larger than the caches (SmolLM2's 28 MB Q8_0 LM head) is streamed from DRAM, which the GEMV's
// row-by-row prefetching does faster than the 16-row pack: it keeps the GEMV up to 16 rows.
constexpr int64_t kTiledMinRows = 4;
constexpr int64_t kTiledMinRowsPer16 = 6;  // Q6_K: the GEMV is still faster at 4 rows (0.87x), not at 6 (1.25x)
constexpr int64_t kTiledMinRowsLarge = 16;
constexpr int64_t kLargeWeightBytes = 8 << 20;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kHaveTiled = true;
constexpr int kTileM = 8;  // activation rows per register tile: 8 accumulators + 8 weight vectors

// r[j] (lane i = row i's int32 j) from r[i] (row i's 16 int32): a 16x16 int32 transpose.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xdd);
    t[8 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xdd);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xdd);
    r[4 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xdd);
  }
}

inline __mmask64 byte_mask(int64_t bytes) { return bytes >= 64 ? ~0ULL : ((1ULL << bytes) - 1); }

// Packs weight rows [0, rows) (rows <= 16; the rest of the tile is zeros) into `dst`, block after
// block: 8 vectors a block, vector c's lane r = row r's 4 weights (as bytes) that meet the block's
// activation int32 c (`pack_activations`: c < 4 the low half, c >= 4 the high half). The scales
// and mins go to [block][16 rows], or with a scale per 16 (Q6_K) to [block][half][16 rows].
template <int kBits, int kSub>
void pack_tile(uint8_t* dst, float* ws_t, float* wm_t, const uint8_t* qw, const float* ws, const float* wm,
               int64_t w_stride, int64_t rows, int64_t nb) {
  const int64_t groups = (nb + kGroupBlocks - 1) / kGroupBlocks;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512i* out = reinterpret_cast<__m512i*>(dst);
  __m512i r[16];
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n_in = std::min<int64_t>(kGroupBlocks, nb - g * kGroupBlocks);
    __m512i* og = out + g * kGroupBlocks * 8;  // after the transpose, r[j] is block j / 4's chunk j % 4
    const __mmask64 m = byte_mask(n_in * 16);
    if (kBits == 4) {  // a group is 64 bytes a row: low nibbles are chunks 0-3 of a block, high ones 4-7
      for (int i = 0; i < 16; ++i) {
        r[i] = i < rows ? _mm512_maskz_loadu_epi8(m, qw + i * w_stride + g * 64) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int j = 0; j < n_in * 4; ++j) {
        _mm512_storeu_si512(og + (j / 4) * 8 + j % 4, _mm512_and_si512(r[j], nibble));
        _mm512_storeu_si512(og + (j / 4) * 8 + 4 + j % 4, _mm512_and_si512(_mm512_srli_epi16(r[j], 4), nibble));
      }
    } else {  // a group is n_in * 16 low-half bytes, then n_in * 16 high-half bytes
      for (int half = 0; half < 2; ++half) {
        for (int i = 0; i < 16; ++i) {
          r[i] = i < rows ? _mm512_maskz_loadu_epi8(m, qw + i * w_stride + g * kGroupBytes + half * n_in * 16)
                          : _mm512_setzero_si512();
        }
        transpose16(r);
        for (int j = 0; j < n_in * 4; ++j) _mm512_storeu_si512(og + (j / 4) * 8 + half * 4 + j % 4, r[j]);
      }
    }
  }
  constexpr int64_t kPerBlock = kBlock / kSub;  // scales a row holds per block: 1 or 2
  for (int64_t j = 0; j < nb * kPerBlock; ++j) {
    for (int64_t i = 0; i < kTileN; ++i) {
      ws_t[j * kTileN + i] = i < rows ? ws[i * nb * kPerBlock + j] : 0.f;
      wm_t[j * kTileN + i] = i < rows ? wm[i * nb * kPerBlock + j] : 0.f;
    }
  }
}

// The next tile's scales and mins, requested while this one is computed (its weights: a few lines a
// block in tile_kernel). The pack reads 16 rows at once, more streams than the hardware prefetcher
// follows: a weight larger than the caches (an LM head) was read at a few GB/s without these.
inline void prefetch_rows(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T0);
}

// Activation rows [0, rows) (rows <= 8) of quantize_q8_blocks' output, block after block: per block
// the 8 rows' 32 bytes (the low half, then the high half), d and s as [block][8 rows]. Every address
// in the kernel's loop is then a constant offset from three pointers.
// With 15-bit activations (2 planes) each row's block is its high plane's 32 bytes, then its low
// plane's. With `s16_t` (weights with a scale and min per 16, Q6_K) the min term needs each half
// block's own sum: s16_t [block][8 rows][half] = d * (the half's integer sum), as the GEMV takes it.
void pack_activations(int32_t* dst, float* d_t, float* s_t, float* s16_t, const int8_t* qa, int64_t qa_stride,
                      const float* ad, const float* as, int64_t rows, int64_t nb, int64_t planes) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = (b / kGroupBlocks) * kGroupBytes * planes + (b % kGroupBlocks) * 16;
    for (int64_t m = 0; m < kTileM; ++m) {
      int32_t* o = dst + (b * kTileM + m) * 8 * planes;
      for (int64_t p = 0; p < planes; ++p, o += 8) {
        if (m < rows) {
          std::memcpy(o, qa + m * qa_stride + off + p * kGroupBytes, 16);
          std::memcpy(o + 4, qa + m * qa_stride + off + p * kGroupBytes + 64, 16);
        } else {
          std::memset(o, 0, 32);
        }
      }
      d_t[b * kTileM + m] = m < rows ? ad[m * nb + b] : 0.f;
      s_t[b * kTileM + m] = m < rows ? as[m * nb + b] : 0.f;
      if (s16_t == nullptr) continue;
      for (int64_t h = 0; h < 2; ++h) {
        int32_t sum = 0;
        if (m < rows) {
          const int8_t* half = qa + m * qa_stride + off + h * 64;
          for (int64_t i = 0; i < 16; ++i) sum += planes == 2 ? half[i] * 128 + half[i + kGroupBytes] : half[i];
        }
        s16_t[(b * kTileM + m) * 2 + h] = d_t[b * kTileM + m] * static_cast<float>(sum);
      }
    }
  }
}

// Four vpdpbusd of one half block: w[0..3] against the activation int32s a[0..3], broadcast. A block's
// 8 run as two such chains (its low and its high half), not one of 8: a chain is bound by vpdpbusd's
// latency, not its throughput.
inline __m512i half_block_sums(const __m512i* w, const int32_t* a) {
  __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(a[0]));
  for (int c = 1; c < 4; ++c) s = _mm512_dpbusd_epi32(s, w[c], _mm512_set1_epi32(a[c]));
  return s;
}

// out[m, 0..16) = bias + the packed tile times packed activation rows [0, kRows). kSub 16 (Q6_K):
// the two halves' sums keep their own scales, and the min term takes the halves' activation sums
// (`ps` is then [block][8 rows][half]).
template <int kPlanes, int kSub, int kRows>
void tile_kernel(const __m512i* pw, const float* ws_t, const float* wm_t, const int32_t* pa, const float* pd,
                 const float* ps, int64_t nb, float* out, int64_t o_stride, __mmask16 nmask, const float* bias,
                 const uint8_t* pf, int64_t pf_lines) {
  constexpr int kPerBlock = kBlock / kSub;  // weight scales (and mins) a block: 1, or 2 for Q6_K
  __m512 acc[kRows];
  // the next tile's weights, a few cache lines a block: spread over the compute, as a burst would
  // overrun the core's outstanding misses
  const int64_t pf_per_block = (pf_lines + nb - 1) / std::max<int64_t>(1, nb);
  int64_t pf_next = 0;
  const __m512 b16 = bias ? _mm512_maskz_loadu_ps(nmask, bias) : _mm512_setzero_ps();
  for (int m = 0; m < kRows; ++m) acc[m] = b16;
  for (int64_t b = 0; b < nb; ++b, pw += 8, pa += kTileM * 8 * kPlanes, pd += kTileM, ps += kPerBlock * kTileM) {
    for (int64_t q = 0; q < pf_per_block && pf_next < pf_lines; ++q, ++pf_next) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + pf_next * 64), _MM_HINT_T0);
    }
    __m512i w[8];
    for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(pw + c);
    __m512 wsv[kPerBlock], wmv[kPerBlock];
    for (int j = 0; j < kPerBlock; ++j) {
      wsv[j] = _mm512_loadu_ps(ws_t + (b * kPerBlock + j) * kTileN);
      wmv[j] = _mm512_loadu_ps(wm_t + (b * kPerBlock + j) * kTileN);
    }
    for (int m = 0; m < kRows; ++m) {
      const int32_t* a = pa + m * 8 * kPlanes;
      __m512i lo = half_block_sums(w, a), hi = half_block_sums(w + 4, a + 4);
      __m512i lo_l, hi_l;  // 15-bit: the low plane's, to add to the high plane's sums << 7 (exact in int32)
      if (kPlanes == 2) lo_l = half_block_sums(w, a + 8), hi_l = half_block_sums(w + 4, a + 12);
      if constexpr (kSub == 32) {
        __m512i s = _mm512_add_epi32(lo, hi);
        if (kPlanes == 2) s = _mm512_add_epi32(_mm512_slli_epi32(s, 7), _mm512_add_epi32(lo_l, hi_l));
        const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(pd[m]));
        acc[m] = _mm512_fmadd_ps(t, wsv[0], acc[m]);
        acc[m] = _mm512_fmadd_ps(wmv[0], _mm512_set1_ps(ps[m]), acc[m]);
      } else {
        if (kPlanes == 2) {
          lo = _mm512_add_epi32(_mm512_slli_epi32(lo, 7), lo_l);
          hi = _mm512_add_epi32(_mm512_slli_epi32(hi, 7), hi_l);
        }
        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), wsv[0]);
        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), wsv[1], t);
        acc[m] = _mm512_fmadd_ps(t, _mm512_set1_ps(pd[m]), acc[m]);
        acc[m] = _mm512_fmadd_ps(wmv[0], _mm512_set1_ps(ps[2 * m]), acc[m]);
        acc[m] = _mm512_fmadd_ps(wmv[1], _mm512_set1_ps(ps[2 * m + 1]), acc[m]);
      }
    }
  }
  for (int m = 0; m < kRows; ++m) _mm512_mask_storeu_ps(out + m * o_stride, nmask, acc[m]);
}

using TileKernel = void (*)(const __m512i*, const float*, const float*, const int32_t*, const float*, const float*,
                            int64_t, float*, int64_t, __mmask16, const float*, const uint8_t*, int64_t);
template <int kPlanes, int kSub>
constexpr TileKernel kTileKernels[kTileM + 1] = {
    nullptr, tile_kernel<kPlanes, kSub, 1>, tile_kernel<kPlanes, kSub, 2>, tile_kernel<kPlanes, kSub, 3>,
    tile_kernel<kPlanes, kSub, 4>, tile_kernel<kPlanes, kSub, 5>, tile_kernel<kPlanes, kSub, 6>,
    tile_kernel<kPlanes, kSub, 7>, tile_kernel<kPlanes, kSub, 8>};

template <int kBits, int kPlanes, int kSub>
void gemm_tiled(at::Tensor& out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
                const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, const float* bias) {
  const int64_t m_rows = qa.size(0), n_rows = qweight.size(0), nb = qweight.size(1) * 8 / kBits / kBlock;
  constexpr int64_t kPerBlock = kBlock / kSub;  // weight scales (and mins) a block: 1, or 2 for Q6_K
  const int64_t ns = nb * kPerBlock;            // a weight row's scales
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  const float* wm = mins.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t w_stride = qweight.size(1), o_stride = out.stride(0);
  // the activations, packed once per call for every tile (m_rows * k bytes and two floats a block)
  const int64_t m_tiles = (m_rows + kTileM - 1) / kTileM;
  const int64_t a_ints = nb * kTileM * 8 * kPlanes, a_floats = nb * kTileM;
  std::vector<int32_t> pa(m_tiles * a_ints);
  std::vector<float> pd(m_tiles * a_floats), ps(m_tiles * a_floats), ps16(kSub == 16 ? m_tiles * a_floats * 2 : 0);
  // on this thread: a copy of m_rows * k bytes is cheap next to the product, and every parallel
  // region costs a wake-up of the pool (and much more when the machine's cores are oversubscribed)
  const int8_t* qap = qa.data_ptr<int8_t>();
  const float* adp = da.data_ptr<float>();
  const float* asp = sa.data_ptr<float>();
  for (int64_t t = 0; t < m_tiles; ++t) {
    const int64_t m0 = t * kTileM;
    pack_activations(pa.data() + t * a_ints, pd.data() + t * a_floats, ps.data() + t * a_floats,
                     kSub == 16 ? ps16.data() + t * a_floats * 2 : nullptr, qap + m0 * qa.size(1), qa.size(1),
                     adp + m0 * nb, asp + m0 * nb, std::min<int64_t>(kTileM, m_rows - m0), nb, kPlanes);
  }
  const int64_t tiles = (n_rows + kTileN - 1) / kTileN;
  // a task of at least ~1M multiply-adds: small matrices at a few rows stay on one thread
  const int64_t per_tile = kTileN * nb * kBlock * std::min<int64_t>(m_rows, kChunkM);
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, per_tile));
  const int64_t chunk_tiles = kChunkM / kTileM;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> packed(nb * 8);
    std::vector<float> ws_t(ns * kTileN), wm_t(ns * kTileN);
    for (int64_t c0 = 0; c0 < m_tiles; c0 += chunk_tiles) {
      const int64_t c1 = std::min(m_tiles, c0 + chunk_tiles);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTileN, rows = std::min<int64_t>(kTileN, n_rows - n0);
        const int64_t next = t + 1 < end ? std::min<int64_t>(kTileN, n_rows - n0 - kTileN) : 0;
        if (next > 0) {
          prefetch_rows(reinterpret_cast<const uint8_t*>(ws + (n0 + kTileN) * ns), next * ns * 4);
          prefetch_rows(reinterpret_cast<const uint8_t*>(wm + (n0 + kTileN) * ns), next * ns * 4);
        }
        const uint8_t* pf = qw + (n0 + kTileN) * w_stride;
        const int64_t pf_lines = (next * w_stride + 63) / 64, n_mt = c1 - c0;
        pack_tile<kBits, kSub>(reinterpret_cast<uint8_t*>(packed.data()), ws_t.data(), wm_t.data(), qw + n0 * w_stride,
                               ws + n0 * ns, wm + n0 * ns, w_stride, rows, nb);
        const __mmask16 nmask = static_cast<__mmask16>((1u << rows) - 1);
        const float* bt = bias ? bias + n0 : nullptr;
        for (int64_t mt = c0; mt < c1; ++mt) {
          const int64_t mr = std::min<int64_t>(kTileM, m_rows - mt * kTileM);
          const float* sums = kSub == 16 ? ps16.data() + mt * a_floats * 2 : ps.data() + mt * a_floats;
          kTileKernels<kPlanes, kSub>[mr](packed.data(), ws_t.data(), wm_t.data(), pa.data() + mt * a_ints,
                           pd.data() + mt * a_floats, sums, nb, op + mt * kTileM * o_stride + n0, o_stride, nmask, bt,
                           pf + (mt - c0) * pf_lines / n_mt * 64,
                           (mt - c0 + 1) * pf_lines / n_mt - (mt - c0) * pf_lines / n_mt);
        }
      }
    }
  });
}
#else
constexpr bool kHaveTiled = false;
#endif

}  // namespace

void gguf_gemm_tiled(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
                     const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                     const c10::optional<at::Tensor>& bias, int64_t bits) {
  TORCH_CHECK(kHaveTiled, "gguf_gemm_tiled: this build has no AVX-512 VNNI (use gguf_gemm)");
  TORCH_CHECK(bits == 4 || bits == 8, "gguf_gemm_tiled: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(1) * 8 % (bits * kBlock) == 0,
              "gguf_gemm_tiled: qweight must be contiguous uint8 [n, k * bits / 8]");
  const int64_t n = qweight.size(0), nb = qweight.size(1) * 8 / bits / kBlock, m = qa.size(0);
  for (const at::Tensor* t : {&scales, &mins}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    (t->size(1) == nb || t->size(1) == 2 * nb) && t->size(1) == scales.size(1),
                "gguf_gemm_tiled: scales and mins must be contiguous float32 [n, k / 32], or [n, k / 16] (Q6_K)");
  }
  const bool per16 = scales.size(1) == 2 * nb;
  const int64_t padded = (nb + kGroupBlocks - 1) / kGroupBlocks * kGroupBytes;  // a plane's bytes a row
  const int64_t planes = qa.dim() == 2 && qa.size(1) == 2 * padded ? 2 : 1;     // q8 or 15-bit
  TORCH_CHECK(qa.scalar_type() == at::kChar && qa.is_contiguous() && qa.dim() == 2 && qa.size(1) == planes * padded,
              "gguf_gemm_tiled: qa must come from quantize_q8_blocks for this k");
  for (const at::Tensor* t : {&da, &sa}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == m * nb,
                "gguf_gemm_tiled: da and sa must be contiguous float32 [m, k / 32]");
  }
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == m && out.size(1) == n &&
                  out.stride(1) == 1,
              "gguf_gemm_tiled: out must be float32 [m, n] with contiguous rows");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "gguf_gemm_tiled: bias must be float32 [n]");
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (m == 0 || n == 0) return;
  if (per16) {
    if (bits == 4 && planes == 1) gemm_tiled<4, 1, 16>(out, qa, da, sa, qweight, scales, mins, bp);
    else if (bits == 4) gemm_tiled<4, 2, 16>(out, qa, da, sa, qweight, scales, mins, bp);
    else if (planes == 1) gemm_tiled<8, 1, 16>(out, qa, da, sa, qweight, scales, mins, bp);
    else gemm_tiled<8, 2, 16>(out, qa, da, sa, qweight, scales, mins, bp);
  } else {
    if (bits == 4 && planes == 1) gemm_tiled<4, 1, 32>(out, qa, da, sa, qweight, scales, mins, bp);
    else if (bits == 4) gemm_tiled<4, 2, 32>(out, qa, da, sa, qweight, scales, mins, bp);
    else if (planes == 1) gemm_tiled<8, 1, 32>(out, qa, da, sa, qweight, scales, mins, bp);
    else gemm_tiled<8, 2, 32>(out, qa, da, sa, qweight, scales, mins, bp);
  }
#endif
}

int64_t gguf_gemm_tiled_min_rows() { return kHaveTiled ? kTiledMinRows : 0; }

void gguf_gemm_auto(at::Tensor out, const at::Tensor& qa, const at::Tensor& da, const at::Tensor& sa,
                    const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                    const c10::optional<at::Tensor>& bias, int64_t bits) {
  const bool per16 = scales.dim() == 2 && scales.size(1) * kBlock * bits / 8 == 2 * qweight.size(1);
  const int64_t min_rows = qweight.numel() > kLargeWeightBytes ? kTiledMinRowsLarge
                           : per16                              ? kTiledMinRowsPer16
                                                                : kTiledMinRows;
  if (kHaveTiled && (bits == 4 || bits == 8) && qa.size(0) >= min_rows) gguf_gemm_tiled(out, qa, da, sa, qweight, scales, mins, bias, bits);
  else gguf_gemm(out, qa, da, sa, qweight, scales, mins, bias, bits, true);
}

}  // namespace pagedllm
