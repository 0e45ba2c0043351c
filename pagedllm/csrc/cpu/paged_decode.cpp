// Decode attention over the paged KV cache on CPU: one query token per sequence, read straight
// from the cache blocks through the block table.
//
// Why a kernel: in PyTorch the same step is a gather (index_select of every block into a padded
// copy) and then SDPA over the copy, so the cache is read, written and read again, padded to the
// longest sequence. Here each cached token's K and V are read once, from where they lie. Threads
// come from PyTorch's own pool (at::parallel_for), so nothing competes with the matmuls' OpenMP.
//
// Layout: query/out [num_seqs, num_heads, head_dim] (rows may be strided, head_dim contiguous);
// k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables int64
// [num_seqs, max_blocks]; seq_lens int64 [num_seqs] (keys to attend to, the new token included,
// which is already written to the cache). Query heads h*G .. h*G+G-1 share KV head h (GQA).
// Math in float32 whatever the storage types (float32 or bfloat16 each). The cache may be stored
// in a narrower type than the query (a bfloat16 KV cache under float32 weights, vLLM's
// kv_cache_dtype): the kernel is bound by reading the cache, so half the bytes is most of the
// time back. A local layer (sliding_window > 0) reads only its last sliding_window keys, from the
// block holding the first of them (earlier blocks may have been freed); soft_cap > 0 caps each
// score at soft_cap * tanh(score / soft_cap) before the softmax (Gemma 2). An fp8 cache (e4m3 or
// e5m2, kv_cache_dtype="fp8*") holds K / k_scale and V / v_scale: each byte is widened through a
// 256-entry table, k_scale is folded into the query's scale and v_scale into the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dtype_utils.h"
#include "ops.h"

namespace pagedllm {
namespace {

// Work items are a sequence's KV heads, all of them (each cached token's row then streams from
// memory once, contiguously) or, when there are too few sequences to keep every thread busy,
// one each. Sequences differ in length (and the runner sorts them by length), so the items are
// cut into one contiguous range per thread of about equal total length, not of equal count.
std::vector<int64_t> balanced_bounds(const int64_t* lens, int64_t items, int64_t items_per_seq, int64_t parts) {
  int64_t total = 0;
  for (int64_t i = 0; i < items; ++i) total += lens[i / items_per_seq];
  std::vector<int64_t> bounds(parts + 1, items);
  bounds[0] = 0;
  int64_t done = 0, part = 1;
  for (int64_t i = 0; i < items && part < parts; ++i) {
    done += lens[i / items_per_seq];
    while (part < parts && done * parts >= total * part) bounds[part++] = i + 1;
  }
  return bounds;
}

// Blocks sit anywhere in the cache, so the hardware prefetcher cannot see the next one coming:
// ask for it while the current one is being read.
inline void prefetch_rows(const char* first_row, int64_t rows, int64_t row_stride_bytes, int64_t row_bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(first_row + r * row_stride_bytes + off);
}

// The dot product of two float32 rows. For lengths that are a multiple of 16 (every usual
// head_dim) it runs on 16-wide vectors (GCC/clang vector extensions: AVX-512 here, pairs of
// AVX2 or NEON registers elsewhere) with two independent sums. GCC compiled the plain
// `omp simd reduction` loop with its accumulator on the stack (seen in `perf annotate`); this
// form keeps it in registers and is about 5% faster on W1's shapes.
typedef float vec16 __attribute__((vector_size(64), aligned(4)));

inline float dot(const float* a, const float* b, int64_t n) {
  if (n % 16 == 0) {
    vec16 s0 = {}, s1 = {};
    int64_t d = 0;
    for (; d + 32 <= n; d += 32) {
      s0 += *reinterpret_cast<const vec16*>(a + d) * *reinterpret_cast<const vec16*>(b + d);
      s1 += *reinterpret_cast<const vec16*>(a + d + 16) * *reinterpret_cast<const vec16*>(b + d + 16);
    }
    if (d < n) s0 += *reinterpret_cast<const vec16*>(a + d) * *reinterpret_cast<const vec16*>(b + d);
    s0 += s1;
    float sum = 0.f;
    for (int i = 0; i < 16; ++i) sum += s0[i];
    return sum;
  }
  float sum = 0.f;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

template <typename cache_t>
constexpr bool is_fp8 = std::is_same_v<cache_t, c10::Float8_e4m3fn> || std::is_same_v<cache_t, c10::Float8_e5m2>;

// Every value an fp8 byte can hold, as float32 (c10's own conversion, so the same as PyTorch's).
template <typename fp8_t>
const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(fp8_t(static_cast<uint8_t>(b), fp8_t::from_bits()));
    return t;
  }();
  return table;
}

// A cache row as float32: the row itself for a float32 cache, else widened into `buf`.
template <typename cache_t>
inline const float* widened(const cache_t* src, std::vector<float>& buf, int64_t n) {
  if constexpr (std::is_same_v<cache_t, float>) {
    return src;
  } else if constexpr (is_fp8<cache_t>) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(src);
    float* dst = buf.data();
    int64_t i = 0;
#if defined(__AVX512F__)
    // 16 at a time through float16, which vcvtph2ps widens exactly (subnormals included): e5m2 is the top
    // byte of a float16; e4m3's 4 exponent bits sit in float16's low ones (bias 7 against 15), so the
    // float16 read is the value times 2^-8. (e4m3's one NaN code reads as 480 here; the cache never
    // holds it, since writes saturate.)
    for (; i + 16 <= n; i += 16) {
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i)));
      if constexpr (std::is_same_v<cache_t, c10::Float8_e5m2>) {
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_slli_epi16(w, 8)));
      } else {
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                          _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7));
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f)));
      }
    }
