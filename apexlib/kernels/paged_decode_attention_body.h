// Body of the paged decode-attention kernel, generic over a vector type `V`.
//
// paged_decode_attention.cpp includes this file once per ISA, inside an ISA-named namespace and a
// `#pragma GCC target` region, after defining `struct V` (lane count W, load/convert, fma, exp2,
// horizontal reductions, `reduce_w`: W vectors -> one vector of their W sums) and the register
// budgets MAXGT (query heads of a GQA group tiled together) and ACC (accumulator registers).
// No include guard on purpose. Nothing here may use std:: templates (see cpu_common.h).
//
// One call of `attend` processes blocks [b0, b1) of one sequence for every head and leaves the
// unnormalised partial result (acc, running max m, running sum l; base-2 exponent domain) for the
// driver to merge (flash-decoding). It works in steps of step_segs() segments (runs of token rows
// inside one block: whole blocks, or slices of blocks with more than 128 KiB of K), up to 64 tokens
// and 128 KiB of K per step (one 16-token block for MHA). Per step:
//   1. K pass, block by block in memory order (token t, kv head h): the K row (t, h) is loaded and
//      converted to fp32 once and FMA'd against the G query heads of h's group (query in L1, tiles
//      of up to MAXGT heads). The W-lane partial dot products are collected W at a time and reduced
//      together (a transpose-add tree: ~3 instructions per dot product instead of ~8 for a lone
//      reduction) into the step's score matrix sc[t][query head].
//   2. one online-softmax step, vectorised across heads: step max per head, one rescale of acc
//      where the max grew, vectorised exp2 of the scores in place (now probabilities).
//   3. V pass, per kv head h and column tile: the output columns of all query heads of the group
//      stay in registers while the step's tokens stream by (each V element is loaded and converted
//      once), then are added to acc once per step.
// Steps of several small blocks: the softmax, the acc rescale and the read-modify-write of acc
// after each V column tile cost the same per step whatever its size, so small blocks are grouped into
// one step, up to a byte cap (larger steps measured no better for GQA and slower for MHA).
// Software prefetch (pf > 0) runs one pass ahead: V of block i during its K pass, K of the next
// step's table entries (scattered in memory) during the V pass, so DRAM requests stay in flight.
// The prefetches are spread evenly over the compute of the pass (one head's slice of V per K head
// step; the next K blocks in equal slices per V token step, PfSegments) rather than issued in bursts:
// a burst of 64-128 prefetches fills the core's line-fill buffers and stalls the loads of the
// compute it was meant to overlap with.
// What was measured and tried on this body, and what bounds it on each CPU: docs/kernels/cpu-attention.md.

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// Prefetch instructions as volatile asm: GCC deletes loops whose only effect is __builtin_prefetch
// (C++ forward-progress rule, -ffinite-loops), which silently removed every software prefetch.
#if defined(__x86_64__) || defined(__i386__)
#define APEX_PREFETCH(insn, p) __asm__ volatile(insn " %0" : : "m"(*(const char*)(p)))
#else
#define APEX_PREFETCH(insn, p) __builtin_prefetch(p)
#endif

static inline void prefetch_range(const char* p, int64_t bytes, int hint, int64_t stride) {
  // hint: 0 = T0 (L1), 1 = T1 (L2), 2 = T2, 3 = NTA
  switch (hint) {
    case 0:
      for (int64_t off = 0; off < bytes; off += stride) APEX_PREFETCH("prefetcht0", p + off);
      break;
    case 1:
      for (int64_t off = 0; off < bytes; off += stride) APEX_PREFETCH("prefetcht1", p + off);
      break;
    case 2:
      for (int64_t off = 0; off < bytes; off += stride) APEX_PREFETCH("prefetcht2", p + off);
      break;
    default:
      for (int64_t off = 0; off < bytes; off += stride) APEX_PREFETCH("prefetchnta", p + off);
      break;
  }
}

