// Paged decode attention on the CPU: one query token per sequence against its paged K/V cache.
//
// Layout: key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_dim] (one layer),
// block_tables int32 [num_seqs, max_blocks_per_seq], context_lens int32 [num_seqs].
//
// Parallelism (flash-decoding): the driver cuts every sequence into splits of whole blocks so that
// there are several work items per thread (a single long sequence is split across all threads),
// runs the items in one OpenMP team (dynamic schedule, longest first), each item streaming its
// blocks for all heads in memory order (see paged_decode_attention_body.h), then merges the
// partial results of each (sequence, head) with log-sum-exp rescaling. A sequence with
// context_len 0 gets a zero output.
//
// The body is compiled three times: scalar (portable), AVX2+FMA+F16C and AVX-512 (F/BW/VL/DQ),
// each inside a target pragma region; the caller picks one at run time (cpu_runtime.cpp).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "cpu_common.h"


namespace apex {

// Online-softmax steps (see paged_decode_attention_body.h). A step is a list of segments: runs of
// consecutive token rows inside one block, seg_tokens() rows each (the whole block unless its K
// exceeds kStepBytes; then the largest divisor of the block size that fits), up to kStepTokens
// tokens and kStepBytes of K per step (MHA blocks of 16 tokens are 128 KiB already and measured
// slower when grouped). Cutting big blocks keeps the pass-ahead prefetch inside L2: MHA with
// 64-token blocks (512 KiB of K) ran at 0.58-0.63 of the DRAM read against 0.69-0.72 at 16 tokens.
constexpr int64_t kStepTokens = 64;
constexpr int64_t kStepBytes = 128 * 1024;
constexpr int64_t kMaxStepSegs = kStepTokens;
static inline int64_t seg_tokens(int64_t bs, int64_t row_bytes) {
  if (bs * row_bytes <= kStepBytes) return bs;
  int64_t n = kStepBytes / row_bytes;
  if (n < 1) return 1;
  while (bs % n != 0) --n;
  return n;
}
// segments per step
static inline int64_t step_segs(int64_t bs, int64_t row_bytes) {
  const int64_t st = seg_tokens(bs, row_bytes);
  const int64_t by_tokens = kStepTokens / st, by_bytes = kStepBytes / (st * row_bytes);
  const int64_t n = by_tokens < by_bytes ? by_tokens : by_bytes;
  return n < 1 ? 1 : n;
}
static inline int64_t step_tokens(int64_t bs, int64_t row_bytes) {
  return step_segs(bs, row_bytes) * seg_tokens(bs, row_bytes);
}

// ------------------------------------------------------------------ scalar
namespace scalar_isa {
struct V {
  using reg = float;
  static constexpr int W = 1;
  static inline reg zero() { return 0.f; }
  static inline reg set1(float x) { return x; }
  static inline reg load(const float* p) { return *p; }
  static inline void store(float* p, reg v) { *p = v; }
  static inline reg load_f16(const uint16_t* p) { return f16_to_f32(*p); }
  static inline reg load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg max(reg a, reg b) { return a > b ? a : b; }
  static inline float reduce_add(reg v) { return v; }
  static inline float reduce_max(reg v) { return v; }
  static inline reg exp2(reg v) { return exp2f(v); }
  static inline reg reduce_w(const reg* v) { return v[0]; }
};
constexpr int MAXGT = 4;
constexpr int ACC = 8;
#include "paged_decode_attention_body.h"
}  // namespace scalar_isa

// ------------------------------------------------------------------ AVX2 + FMA + F16C
APEX_TARGET_BEGIN(APEX_ISA_AVX2)
namespace avx2_isa {
struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static inline reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline float reduce_add(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float reduce_max(reg v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^x for x <= 0: x = n + f (|f| <= 1/2), 2^f = e^(f ln2) by a degree-6 Taylor polynomial (~1e-7).
  static inline reg exp2(reg x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
    const reg n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg y = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(0.6931471805599453f));
    reg p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  // 8 vectors -> the vector of their 8 horizontal sums.
  static inline reg reduce_w(const reg* v) {
    const reg s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const reg s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const reg s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
  }
};
constexpr int MAXGT = 4;
constexpr int ACC = 8;
#include "paged_decode_attention_body.h"
}  // namespace avx2_isa
APEX_TARGET_END

// ------------------------------------------------------------------ AVX-512
APEX_TARGET_BEGIN(APEX_ISA_AVX512)
namespace avx512_isa {
struct V {
  using reg = __m512;
  static constexpr int W = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline reg load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline float reduce_add(reg v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float reduce_max(reg v) { return _mm512_reduce_max_ps(v); }
  static inline reg exp2(reg x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const reg n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg y = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
    reg p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
  }
  // 16 vectors -> the vector of their 16 horizontal sums (transpose-add tree, 31 shuffles + 15 adds).
  static inline reg reduce_w(const reg* v) {
    reg r[8], s[4];
    for (int k = 0; k < 8; ++k)
      r[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; ++k)
      s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * k], r[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(r[2 * k], r[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const reg u0 = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const reg u1 = _mm512_add_ps(_mm512_shuffle_ps(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2)));
    const reg f = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(idx, f);
  }
};
constexpr int MAXGT = 8;
constexpr int ACC = 16;
#include "paged_decode_attention_body.h"
}  // namespace avx512_isa
APEX_TARGET_END

// ------------------------------------------------------------------ driver
namespace {

// Software prefetch runs one pass ahead (V rows of a step during its K pass, the next step's K
// during its V pass; see the body), whatever the byte count below.
// Tuning knobs (environment, read once): APEX_CPU_PREFETCH_BYTES (0 disables software prefetch),
// APEX_CPU_PREFETCH_HINT (0 = T0, 1 = T1, 2 = T2, 3 = NTA), APEX_CPU_PREFETCH_STRIDE (bytes between
// prefetches, default 64 = every line; one per 256 B-4 KiB, meant to merely start the hardware
// streamer on each page, measured 10-30% slower here: the streamer does not run far enough ahead).
int64_t g_prefetch_bytes = [] {
  const char* e = std::getenv("APEX_CPU_PREFETCH_BYTES");
  return e ? std::atoll(e) : int64_t{32 * 1024};
}();
int g_prefetch_hint = [] {
  const char* e = std::getenv("APEX_CPU_PREFETCH_HINT");
  return e ? std::atoi(e) : 1;
}();
int64_t g_prefetch_stride = [] {
  const char* e = std::getenv("APEX_CPU_PREFETCH_STRIDE");
  const int64_t v = e ? std::atoll(e) : int64_t{64};
  return v < 64 ? int64_t{64} : v;
}();

constexpr int64_t kMinTokensPerSplit = 64;
constexpr int64_t kItemsPerThread = 4;

struct Workspace {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n + 16) buf.resize(n + 16);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
  }
};

}  // namespace

void validate_tables(const PagedAttentionArgs& a) {
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t ctx = a.context_lens[s];
    if (ctx < 0 || ctx > a.max_blocks_per_seq * a.block_size) {
      throw InputError("context_lens[" + std::to_string(s) + "] = " + std::to_string(ctx) +
                       " is outside [0, max_blocks_per_seq * block_size = " +
                       std::to_string(a.max_blocks_per_seq * a.block_size) + "]");
    }
    const int64_t nblk = (ctx + a.block_size - 1) / a.block_size;
    const int32_t* bt = a.block_tables + s * a.max_blocks_per_seq;
    for (int64_t b = 0; b < nblk; ++b) {
      if (bt[b] < 0 || bt[b] >= a.num_blocks) {
        throw InputError("block_tables[" + std::to_string(s) + ", " + std::to_string(b) + "] = " +
                         std::to_string(bt[b]) + " is not a block id in [0, num_blocks = " +
                         std::to_string(a.num_blocks) + ")");
      }
    }
  }
}

SplitPlan plan_splits(const PagedAttentionArgs& a, int num_threads) {
  const int64_t bs = a.block_size;
  const int64_t nthreads = std::max(1, num_threads);
  SplitPlan plan;
  int64_t total_blocks = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s) total_blocks += (a.context_lens[s] + bs - 1) / bs;
  int64_t chunk = total_blocks;
  if (nthreads > 1) {
    const int64_t target_items = nthreads * kItemsPerThread;
    chunk = std::max<int64_t>((total_blocks + target_items - 1) / target_items,
                              (kMinTokensPerSplit + bs - 1) / bs);
  }
  chunk = std::max<int64_t>(chunk, 1);
  plan.first.assign(a.num_seqs + 1, 0);
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    plan.first[s] = static_cast<int64_t>(plan.splits.size());
    const int64_t nblk = (a.context_lens[s] + bs - 1) / bs;
    if (nblk == 0) continue;
    const int64_t nsplit = (nblk + chunk - 1) / chunk;
    for (int64_t k = 0; k < nsplit; ++k) {
      // balanced split: blocks [k*nblk/nsplit, (k+1)*nblk/nsplit)
      plan.splits.push_back({s, k * nblk / nsplit, (k + 1) * nblk / nsplit});
    }
  }
  plan.first[a.num_seqs] = static_cast<int64_t>(plan.splits.size());
  const int64_t n = static_cast<int64_t>(plan.splits.size());
  plan.order.resize(n);
  for (int64_t i = 0; i < n; ++i) plan.order[i] = i;
  const std::vector<SplitPlan::Split>& sp = plan.splits;
  std::stable_sort(plan.order.begin(), plan.order.end(), [&sp](int64_t x, int64_t y) {
    return sp[x].b1 - sp[x].b0 > sp[y].b1 - sp[y].b0;
  });
  return plan;
}

