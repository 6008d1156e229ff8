// Paged decode attention, AVX2 path specialised at compile time for head_dim 128 and a group of
// G = 1 (MHA) or 4 (GQA-4) query heads per KV head, 16-bit K/V (fp16, bf16).
//
// paged_decode_attention.cpp includes this file in the AVX2 namespace after the generic body
// (paged_decode_attention_body.h), whose steps, segments, softmax and prefetch pipeline it reuses:
// same work per step, same order of the floating-point operations within a score and within an output
// column (so results agree with the generic body within rounding of the reduction tree), but with
// every trip count that depends on head_dim and G a constant:
//   * K pass: one token row at a time, 8 / G KV heads at a time, the 8 scores of those heads
//     reduced together by one reduce_w and stored straight into the step's score row (no pending
//     queue); G = 1 runs 4 accumulator chains per head, G = 4 two chains for each of the 4 heads.
//   * V pass: per KV head and column tile (G x 8 / G registers: 4 heads x 16 columns or 1 head x 64
//     columns), tokens two at a time with pointer bumps; the next step's K is prefetched in one
//     contiguous chunk per tile pass, a fixed number of lines per token pair (no per-token cursor).
// `attend_d128` returns false for any other shape or when the prefetch knobs differ from their
// defaults (T1, every line); the caller then runs the generic body.

template <int G>
static inline bool d128_shape(const PagedAttentionArgs& a) {
  return a.num_heads == G * a.num_kv_heads && (a.num_heads % 8) == 0;
}

// G dot products of the 128-element K row at k with the group's (scaled) queries q[g * 128 + ...].
template <int DT, int G>
static inline void qk_heads_d128(const char* k, const float* q, V::reg* out) {
  constexpr int C = G == 1 ? 4 : 2;  // accumulator chains per head
  V::reg a[G][C];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) a[g][c] = V::zero();
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += C) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const V::reg kv = ldkv<DT>(k, (i + c) * 8);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) a[g][c] = V::fma(kv, V::load(q + g * 128 + (i + c) * 8), a[g][c]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    if constexpr (C == 4)
      out[g] = V::add(V::add(a[g][0], a[g][1]), V::add(a[g][2], a[g][3]));
    else
      out[g] = V::add(a[g][0], a[g][1]);
  }
}

// The next step's K, prefetched in one chunk per V tile pass: `per` lines per token pair.
struct PfChunks {
  PfSegments seg;      // cursor over the next step's K segments
  int64_t chunk = 0;   // bytes per tile pass (whole lines)
  int64_t pairs = 1;   // token pairs per tile pass
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t per = 0;
  // take the next chunk (within one segment; what a segment end cuts off goes to the next pass)
  inline void open() {
    seg.next();
    PfCursor& c = seg.c;
    p = c.p;
    end = c.p + min_i64(chunk, c.end - c.p);
    c.p = end;
    per = (end - p + 64 * pairs - 1) / (64 * pairs);
  }
  inline void tick() {
    for (int64_t i = 0; i < per; ++i) {
      if (p >= end) return;
      APEX_PREFETCH("prefetcht1", p);
      p += 64;
    }
  }
  inline void close() {
    if (p < end) prefetch_range(p, end - p, 1, 64);
    p = end;
  }
};

// acc[g * 128 + c0 + ...] += sum_t p[t * Hq + g] * V[t][c0 + ...] for one column tile of one KV head:
// vb[j] = V of segment j at this head's and tile's first column.
template <int DT, int G>
static inline void pv_tile_d128(const char* const* vb, int64_t st, int64_t nt, int64_t row_bytes, const float* p,
                                int64_t Hq, float* acc, PfChunks& pf) {
  constexpr int DV = 8 / G;
  V::reg a[G][DV];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int j = 0; j < DV; ++j) a[g][j] = V::zero();
  auto token = [&](const char* vr, const float* pr) __attribute__((always_inline)) {
    V::reg pv[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) pv[g] = V::set1(pr[g]);
#pragma GCC unroll 8
    for (int j = 0; j < DV; ++j) {
      const V::reg v = ldkv<DT>(vr, j * 8);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) a[g][j] = V::fma(pv[g], v, a[g][j]);
    }
  };
  for (int64_t t0 = 0, j = 0; t0 < nt; t0 += st, ++j) {
    const int64_t n = min_i64(st, nt - t0);
    const char* vr = vb[j];
    const float* pr = p + t0 * Hq;
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
      pf.tick();
      token(vr, pr);
      token(vr + row_bytes, pr + Hq);
      vr += 2 * row_bytes;
      pr += 2 * Hq;
    }
    if (t < n) {
      pf.tick();
      token(vr, pr);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int j = 0; j < DV; ++j) {
      float* o = acc + g * 128 + j * 8;
      V::store(o, V::add(V::load(o), a[g][j]));
    }
}