// Spreads the software prefetch of a range evenly over the steps of a pass (a burst of prefetches
// fills the line-fill buffers and stalls the loads of the compute that should overlap with it).
struct PfCursor {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t step = 0;  // bytes per tick
  int hint = 1;
  int64_t stride = 64;
  inline void tick() {
    if (p >= end) return;
    const int64_t n = min_i64(step, end - p);
    prefetch_range(p, n, hint, stride);
    p += n;
  }
  inline void finish() {
    if (p < end) prefetch_range(p, end - p, hint, stride);
    p = end;
  }
};

// PfCursor over several scattered segments (the next step's K runs), in table order.
struct PfSegments {
  PfCursor c;
  const char* const* ptrs = nullptr;
  int64_t n = 0, i = 0, seg_bytes = 0;
  inline void next() {
    if (c.p >= c.end && i < n) {
      c.p = ptrs[i];
      c.end = c.p + seg_bytes;
      ++i;
    }
  }
  inline void tick() {
    next();
    c.tick();
  }
  inline void finish() {
    for (;;) {
      next();
      if (c.p >= c.end) return;
      c.finish();
    }
  }
};

template <int DT>
static inline V::reg ldkv(const void* row, int64_t i) {
  if constexpr (DT == 0) {
    return V::load(static_cast<const float*>(row) + i);
  } else if constexpr (DT == 1) {
    return V::load_f16(static_cast<const uint16_t*>(row) + i);
  } else {
    return V::load_bf16(static_cast<const uint16_t*>(row) + i);
  }
}

// Collects W-lane partial dot products and reduces them W at a time into consecutive scores.
struct Pending {
  V::reg v[V::W + MAXGT];
  int n = 0;
  float* dst;  // score of pending vector 0

  inline void flush_full() {
    while (n >= V::W) {
      V::store(dst, V::reduce_w(v));
      for (int i = V::W; i < n; ++i) v[i - V::W] = v[i];
      n -= V::W;
      dst += V::W;
    }
  }
  inline void finish() {
    for (int i = 0; i < n; ++i) dst[i] = V::reduce_add(v[i]);
    dst += n;
    n = 0;
  }
};

// GT dot products q[g] . k (q already scaled), appended to `pend`.
template <int DT, int GT>
static inline void qk_tile(const void* krow, const float* q, int64_t D, Pending& pend) {
  V::reg acc0[GT], acc1[GT];
  for (int g = 0; g < GT; ++g) {
    acc0[g] = V::zero();
    acc1[g] = V::zero();
  }
  int64_t d = 0;
  for (; d + 2 * V::W <= D; d += 2 * V::W) {
    const V::reg k0 = ldkv<DT>(krow, d);
    const V::reg k1 = ldkv<DT>(krow, d + V::W);
    for (int g = 0; g < GT; ++g) {
      acc0[g] = V::fma(k0, V::load(q + g * D + d), acc0[g]);
      acc1[g] = V::fma(k1, V::load(q + g * D + d + V::W), acc1[g]);
    }
  }
  for (; d < D; d += V::W) {
    const V::reg k0 = ldkv<DT>(krow, d);
    for (int g = 0; g < GT; ++g) acc0[g] = V::fma(k0, V::load(q + g * D + d), acc0[g]);
  }
  for (int g = 0; g < GT; ++g) pend.v[pend.n + g] = V::add(acc0[g], acc1[g]);
  pend.n += GT;
  pend.flush_full();
}

// The V rows of one step: tokens [0, nt) spread over blocks vb[0..] of bs rows each (vb already
// offset to the kv head's columns).
struct Rows {
  const char* const* vb;
  int64_t bs, nt, row_bytes;
};

