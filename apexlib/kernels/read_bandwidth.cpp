// DRAM read-bandwidth probe for the benchmark (STREAM-like "sum" over a large buffer).
//
// Uses the same OpenMP team configuration (thread count, pinning) as the attention kernel. Two
// loops per ISA, because neither is the fastest everywhere:
//   variant 0: the widest loads of the ISA summed into eight independent accumulators;
//   variant 1: the same bytes read as fp16 halves widened to fp32 (vcvtph2ps) and added: the
//              conversion paces the loads. On 2 Sapphire Rapids cores (2 MiB pages, 2 GiB) variant 0
//              read 31.5 GB/s and variant 1 36.9 GB/s (one core: 16.2 / 18.6): demand loads issued
//              as fast as the ports allow keep the line-fill buffers full of demand misses and the
//              L2 streamer runs less far ahead. 256-bit integer loads + adds: 27.3.
// The benchmark takes the faster variant as the machine's read bandwidth (a stricter reference).
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

double widen_scalar(const char* p, int64_t bytes) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t n = bytes / 2;
  for (int64_t i = 0; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += f16_to_f32(h[i + k]);
  double t = 0;
  for (int k = 0; k < 8; ++k) t += s[k];
  return t;
}

APEX_TARGET_BEGIN(APEX_ISA_AVX2)
double widen_avx2(const char* p, int64_t bytes) {
  __m256 s[8];
  for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
  for (int64_t off = 0; off + 128 <= bytes; off += 128)
    for (int k = 0; k < 8; ++k)
      s[k] = _mm256_add_ps(s[k], _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + off + 16 * k))));
  for (int k = 1; k < 8; ++k) s[0] = _mm256_add_ps(s[0], s[k]);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s[0]), _mm256_extractf128_ps(s[0], 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return static_cast<double>(_mm_cvtss_f32(h));
}

double sum_avx2(const char* p, int64_t bytes) {
  __m256i s[8];
  for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_si256();
  for (int64_t off = 0; off + 256 <= bytes; off += 256)
    for (int k = 0; k < 8; ++k)
      s[k] = _mm256_add_epi64(s[k], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off + 32 * k)));
  for (int k = 1; k < 8; ++k) s[0] = _mm256_add_epi64(s[0], s[k]);
  const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s[0]), _mm256_extracti128_si256(s[0], 1));
  return static_cast<double>((_mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1)) & 0xffff);
}
APEX_TARGET_END

APEX_TARGET_BEGIN(APEX_ISA_AVX512)
double widen_avx512(const char* p, int64_t bytes) {
  __m512 s[8];
  for (int k = 0; k < 8; ++k) s[k] = _mm512_setzero_ps();
  for (int64_t off = 0; off + 256 <= bytes; off += 256)
    for (int k = 0; k < 8; ++k)
      s[k] = _mm512_add_ps(s[k], _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off + 32 * k))));
  for (int k = 1; k < 8; ++k) s[0] = _mm512_add_ps(s[0], s[k]);
  return static_cast<double>(_mm512_reduce_add_ps(s[0]));
}

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

double read_bandwidth_pass(const void* p, int64_t bytes, Isa isa, int num_threads, int variant) {
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
          total += variant ? widen_avx512(base + off, len) : sum_avx512(base + off, len);
          break;
        case Isa::Avx2:
          total += variant ? widen_avx2(base + off, len) : sum_avx2(base + off, len);
          break;
        default:
          total += variant ? widen_scalar(base + off, len) : sum_scalar(base + off, len);
          break;
      }
    }
  }
  return total;
}

}  // namespace apex