#elif defined(__AVX2__) && defined(__F16C__)
    // the same through F16C's vcvtph2ps, 8 at a time
    for (; i + 8 <= n; i += 8) {
      const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + i)));
      if constexpr (std::is_same_v<cache_t, c10::Float8_e5m2>) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_slli_epi16(w, 8)));
      } else {
        const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8),
                                       _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f)));
      }
    }
#endif
    const float* table = fp8_table<cache_t>().data();
    for (; i < n; ++i) dst[i] = table[bytes[i]];
    return dst;
  } else {
    float* dst = buf.data();
    int64_t i = 0;
    // bfloat16 is the top half of a float32: widen 16 at a time by shifting the bits up.
    typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    for (; i + 16 <= n; i += 16) {
      const u32x16 bits = __builtin_convertvector(*reinterpret_cast<const u16x16*>(src + i), u32x16) << 16;
      std::memcpy(dst + i, &bits, sizeof(bits));
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    return dst;
  }
}

template <typename scalar_t, typename cache_t>
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t sliding_window,
            double soft_cap, double k_scale, double v_scale) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t q_seq_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t o_seq_stride = out.stride(0), o_head_stride = out.stride(1);
  const int64_t token_stride = num_kv_heads * head_dim, block_stride = block_size * token_stride;
  const scalar_t* q = query.data_ptr<scalar_t>();
  const cache_t* kc = k_cache.data_ptr<cache_t>();
  const cache_t* vc = v_cache.data_ptr<cache_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  // The scores are q . (k_scale * k_stored): fold k_scale into the query once.
  const float fscale = static_cast<float>(scale * k_scale), cap = static_cast<float>(soft_cap);
  const float out_scale = static_cast<float>(v_scale);
  const int64_t threads = at::get_num_threads();
  const int64_t kv_per_item = num_seqs >= 4 * threads ? num_kv_heads : 1;
  const int64_t items_per_seq = num_kv_heads / kv_per_item, items = num_seqs * items_per_seq;
  const int64_t heads_per_item = kv_per_item * group;  // query heads
  const int64_t parts = std::max<int64_t>(1, std::min(threads, items));
  const std::vector<int64_t> bounds = balanced_bounds(lens, items, items_per_seq, parts);
  const int64_t item_row_bytes = kv_per_item * head_dim * static_cast<int64_t>(sizeof(cache_t));
  const int64_t token_stride_bytes = token_stride * static_cast<int64_t>(sizeof(cache_t));

  at::parallel_for(0, parts, 1, [&](int64_t first_part, int64_t last_part) {
    std::vector<float> qf(heads_per_item * head_dim), acc(heads_per_item * head_dim), row(head_dim), scores;
    for (int64_t item = bounds[first_part]; item < bounds[last_part]; ++item) {
      const int64_t s = item / items_per_seq, kv0 = (item % items_per_seq) * kv_per_item, seq_len = lens[s];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, seq_len - sliding_window) : 0;
      const int64_t len = seq_len - first;  // keys this query sees: positions first .. seq_len - 1
      const int64_t h0 = kv0 * group;  // first query head of this item
      const int64_t* table = tables + s * max_blocks;
      const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
      scores.resize(heads_per_item * len);
      for (int64_t h = 0; h < heads_per_item; ++h) {
        const scalar_t* qh = q + s * q_seq_stride + (h0 + h) * q_head_stride;
        for (int64_t d = 0; d < head_dim; ++d) qf[h * head_dim + d] = static_cast<float>(qh[d]) * fscale;
      }
      // Calls fn(i, row) with this item's part of the row of each visible key (i counts from the
      // first), in order, walking the block table block by block, and prefetches the next block
      // while the current one is read.
      auto for_each_token = [&](const cache_t* cache, auto&& fn) {
        for (int64_t blk = first / block_size, t = blk * block_size; blk < num_blocks; ++blk) {
          if (blk + 1 < num_blocks)
            prefetch_rows(reinterpret_cast<const char*>(cache + table[blk + 1] * block_stride + kv0 * head_dim),
                          block_size, token_stride_bytes, item_row_bytes);
          const cache_t* r = cache + table[blk] * block_stride + kv0 * head_dim;
          for (const int64_t end = std::min(seq_len, t + block_size); t < end; ++t, r += token_stride)
            if (t >= first) fn(t - first, r);
        }
      };
      // Scores: each query head against every cached key of its KV head, KV head by KV head so
      // that a bfloat16 row is widened once, not once per query head.
      for_each_token(kc, [&](int64_t t, const cache_t* k) {
        for (int64_t g = 0; g < kv_per_item; ++g) {
          const float* kg = widened(k + g * head_dim, row, head_dim);
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            const float score = dot(qf.data() + h * head_dim, kg, head_dim);
            scores[h * len + t] = cap > 0.f ? cap * std::tanh(score / cap) : score;
          }
        }
      });
      // Softmax over each head's keys (all of them are visible to a decode).
      for (int64_t h = 0; h < heads_per_item; ++h) {
        float* sh = scores.data() + h * len;
        const float mx = *std::max_element(sh, sh + len);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = std::exp(sh[t] - mx);
          sum += sh[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      // Output: the probability-weighted sum of the values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_token(vc, [&](int64_t t, const cache_t* v) {
        for (int64_t g = 0; g < kv_per_item; ++g) {
          const float* vg = widened(v + g * head_dim, row, head_dim);
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            const float p = scores[h * len + t];
            float* ah = acc.data() + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * vg[d];
          }
        }
      });
      for (int64_t h = 0; h < heads_per_item; ++h) {
        scalar_t* oh = o + s * o_seq_stride + (h0 + h) * o_head_stride;
        for (int64_t d = 0; d < head_dim; ++d) oh[d] = static_cast<scalar_t>(acc[h * head_dim + d] * out_scale);
      }
    }
  });
}

}  // namespace