// acc[g][d0 + ...] += sum_t p[t][g] * V[t][d0 + ...] for a GT x (DV*W) tile kept in registers.
template <int DT, int GT, int DV, typename PC>
static inline void pv_tile(const Rows& rw, int64_t hoff, const float* p, int64_t pstride, float* acc, int64_t D,
                           PC& pc) {
  for (int64_t d0 = 0; d0 < D; d0 += DV * V::W) {
    V::reg a[GT][DV];
    for (int g = 0; g < GT; ++g)
      for (int j = 0; j < DV; ++j) a[g][j] = V::zero();
    for (int64_t t0 = 0, jb = 0; t0 < rw.nt; t0 += rw.bs, ++jb) {
      const char* vcol = rw.vb[jb] + hoff;
      const int64_t n = min_i64(rw.bs, rw.nt - t0);
      const float* pb = p + t0 * pstride;
      for (int64_t t = 0; t < n; ++t) {
        pc.tick();
        const void* vr = vcol + t * rw.row_bytes;
        V::reg pv[GT];
        for (int g = 0; g < GT; ++g) pv[g] = V::set1(pb[t * pstride + g]);
        for (int j = 0; j < DV; ++j) {
          const V::reg v = ldkv<DT>(vr, d0 + j * V::W);
          for (int g = 0; g < GT; ++g) a[g][j] = V::fma(pv[g], v, a[g][j]);
        }
      }
    }
    for (int g = 0; g < GT; ++g)
      for (int j = 0; j < DV; ++j) {
        float* o = acc + g * D + d0 + j * V::W;
        V::store(o, V::add(V::load(o), a[g][j]));
      }
  }
}

// Largest power-of-two tile (<= MAXGT) not larger than n.
static inline int tile_of(int64_t n) {
  int gt = 1;
  while (gt * 2 <= MAXGT && gt * 2 <= n) gt *= 2;
  return gt;
}

template <int DT>
static inline void qk_group(const void* krow, const float* q, int64_t G, int64_t D, Pending& pend) {
  for (int64_t g = 0; g < G;) {
    const int gt = tile_of(G - g);
    const float* qg = q + g * D;
    switch (gt) {
      case 1: qk_tile<DT, 1>(krow, qg, D, pend); break;
      case 2: qk_tile<DT, 2>(krow, qg, D, pend); break;
      case 4: if constexpr (MAXGT >= 4) qk_tile<DT, 4>(krow, qg, D, pend); break;
      default: if constexpr (MAXGT >= 8) qk_tile<DT, 8>(krow, qg, D, pend); break;
    }
    g += gt;
  }
}

static inline int pv_dv(int gt, int64_t D) {
  const int64_t nvec = D / V::W;
  int dv = 1;
  while (dv * 2 * gt <= ACC && nvec % (dv * 2) == 0) dv *= 2;
  return dv;
}

// Token steps (calls of PfCursor::tick) of the V pass of one kv head: column tiles x tokens / nt.
static inline int64_t pv_steps_per_token(int64_t G, int64_t D) {
  int64_t n = 0;
  for (int64_t g = 0; g < G;) {
    const int gt = tile_of(G - g);
    n += D / (pv_dv(gt, D) * V::W);
    g += gt;
  }
  return n;
}

template <int DT, int GT, typename PC>
static inline void pv_dispatch_dv(const Rows& rw, int64_t hoff, const float* p, int64_t pstride, float* acc, int64_t D,
                                  PC& pc) {
  switch (pv_dv(GT, D)) {
    case 1: pv_tile<DT, GT, 1>(rw, hoff, p, pstride, acc, D, pc); break;
    case 2: if constexpr (2 * GT <= ACC) pv_tile<DT, GT, 2>(rw, hoff, p, pstride, acc, D, pc); break;
    case 4: if constexpr (4 * GT <= ACC) pv_tile<DT, GT, 4>(rw, hoff, p, pstride, acc, D, pc); break;
    case 8: if constexpr (8 * GT <= ACC) pv_tile<DT, GT, 8>(rw, hoff, p, pstride, acc, D, pc); break;
    default: if constexpr (16 * GT <= ACC) pv_tile<DT, GT, 16>(rw, hoff, p, pstride, acc, D, pc); break;
  }
}

template <int DT, typename PC>
static inline void pv_group(const Rows& rw, int64_t hoff, const float* p, int64_t pstride, float* acc, int64_t G,
                            int64_t D, PC& pc) {
  for (int64_t g = 0; g < G;) {
    const int gt = tile_of(G - g);
    switch (gt) {
      case 1: pv_dispatch_dv<DT, 1>(rw, hoff, p + g, pstride, acc + g * D, D, pc); break;
      case 2: pv_dispatch_dv<DT, 2>(rw, hoff, p + g, pstride, acc + g * D, D, pc); break;
      case 4: if constexpr (MAXGT >= 4) pv_dispatch_dv<DT, 4>(rw, hoff, p + g, pstride, acc + g * D, D, pc); break;
      default: if constexpr (MAXGT >= 8) pv_dispatch_dv<DT, 8>(rw, hoff, p + g, pstride, acc + g * D, D, pc); break;
    }
    g += gt;
  }
}