void paged_decode_attention(const PagedAttentionArgs& a, Isa isa, int num_threads) {
  const int64_t Hq = a.num_heads, D = a.head_dim, bs = a.block_size;
  const int64_t esize = static_cast<int64_t>(dtype_size(a.kv_dtype));
  const int64_t pf = g_prefetch_bytes > 0 ? 1 : 0;  // on / off
  const int nthreads = std::max(1, num_threads);

  const SplitPlan plan = plan_splits(a, nthreads);
  const std::vector<SplitPlan::Split>& items = plan.splits;
  const std::vector<int64_t>& order = plan.order;
  const std::vector<int64_t>& first_item = plan.first;
  const int64_t n_items = static_cast<int64_t>(items.size());

  // ---- workspace (per calling thread, reused across calls)
  const int64_t acc_elems = Hq * D;                  // per item
  const int64_t ml_elems = (2 * Hq + 15) / 16 * 16;  // per item: m then l
  const int64_t row_bytes = a.num_kv_heads * D * esize;
  const int64_t sc_elems = (step_tokens(bs, row_bytes) * Hq + 2 * Hq + 15) / 16 * 16;  // scores + tmp
  const int64_t thr_elems = sc_elems + Hq * D;  // per thread: scores+tmp, query
  static thread_local Workspace ws;
  float* base = ws.get(static_cast<size_t>(n_items * (acc_elems + ml_elems) + nthreads * thr_elems));
  float* acc_all = base;
  float* ml_all = acc_all + n_items * acc_elems;
  float* thr_all = ml_all + n_items * ml_elems;
  const float qscale = a.scale * 1.4426950408889634f;  // softmax in base 2

  const int team = static_cast<int>(std::min<int64_t>(nthreads, std::max<int64_t>(n_items, 1)));
#pragma omp parallel num_threads(team)
  {
    const int tid = omp_get_thread_num();
    pin_current_thread(tid);
    float* sc = thr_all + tid * thr_elems;
    float* qs = sc + sc_elems;
#pragma omp for schedule(dynamic, 1)
    for (int64_t oi = 0; oi < n_items; ++oi) {
      const SplitPlan::Split& it = items[order[oi]];
      const int64_t idx = order[oi];
      const float* q = a.query + it.seq * Hq * D;
      for (int64_t i = 0; i < Hq * D; ++i) qs[i] = q[i] * qscale;
      float* acc = acc_all + idx * acc_elems;
      float* m = ml_all + idx * ml_elems;
      float* l = m + Hq;
      switch (isa) {
        case Isa::Avx512:
          avx512_isa::attend(a, it.seq, it.b0, it.b1, qs, acc, m, l, sc, pf, g_prefetch_hint, g_prefetch_stride);
          break;
        case Isa::Avx2:
          avx2_isa::attend(a, it.seq, it.b0, it.b1, qs, acc, m, l, sc, pf, g_prefetch_hint, g_prefetch_stride);
          break;
        default:
          scalar_isa::attend(a, it.seq, it.b0, it.b1, qs, acc, m, l, sc, pf, g_prefetch_hint, g_prefetch_stride);
          break;
      }
    }
    // ---- merge the splits of each (sequence, head) with log-sum-exp rescaling
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.num_seqs * Hq; ++r) {
      const int64_t s = r / Hq, i = r % Hq;
      float* o = a.out + r * D;
      const int64_t j0 = first_item[s], j1 = first_item[s + 1];
      if (j0 == j1) {  // context_len 0
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        continue;
      }
      float mmax = -INFINITY;
      for (int64_t j = j0; j < j1; ++j) mmax = std::max(mmax, ml_all[j * ml_elems + i]);
      float lsum = 0.f;
      for (int64_t j = j0; j < j1; ++j) lsum += ml_all[j * ml_elems + Hq + i] * exp2f(ml_all[j * ml_elems + i] - mmax);
      const float inv = 1.f / lsum;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t j = j0; j < j1; ++j) {
        const float w = exp2f(ml_all[j * ml_elems + i] - mmax) * inv;
        const float* accj = acc_all + j * acc_elems + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * accj[d];
      }
    }
  }
}

}  // namespace apex