void check_block_tables(const at::Tensor& k_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        int64_t seqs, int64_t sliding_window, const char* op) {
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == seqs && seq_lens.dim() == 1 && seq_lens.size(0) == seqs,
              op, ": block_tables [seqs, max_blocks] and seq_lens [seqs] must be contiguous int64");
  // A length or block id out of range would read outside the cache: refuse it here.
  const int64_t num_blocks = k_cache.size(0), max_blocks = block_tables.size(1), block_size = k_cache.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(lens[s] > 0 && lens[s] <= max_blocks * block_size, op, ": seq_lens[", s, "] = ", lens[s],
                " outside [1, ", max_blocks * block_size, "]");
    const int64_t first_key = sliding_window > 0 ? std::max<int64_t>(0, lens[s] - sliding_window) : 0;
    for (int64_t b = first_key / block_size; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks,
                  op, ": block id ", tables[s * max_blocks + b], " outside the cache's ", num_blocks, " blocks");
  }
}

void paged_decode(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                  double soft_cap, double k_scale, double v_scale) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "paged_decode: query and out must be [seqs, heads, dim]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "paged_decode: head_dim must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == query.size(2),
              "paged_decode: caches must be contiguous [blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "paged_decode: heads must be a multiple of kv heads");
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "paged_decode: query and out must share a dtype");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "paged_decode: k_cache and v_cache must share a dtype");
  check_block_tables(k_cache, block_tables, seq_lens, query.size(0), sliding_window, "paged_decode");
  check_float_or_bf16(query.scalar_type(), "paged_decode");
  const at::ScalarType cache_type = k_cache.scalar_type();
  const bool fp8 = cache_type == at::kFloat8_e4m3fn || cache_type == at::kFloat8_e5m2;
  if (!fp8) check_float_or_bf16(cache_type, "paged_decode (cache)");
  const bool q32 = query.scalar_type() == at::kFloat, c32 = cache_type == at::kFloat;
  auto run = [&](auto kernel) {
    kernel(out, query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, soft_cap, k_scale, v_scale);
  };
  if (cache_type == at::kFloat8_e4m3fn) {
    if (q32) run(decode<float, c10::Float8_e4m3fn>);
    else run(decode<c10::BFloat16, c10::Float8_e4m3fn>);
  } else if (cache_type == at::kFloat8_e5m2) {
    if (q32) run(decode<float, c10::Float8_e5m2>);
    else run(decode<c10::BFloat16, c10::Float8_e5m2>);
  } else if (q32 && c32) run(decode<float, float>);
  else if (q32) run(decode<float, c10::BFloat16>);
  else if (c32) run(decode<c10::BFloat16, float>);
  else run(decode<c10::BFloat16, c10::BFloat16>);
}

}  // namespace pagedllm
