// vpdpbusd throughput on this core against the number of independent accumulator chains: one chain
// shows the instruction's latency, enough chains its throughput (the ceiling every int8 GEMM here
// works under). Built and run by benchmarks/vnni_peak.py. Each chain starts from its own value so
// the compiler cannot merge them.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

template <int C>
__attribute__((noinline)) __m512i chains(long n, __m512i w, __m512i a) {
  __m512i acc[C];
  for (int i = 0; i < C; ++i) acc[i] = _mm512_set1_epi32(i);
  for (long it = 0; it < n; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < C; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], w, a);
  }
  __m512i t = acc[0];
  for (int i = 1; i < C; ++i) t = _mm512_add_epi32(t, acc[i]);
  return t;
}

template <int C>
void report() {
  const long n = 240000000 / C;
  const auto t0 = std::chrono::steady_clock::now();
  const __m512i r = chains<C>(n, _mm512_set1_epi8(1), _mm512_set1_epi8(2));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d %.4f %d\n", C, n * C / s / 1e9, _mm512_reduce_add_epi32(r));
}

int main() {
  report<1>();
  report<2>();
  report<4>();
  report<8>();
  report<12>();
  return 0;
}
