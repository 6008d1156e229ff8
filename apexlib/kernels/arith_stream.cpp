// Minimum-arithmetic stream probe for the CPU attention benchmark (not attention).
//
// Decode attention has to read every K and V element of the context once, widen it to fp32 and do
// G = num_heads / num_kv_heads fp32 FMAs with it (one per query head of its group). This probe does
// exactly that and nothing else (no softmax, no per-token reductions) on the same paged cache,
// tables and threads as the kernel, so the benchmark can tell how far the kernel is from what this
// machine can do with the arithmetic attention cannot avoid, separately from how far that is from a
// plain sequential DRAM read (read_bandwidth.cpp).
//
// Work: the whole-block splits of paged_decode_attention (plan_splits: about four items per thread,
// at least 64 tokens per split, longest first), dynamic schedule, pinned threads. An
// item reads block by block in table order, the K block then the V block, each block's valid rows
// (context_lens: a partial last block stops at the last token) in memory order. Every element x is
// converted to fp32 (fp16: vcvtph2ps, bf16: 16-bit shift, fp32 as is) and FMA'd with G query-like
// registers: acc[g] += x * q_g, where q_g depends on the element's position e in its token row only
// through j = e mod 8: q_g[j] = (8 g + j + 1) / 64 (exact in fp32). The returned checksum is
// therefore sum over all valid K and V elements x of x * sum_g q_g[j(x)], accumulated in fp32 per
// item (several chains), summed in double over items in a fixed order (deterministic for a given
// thread count).
//
// Software prefetch: one prefetcht1 per 64-byte line consumed, a fixed distance ahead in the item's
// logical stream K(b0), V(b0), K(b0+1), ... (default 16 KiB; APEX_ARITH_STREAM_PREFETCH_BYTES, read
// once, 0 disables). The first `distance` bytes of an item are not prefetched (no burst at start).
//
// Paths: AVX-512 (F/BW/VL/DQ), AVX2+FMA+F16C (target pragma regions) and scalar, chosen by `isa`.
// G = 1, 2, 4, 8 are compile-time parameters (queries and accumulators in registers: the groups of
// the models the project measures); other groups run a generic loop (up to kMaxGenericGroup), which
// is not unrolled over the heads. Every specialisation is compiled for three ISAs and was most of the
// extension's cold build time (G = 1..8 fully unrolled, the scalar path 4 lines per step: a 1.4 MB
// object, ~120 s of the ~135 s cold build on 2 cores).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>

#include "cpu_common.h"

#if defined(__x86_64__) || defined(__i386__)
// volatile asm: GCC may delete a loop whose only effect is __builtin_prefetch
#define ARITH_PREFETCH_T1(p) __asm__ volatile("prefetcht1 %0" : : "m"(*(const char*)(p)))
#else
#define ARITH_PREFETCH_T1(p) __builtin_prefetch((p), 0, 2)
#endif

namespace apex {
namespace {

constexpr int kMaxGenericGroup = 256;

// Query-like value of head g (of the group) for an element at row position e, j = e mod 8.
static inline float query_value(int g, int j) { return static_cast<float>(8 * g + j + 1) * (1.0f / 64.0f); }

// One work item: blocks [b0, b1) of one sequence.
struct StreamItem {
  const char* kbase;
  const char* vbase;
  const int32_t* bt;  // this sequence's block table
  int64_t block_bytes, row_bytes, bs, ctx, b0, b1;

