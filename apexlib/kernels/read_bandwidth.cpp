// DRAM read-bandwidth probe for the benchmark (STREAM-like "sum" over a large buffer).
//
// Uses the same OpenMP team configuration (thread count, pinning) as the attention kernel and the
// widest loads of the selected ISA, with eight independent accumulators, so that the number it
// yields is what a pure streaming read on these threads can reach.
#include <immintrin.h>
#include <omp.h>

#include "cpu_common.h"

namespace apex {
namespace {

constexpr int64_t kChunk = 1 << 20;  // bytes per work unit

double sum_scalar(const char* p, int64_t bytes) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t n = bytes / 8;
  for (int64_t i = 0; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += w[i + k];
  uint64_t t = 0;
  for (int k = 0; k < 8; ++k) t += s[k];
  return static_cast<double>(t & 0xffff);
}

APEX_TARGET_BEGIN(APEX_ISA_AVX2)
double sum_avx2(const char* p, int64_t bytes) {
  __m256i s[8];
  for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_si256();
  for (int64_t off = 0; off + 256 <= bytes; off += 256)
    for (int k = 0; k < 8; ++k)
      s[k] = _mm256_add_epi64(s[k], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off + 32 * k)));
  for (int k = 1; k < 8; ++k) s[0] = _mm256_add_epi64(s[0], s[k]);
  return static_cast<double>(_mm256_extract_epi64(s[0], 0) & 0xffff);
}
APEX_TARGET_END

APEX_TARGET_BEGIN(APEX_ISA_AVX512)
double sum_avx512(const char* p, int64_t bytes) {
  __m512i s[8];
  for (int k = 0; k < 8; ++k) s[k] = _mm512_setzero_si512();
  for (int64_t off = 0; off + 512 <= bytes; off += 512)
    for (int k = 0; k < 8; ++k)
      s[k] = _mm512_add_epi64(s[k], _mm512_loadu_si512(reinterpret_cast<const void*>(p + off + 64 * k)));
  for (int k = 1; k < 8; ++k) s[0] = _mm512_add_epi64(s[0], s[k]);
  return static_cast<double>(_mm512_reduce_add_epi64(s[0]) & 0xffff);
}
APEX_TARGET_END

}  // namespace

double read_bandwidth_pass(const void* p, int64_t bytes, Isa isa, int num_threads) {
  const char* base = static_cast<const char*>(p);
  const int64_t n_chunks = (bytes + kChunk - 1) / kChunk;
  double total = 0.0;
#pragma omp parallel num_threads(num_threads) reduction(+ : total)
  {
    pin_current_thread(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t off = c * kChunk;
      const int64_t len = bytes - off < kChunk ? bytes - off : kChunk;
      switch (isa) {
        case Isa::Avx512:
          total += sum_avx512(base + off, len);
          break;
        case Isa::Avx2:
          total += sum_avx2(base + off, len);
          break;
        default:
          total += sum_scalar(base + off, len);
          break;
      }
    }
  }
  return total;
}

}  // namespace apex