// Online-softmax step for one block: sc[t][i] (t < nt, i < Hq) becomes probabilities; m, l, acc updated.
// tmp: 2 * Hq floats of scratch.
static inline void softmax_block(float* sc, int64_t nt, int64_t Hq, float* m, float* l, float* acc, int64_t D,
                                 float* tmp) {
  float* mx = tmp;
  float* sum = tmp + Hq;
  int64_t i = 0;
  for (; i + V::W <= Hq; i += V::W) {
    V::reg v = V::load(sc + i);
    for (int64_t t = 1; t < nt; ++t) v = V::max(v, V::load(sc + t * Hq + i));
    V::store(mx + i, v);
  }
  for (; i < Hq; ++i) {
    float v = sc[i];
    for (int64_t t = 1; t < nt; ++t) v = sc[t * Hq + i] > v ? sc[t * Hq + i] : v;
    mx[i] = v;
  }
  for (i = 0; i < Hq; ++i) {
    sum[i] = 0.f;
    if (mx[i] > m[i]) {
      if (m[i] != -INFINITY) {
        const float alpha = exp2f(m[i] - mx[i]);
        l[i] *= alpha;
        const V::reg va = V::set1(alpha);
        float* a = acc + i * D;
        for (int64_t d = 0; d < D; d += V::W) V::store(a + d, V::mul(V::load(a + d), va));
      }
      m[i] = mx[i];
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    float* s = sc + t * Hq;
    i = 0;
    for (; i + V::W <= Hq; i += V::W) {
      const V::reg p = V::exp2(V::sub(V::load(s + i), V::load(m + i)));
      V::store(s + i, p);
      V::store(sum + i, V::add(V::load(sum + i), p));
    }
    for (; i < Hq; ++i) {
      const float p = exp2f(s[i] - m[i]);
      s[i] = p;
      sum[i] += p;
    }
  }
  for (i = 0; i < Hq; ++i) l[i] += sum[i];
}

// The segments of one step: token rows [tok, tok + nt) of the sequence, in runs of st rows that
// never cross a block (st divides the block size).
struct Step {
  const char* k[kMaxStepSegs];
  const char* v[kMaxStepSegs];
  int64_t n = 0, nt = 0;
};

static inline void plan_step(Step& s, int64_t tok, int64_t tok_end, int64_t st, int64_t segs, const int32_t* bt,
                             int64_t bs, int64_t block_bytes, int64_t row_bytes, const char* kbase,
                             const char* vbase) {
  s.nt = min_i64(segs * st, tok_end - tok);
  s.n = (s.nt + st - 1) / st;
  for (int64_t j = 0; j < s.n; ++j) {
    const int64_t t = tok + j * st;
    const int64_t off = bt[t / bs] * block_bytes + (t % bs) * row_bytes;
    s.k[j] = kbase + off;
    s.v[j] = vbase + off;
  }
}

template <int DT>
static void attend_impl(const PagedAttentionArgs& a, int64_t seq, int64_t b0, int64_t b1, const float* qs,
                        float* acc, float* m, float* l, float* sc, int64_t pf, int hint, int64_t pstride) {
  const int64_t Hq = a.num_heads, Hkv = a.num_kv_heads, G = Hq / Hkv, D = a.head_dim, bs = a.block_size;
  const int64_t esize = DT == 0 ? 4 : 2;
  const int64_t head_bytes = D * esize, row_bytes = Hkv * head_bytes, block_bytes = bs * row_bytes;
  const int64_t ctx = a.context_lens[seq];
  const char* kbase = static_cast<const char*>(a.key_cache);
  const char* vbase = static_cast<const char*>(a.value_cache);
  const int32_t* bt = a.block_tables + seq * a.max_blocks_per_seq;
  float* tmp = sc + step_tokens(bs, row_bytes) * Hq;
  const int64_t pv_steps_per = pv_steps_per_token(G, D);

  for (int64_t i = 0; i < Hq * D; ++i) acc[i] = 0.f;
  for (int64_t i = 0; i < Hq; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  // Software prefetch as a two-stage pipeline that keeps two sequential streams going: while the K
  // rows of a step are consumed, its V rows are prefetched (row order); while V is consumed, K of
  // the next step's segments is prefetched (contiguous runs, scattered over the pool).
  // One online-softmax step covers up to kStepTokens tokens / kStepBytes of K (several small blocks,
  // or a slice of a big one): the softmax and the read-modify-write of acc at the end of each V
  // pass cost the same per step whatever its size, which with 16-token blocks of GQA heads was a
  // large share of the work.
  const int64_t st = seg_tokens(bs, row_bytes), segs = step_segs(bs, row_bytes);
  const int64_t tok_end = min_i64(b1 * bs, ctx);
  const bool do_pf = pf > 0;
  Step cur, nxt;
  plan_step(cur, b0 * bs, tok_end, st, segs, bt, bs, block_bytes, row_bytes, kbase, vbase);
  if (do_pf)
    for (int64_t j = 0; j < cur.n; ++j) prefetch_range(cur.k[j], st * row_bytes, hint, pstride);

  Pending pend;
  for (int64_t tok = b0 * bs; tok < tok_end; tok += segs * st) {
    const int64_t nt = cur.nt;  // tokens of this step

    // 1. scores sc[t][h * G + g], segment by segment (V rows prefetched during the K pass)
    pend.n = 0;
    pend.dst = sc;
    for (int64_t j = 0; j < cur.n; ++j) {
      const int64_t ntb = min_i64(nt - j * st, st);
      for (int64_t t = 0; t < ntb; ++t) {
        const char* krow = cur.k[j] + t * row_bytes;
        const char* vrow = cur.v[j] + t * row_bytes;
        for (int64_t h = 0; h < Hkv; ++h) {
          if (do_pf) prefetch_range(vrow + h * head_bytes, head_bytes, hint, pstride);
          qk_group<DT>(krow + h * head_bytes, qs + h * G * D, G, D, pend);
        }
      }
    }
    pend.finish();
    // 2. online softmax, once per step
    softmax_block(sc, nt, Hq, m, l, acc, D, tmp);
    // 3. probabilities x V, per kv head with the group's output columns in registers; the next
    //    step's K segments are prefetched, spread evenly over the token steps of this pass
    const bool more = tok + segs * st < tok_end;
    if (more) plan_step(nxt, tok + segs * st, tok_end, st, segs, bt, bs, block_bytes, row_bytes, kbase, vbase);
    PfSegments pc;
    if (do_pf && more) {
      pc.ptrs = nxt.k;
      pc.n = nxt.n;
      pc.seg_bytes = st * row_bytes;
      pc.c.hint = hint;
      pc.c.stride = pstride;
      const int64_t steps = Hkv * nt * pv_steps_per;
      pc.c.step = ((pc.n * pc.seg_bytes + steps - 1) / steps + 63) / 64 * 64;
    }
    const Rows rw{cur.v, st, nt, row_bytes};
    for (int64_t h = 0; h < Hkv; ++h)
      pv_group<DT>(rw, h * head_bytes, sc + h * G, Hq, acc + h * G * D, G, D, pc);
    pc.finish();
    if (more) cur = nxt;
  }
}

// sc: scratch of step_tokens(block_size, row bytes) * num_heads + 2 * num_heads floats.
static void attend(const PagedAttentionArgs& a, int64_t seq, int64_t b0, int64_t b1, const float* qs, float* acc,
                   float* m, float* l, float* sc, int64_t pf, int hint, int64_t pstride) {
  switch (a.kv_dtype) {
    case DType::F32:
      attend_impl<0>(a, seq, b0, b1, qs, acc, m, l, sc, pf, hint, pstride);
      break;
    case DType::F16:
      attend_impl<1>(a, seq, b0, b1, qs, acc, m, l, sc, pf, hint, pstride);
      break;
    case DType::BF16:
      attend_impl<2>(a, seq, b0, b1, qs, acc, m, l, sc, pf, hint, pstride);
      break;
  }
}