template <int DT, int G>
static void attend_d128_impl(const PagedAttentionArgs& a, int64_t seq, int64_t b0, int64_t b1, const float* qs,
                             float* acc, float* m, float* l, float* sc, bool do_pf) {
  constexpr int64_t D = 128, head_bytes = D * 2, HPR = 8 / G;  // KV heads per score reduction
  constexpr int64_t DV = 8 / G, tiles = D / (DV * 8);          // V column tiles per KV head
  const int64_t Hq = a.num_heads, Hkv = a.num_kv_heads, bs = a.block_size;
  const int64_t row_bytes = Hkv * head_bytes, block_bytes = bs * row_bytes;
  const int64_t ctx = a.context_lens[seq];
  const char* kbase = static_cast<const char*>(a.key_cache);
  const char* vbase = static_cast<const char*>(a.value_cache);
  const int32_t* bt = a.block_tables + seq * a.max_blocks_per_seq;
  float* tmp = sc + step_tokens(bs, row_bytes) * Hq;

  for (int64_t i = 0; i < Hq * D; ++i) acc[i] = 0.f;
  for (int64_t i = 0; i < Hq; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  const int64_t st = seg_tokens(bs, row_bytes), segs = step_segs(bs, row_bytes);
  const int64_t tok_end = min_i64(b1 * bs, ctx);
  Step cur, nxt;
  plan_step(cur, b0 * bs, tok_end, st, segs, bt, bs, block_bytes, row_bytes, kbase, vbase);
  if (do_pf)
    for (int64_t j = 0; j < cur.n; ++j) prefetch_range(cur.k[j], st * row_bytes, 1, 64);

  for (int64_t tok = b0 * bs; tok < tok_end; tok += segs * st) {
    const int64_t nt = cur.nt;
    // 1. scores sc[t][h * G + g]; the V row (t, h) is prefetched before K row (t, h) is used
    for (int64_t j = 0, t0 = 0; j < cur.n; ++j, t0 += st) {
      const int64_t ntb = min_i64(nt - t0, st);
      for (int64_t t = 0; t < ntb; ++t) {
        const char* krow = cur.k[j] + t * row_bytes;
        const char* vrow = cur.v[j] + t * row_bytes;
        float* srow = sc + (t0 + t) * Hq;
        for (int64_t h = 0; h < Hkv; h += HPR) {
          V::reg r[8];
#pragma GCC unroll 8
          for (int64_t hh = 0; hh < HPR; ++hh) {
            if (do_pf) {
              const char* pv = vrow + (h + hh) * head_bytes;
              APEX_PREFETCH("prefetcht1", pv);
              APEX_PREFETCH("prefetcht1", pv + 64);
              APEX_PREFETCH("prefetcht1", pv + 128);
              APEX_PREFETCH("prefetcht1", pv + 192);
            }
            qk_heads_d128<DT, G>(krow + (h + hh) * head_bytes, qs + (h + hh) * G * D, r + hh * G);
          }
          V::store(srow + h * G, V::reduce_w(r));
        }
      }
    }
    // 2. online softmax, once per step
    softmax_block(sc, nt, Hq, m, l, acc, D, tmp);
    // 3. probabilities x V per KV head and column tile; the next step's K is prefetched meanwhile
    const bool more = tok + segs * st < tok_end;
    if (more) plan_step(nxt, tok + segs * st, tok_end, st, segs, bt, bs, block_bytes, row_bytes, kbase, vbase);
    PfChunks pf;
    if (do_pf && more) {
      pf.seg.ptrs = nxt.k;
      pf.seg.n = nxt.n;
      pf.seg.seg_bytes = st * row_bytes;
      const int64_t passes = Hkv * tiles, total = nxt.n * st * row_bytes;
      pf.chunk = ((total + passes - 1) / passes + 63) / 64 * 64;
      pf.pairs = (nt + 1) / 2;
    }
    const char* vb[kMaxStepSegs];
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t c = 0; c < tiles; ++c) {
        const int64_t off = h * head_bytes + c * DV * 8 * 2;
        for (int64_t j = 0; j < cur.n; ++j) vb[j] = cur.v[j] + off;
        if (pf.chunk) pf.open();
        pv_tile_d128<DT, G>(vb, st, nt, row_bytes, sc + h * G, Hq, acc + h * G * D + c * DV * 8, pf);
        pf.close();
      }
    }
    if (pf.chunk) pf.seg.finish();
    if (more) cur = nxt;
  }
}

// The specialised path for this call's shape, or false (then the caller runs `attend`).
static bool attend_d128(const PagedAttentionArgs& a, int64_t seq, int64_t b0, int64_t b1, const float* qs,
                        float* acc, float* m, float* l, float* sc, int64_t pf, int hint, int64_t pstride) {
  if (a.head_dim != 128 || a.kv_dtype == DType::F32 || (pf > 0 && (hint != 1 || pstride != 64))) return false;
  const bool do_pf = pf > 0;
  const bool f16 = a.kv_dtype == DType::F16;
  if (d128_shape<4>(a)) {
    if (f16)
      attend_d128_impl<1, 4>(a, seq, b0, b1, qs, acc, m, l, sc, do_pf);
    else
      attend_d128_impl<2, 4>(a, seq, b0, b1, qs, acc, m, l, sc, do_pf);
    return true;
  }
  if (d128_shape<1>(a)) {
    if (f16)
      attend_d128_impl<1, 1>(a, seq, b0, b1, qs, acc, m, l, sc, do_pf);
    else
      attend_d128_impl<2, 1>(a, seq, b0, b1, qs, acc, m, l, sc, do_pf);
    return true;
  }
  return false;
}