  inline const char* segment(int64_t j, int kv) const { return (kv ? vbase : kbase) + bt[j] * block_bytes; }
  inline int64_t segment_bytes(int64_t j) const {
    const int64_t n = ctx - j * bs;
    return (n < bs ? n : bs) * row_bytes;
  }
};

// ------------------------------------------------------------------ scalar
namespace scalar_isa {
struct V {
  using reg = float;
  static constexpr int W = 1, NR = 16, QN = 8, LU = 1;
  static inline reg zero() { return 0.f; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline void load_f32(const char* p, reg* x) {
    for (int i = 0; i < 16; ++i) std::memcpy(&x[i], p + 4 * i, 4);
  }
  static inline void load_f16(const char* p, reg* x) {
    for (int i = 0; i < 16; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      x[i] = f16_to_f32(h);
    }
  }
  static inline void load_bf16(const char* p, reg* x) {
    for (int i = 0; i < 16; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      x[i] = bf16_to_f32(h);
    }
  }
  static inline reg query(int g, int qi) { return query_value(g, qi); }
  static inline void store(float* p, reg v) { *p = v; }
};
constexpr int kChains = 8;
#include "arith_stream_body.h"
}  // namespace scalar_isa

// ------------------------------------------------------------------ AVX2 + FMA + F16C
APEX_TARGET_BEGIN(APEX_ISA_AVX2)
namespace avx2_isa {
struct V {
  using reg = __m256;
  static constexpr int W = 8, NR = 2, QN = 1, LU = 4;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void load_f32(const char* p, reg* x) {
    x[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    x[1] = _mm256_loadu_ps(reinterpret_cast<const float*>(p + 32));
  }
  static inline void load_f16(const char* p, reg* x) {
    x[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    x[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  }
  static inline void load_bf16(const char* p, reg* x) {
    for (int i = 0; i < 2; ++i) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
      x[i] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
  }
  // lanes 0..7 are elements j = 0..7 (mod 8) of the group
  static inline reg query(int g, int) {
    return _mm256_setr_ps(query_value(g, 0), query_value(g, 1), query_value(g, 2), query_value(g, 3),
                          query_value(g, 4), query_value(g, 5), query_value(g, 6), query_value(g, 7));
  }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
};
constexpr int kChains = 8;
#include "arith_stream_body.h"
}  // namespace avx2_isa
APEX_TARGET_END

// ------------------------------------------------------------------ AVX-512
APEX_TARGET_BEGIN(APEX_ISA_AVX512)
namespace avx512_isa {
struct V {
  using reg = __m512;
  static constexpr int W = 16, NR = 1, QN = 1, LU = 4;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void load_f32(const char* p, reg* x) { x[0] = _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
  static inline void load_f16(const char* p, reg* x) {
    x[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void load_bf16(const char* p, reg* x) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    x[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // lane l is element l of the 16-element group: j = l mod 8
  static inline reg query(int g, int) {
    const __m256 h = _mm256_setr_ps(query_value(g, 0), query_value(g, 1), query_value(g, 2), query_value(g, 3),
                                    query_value(g, 4), query_value(g, 5), query_value(g, 6), query_value(g, 7));
    return _mm512_insertf32x8(_mm512_castps256_ps512(h), h, 1);
  }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
};
constexpr int kChains = 8;
#include "arith_stream_body.h"
}  // namespace avx512_isa
APEX_TARGET_END

// ------------------------------------------------------------------ driver
int64_t g_stream_prefetch_bytes = [] {
  const char* e = std::getenv("APEX_ARITH_STREAM_PREFETCH_BYTES");
  return e ? std::atoll(e) : int64_t{16 * 1024};
}();

}  // namespace

double arith_stream_pass(const PagedAttentionArgs& a, Isa isa, int num_threads) {
  if (a.num_kv_heads < 1 || a.num_heads % a.num_kv_heads != 0)
    throw InputError("num_heads must be a positive multiple of num_kv_heads");
  const int64_t group = a.num_heads / a.num_kv_heads;
  if (group < 1 || group > kMaxGenericGroup)
    throw InputError("num_heads / num_kv_heads = " + std::to_string(group) + " is outside [1, " +
                     std::to_string(kMaxGenericGroup) + "]");
  if ((a.num_kv_heads * a.head_dim) % 16 != 0) throw InputError("num_kv_heads * head_dim must be a multiple of 16");
  const int64_t bs = a.block_size;
  const int64_t esize = static_cast<int64_t>(dtype_size(a.kv_dtype));
  const int64_t row_bytes = a.num_kv_heads * a.head_dim * esize;
  const int nthreads = std::max(1, num_threads);

  const SplitPlan plan = plan_splits(a, nthreads);
  std::vector<StreamItem> items;
  items.reserve(plan.splits.size());
  for (const SplitPlan::Split& sp : plan.splits) {
    StreamItem it;
    it.kbase = static_cast<const char*>(a.key_cache);
    it.vbase = static_cast<const char*>(a.value_cache);
    it.bt = a.block_tables + sp.seq * a.max_blocks_per_seq;
    it.block_bytes = bs * row_bytes;
    it.row_bytes = row_bytes;
    it.bs = bs;
    it.ctx = a.context_lens[sp.seq];
    it.b0 = sp.b0;
    it.b1 = sp.b1;
    items.push_back(it);
  }
  const std::vector<int64_t>& order = plan.order;
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<double> sums(n_items, 0.0);
  const int gr = static_cast<int>(group);
  const int64_t dist = g_stream_prefetch_bytes;
  const DType dt = a.kv_dtype;

  const int team = static_cast<int>(std::min<int64_t>(nthreads, std::max<int64_t>(n_items, 1)));
#pragma omp parallel num_threads(team)
  {
    pin_current_thread(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t oi = 0; oi < n_items; ++oi) {
      const int64_t idx = order[oi];
      switch (isa) {
        case Isa::Avx512:
          sums[idx] = avx512_isa::run_item(items[idx], dt, gr, dist);
          break;
        case Isa::Avx2:
          sums[idx] = avx2_isa::run_item(items[idx], dt, gr, dist);
          break;
        default:
          sums[idx] = scalar_isa::run_item(items[idx], dt, gr, dist);
          break;
      }
    }
  }
  double total = 0.0;
  for (int64_t i = 0; i < n_items; ++i) total += sums[i];
  return total;
}

}  // namespace apex
