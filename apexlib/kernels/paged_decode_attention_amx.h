// AMX-BF16 path of the paged decode-attention kernel for bf16 KV caches (Isa::Amx).
//
// Included once, inside the AMX target region of paged_decode_attention.cpp, after
// paged_decode_attention_body.h (it reuses PfBlocks, prefetch_range, min_i64). No include guard on
// purpose. Used when block_size % 16 == 0, head_dim % 32 == 0 and the GQA group has <= 16 heads;
// other shapes (and fp32/fp16 caches) run the AVX-512 body.
//
// Why: for bf16 GQA-4 the fp32-FMA path is compute bound on 2 SPR cores (per K and per V element a
// 2-uop bf16 -> fp32 widening plus G fp32 FMAs: ~15 GB/s per core in cache against the 12-15 GB/s
// of DRAM each core must sustain). Tried first and dropped: AVX512_BF16 vdpbf16ps (Q.K over pairs
// of head_dim straight from the cache; P.V over two tokens' V rows interleaved with vpunpck[lh]wd,
// times the bf16 pair (p_t, p_t+1)). On this SPR vdpbf16ps zmm issues once per 2 cycles (measured:
// 0.5/cycle, latency 8; fp32 FMA 2/cycle), i.e. half the multiply rate of fp32 FMAs, so saving the
// widening did not pay: bf16 GQA-4 in cache, 1 thread 15.7 -> 14.6 GB/s, 2 threads 28.7 -> 26.4
// (MHA 35.4 -> 40.2 with 2 threads).
//
// AMX does a 16 x 32 x 16 bf16 product per tdpbf16ps in the tile unit, so the vector ports are left
// with data movement only:
//   * K pass, per 16-token sub-block and kv head: C[16 tokens x G] += A[16 tokens x 32 d] .
//     B[32 d x G]. A is loaded straight from the cache (tileloadd with the row stride of the
//     cache: no conversion, no transpose); B is the group's query rounded to bf16 in the VNNI layout
//     (built once per work item); C is stored straight into the score matrix sc[t][head].
//   * softmax in fp32 as in the body; the probabilities are rounded to bf16 (summed as rounded, so
//     the weights still sum to 1) and written transposed, P[head][token], zero past the step's end.
//   * V pass, per kv head: the step's V rows are re-laid into the VNNI layout (token pairs
//     interleaved: vpunpck[lh]wd + vpermt2d, 64-byte rows, in L1), then per 16 output columns
//     C[G x 16] (loaded from and stored back to acc) += P[G x 32 tokens] . Vvnni[32 tokens x 16].
// Measured (2 SPR cores of a VM, bf16 KV, fp32 query; Isa::Amx is therefore opt-in, never the default):
//   * K/V in L2 (1 MiB, 1 thread): GQA-4 16.3 -> 25.0 GB/s; MHA 24.7 -> 18.8 GB/s (vs AVX-512);
//   * K/V from DRAM, 2 threads, batch 8/32, context 1k/4k, GQA-4: AVX-512 0.57-0.64 of DRAM read,
//     this path 0.47-0.52; K pass on tiles + P.V with fp32 FMAs (APEX_AMX_V=0) 0.50-0.57; K staged
//     through L1 with vector loads (APEX_AMX_STAGE_K=1) no better; 1 thread, batch 32, context 4k:
//     7.5 GB/s (0.51) vs 9.0 GB/s (0.59);
//   * ceilings of the same pipeline (prefetches + softmax only) 0.85-0.89, with the fp32-FMA V pass
//     but no K pass 0.66-0.70: the passes barely overlap with the DRAM stream, and the tile path
//     overlaps worse (a tile load of data just written by vector stores (scores, V re-layout, acc)
//     waits until those stores commit, i.e. until every older load, misses included, has retired).
//     ldtilecfg is not the cost (4x more of them: no change).
// Numerics (documented reduced precision, see tests/test_cpu_attention.py::check):
//   * query rounded to bf16 (relative error <= 2^-8 per element, exact for a bf16 query);
//   * probabilities rounded to bf16 (relative <= 2^-8) and normalised by the sum of the rounded
//     values: |out error| <= 2 * 2^-8 * max_t |v_t| (plus fp32 accumulation error);
//   * tdpbf16ps treats bf16 denormals as zero and flushes fp32 denormal results (|x| < 2^-126).

// Tile instructions as volatile asm with a memory clobber (GCC's _tile_loadd macro has none, so
// stores to the buffers it reads could be moved after it).
#define APEX_TILE_LOAD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define APEX_TILE_STORE(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define APEX_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define APEX_TILE_DPBF16(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

struct alignas(64) AmxTileCfg {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles are not renamed: a tdpbf16ps waits for the previous one on the same C tile (and a tile load
// for the readers of its tile), so each pass keeps 4 independent accumulators and alternates 2 A and
// 2 B tiles. One configuration per pass (ldtilecfg zeroes the tiles; twice per step).
// K pass: tmm0-3 scores C [16 tokens x G fp32] (4 kv heads), tmm4-5 K A [16 x 32 bf16], tmm6-7 query B
// [16 pairs x G]. V pass: tmm0-3 out C [G x 16 fp32] (4 column chunks), tmm4-5 P A [G x 32 tokens],
// tmm6-7 V B [16 token pairs x 16 columns].
static inline void amx_configure(int64_t G, bool v_pass) {
  AmxTileCfg cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  const uint16_t gcols = static_cast<uint16_t>(G * 4);
  const uint8_t g = static_cast<uint8_t>(G);
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = v_pass ? g : 16;
    cfg.colsb[t] = v_pass ? 64 : gcols;
  }
  for (int t = 4; t < 6; ++t) {
    cfg.rows[t] = v_pass ? g : 16;
    cfg.colsb[t] = 64;
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = v_pass ? 64 : gcols;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}

static inline bool amx_shape_ok(const PagedAttentionArgs& a) {
  const int64_t G = a.num_heads / a.num_kv_heads;
  return a.kv_dtype == DType::BF16 && a.block_size % 16 == 0 && a.head_dim % 32 == 0 && G <= 16;
}

// Query (fp32, scaled, [Hq][D]) -> per kv head h and 32-column chunk kc the B tile
// qv[((h * (D/32) + kc) * 16 + r) * G + n] = bf16 pair (q[hG+n][32kc+2r], q[hG+n][32kc+2r+1]).
static inline void amx_query_vnni(const float* q, int64_t Hkv, int64_t G, int64_t D, uint32_t* qv) {
  const int64_t nkc = D / 32;
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t kc = 0; kc < nkc; ++kc)
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t n = 0; n < G; ++n) {
          const float* row = q + (h * G + n) * D + 32 * kc + 2 * r;
          qv[((h * nkc + kc) * 16 + r) * G + n] =
              static_cast<uint32_t>(f32_to_bf16(row[0])) | static_cast<uint32_t>(f32_to_bf16(row[1])) << 16;
        }
}

// Online-softmax step as softmax_block, the probabilities rounded to bf16, summed as rounded and
// written transposed: pb[i * tp + t] (t < ntp, zero for t >= nt).
static inline void amx_softmax_step(float* sc, int64_t nt, int64_t ntp, int64_t Hq, float* m, float* l, float* acc,
                                    int64_t D, float* tmp, uint16_t* pb, int64_t tp) {
  float* mx = tmp;
  float* sum = tmp + Hq;
  for (int64_t i = 0; i < Hq; i += 16) {
    const __mmask16 k = Hq - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (Hq - i)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(k, sc + i);
    for (int64_t t = 1; t < nt; ++t) v = _mm512_max_ps(v, _mm512_maskz_loadu_ps(k, sc + t * Hq + i));
    _mm512_mask_storeu_ps(mx + i, k, v);
    _mm512_mask_storeu_ps(sum + i, k, _mm512_setzero_ps());
  }
  for (int64_t i = 0; i < Hq; ++i) {
    if (mx[i] > m[i]) {
      if (m[i] != -INFINITY) {
        const float alpha = exp2f(m[i] - mx[i]);
        l[i] *= alpha;
        const __m512 va = _mm512_set1_ps(alpha);
        float* a = acc + i * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), va));
      }
      m[i] = mx[i];
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    float* s = sc + t * Hq;
    for (int64_t i = 0; i < Hq; i += 16) {
      const __mmask16 k = Hq - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (Hq - i)) - 1u);
      const __m512 p = V::exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), _mm512_maskz_loadu_ps(k, m + i)));
      const __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p));
      const __m512 pr = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));  // p rounded to bf16
      _mm512_mask_storeu_ps(sum + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, sum + i), pr));
      _mm512_mask_storeu_ps(s + i, k, pr);
    }
  }
  for (int64_t i = 0; i < Hq; ++i) l[i] += sum[i];
  // transpose into pb (bf16 bits are the high halves of the rounded fp32 values)
  for (int64_t i = 0; i < Hq; ++i) {
    uint16_t* dst = pb + i * tp;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int>(Hq)));
    for (int64_t t = 0; t < ntp; t += 16) {
      const __mmask16 k = nt - t >= 16 ? __mmask16(0xFFFF) : nt - t <= 0 ? __mmask16(0) : __mmask16((1u << (nt - t)) - 1u);
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, idx, sc + t * Hq + i, 4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t), _mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
    }
  }
}

// V rows of tokens [0, ntp) of one kv head (rows[t] + hoff; zero for t >= nt) -> VNNI tiles
// vv[((c * (D/16) + dc) * 16 + r) * 16 + n] = (V[32c+2r][16dc+n], V[32c+2r+1][16dc+n]) (bf16 pairs).
template <typename PC>
static inline void amx_v_vnni(const char* const* rows, int64_t nt, int64_t ntp, int64_t hoff, int64_t D,
                              uint32_t* vv, PC& pc) {
  const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i ib = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const int64_t ndc = D / 16;
  for (int64_t t = 0; t < ntp; t += 2) {
    pc.tick();
    const int64_t c = t / 32, r = (t % 32) / 2;
    uint32_t* dst = vv + (c * ndc * 16 + r) * 16;
    if (t + 1 < nt) {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(rows[t] + hoff);
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(rows[t + 1] + hoff);
      for (int64_t d = 0; d < D; d += 32) {
        const __m512i v0 = _mm512_loadu_si512(r0 + d), v1 = _mm512_loadu_si512(r1 + d);
        const __m512i lo = _mm512_unpacklo_epi16(v0, v1), hi = _mm512_unpackhi_epi16(v0, v1);
        _mm512_storeu_si512(dst + (d / 16) * 256, _mm512_permutex2var_epi32(lo, ia, hi));
        _mm512_storeu_si512(dst + (d / 16 + 1) * 256, _mm512_permutex2var_epi32(lo, ib, hi));
      }
    } else if (t < nt) {  // last odd token: its pair partner is zero
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(rows[t] + hoff);
      for (int64_t d = 0; d < D; d += 32) {
        const __m512i v0 = _mm512_loadu_si512(r0 + d), v1 = _mm512_setzero_si512();
        const __m512i lo = _mm512_unpacklo_epi16(v0, v1), hi = _mm512_unpackhi_epi16(v0, v1);
        _mm512_storeu_si512(dst + (d / 16) * 256, _mm512_permutex2var_epi32(lo, ia, hi));
        _mm512_storeu_si512(dst + (d / 16 + 1) * 256, _mm512_permutex2var_epi32(lo, ib, hi));
      }
    } else {
      for (int64_t d = 0; d < D; d += 32) {
        _mm512_storeu_si512(dst + (d / 16) * 256, _mm512_setzero_si512());
        _mm512_storeu_si512(dst + (d / 16 + 1) * 256, _mm512_setzero_si512());
      }
    }
  }
}

// APEX_AMX_V=1: P.V on the tiles too (default); 0: K pass on the tiles, P.V with the body's fp32 FMAs
// (probabilities not rounded). Both measured, see the header comment.
#ifndef APEX_AMX_V
#define APEX_AMX_V 1
#endif
// APEX_AMX_STAGE_K=1: copy K through an L1 buffer with vector loads before the tile loads (measured:
// no better than tile loads straight from the cache, the default).
#ifndef APEX_AMX_STAGE_K
#define APEX_AMX_STAGE_K 0
#endif
// Copies the 16 K rows of 4 kv heads (from k0, row stride row_bytes) into kbuf as 64-byte tile rows:
// kbuf[((u * nkc + kc) * 16 + r) * 64] = K[r][head u][32 kc ...].
static inline void amx_stage_k(const char* k0, int64_t row_bytes, int64_t head_bytes, int64_t nkc, char* kbuf,
                               PfCursor& vpf) {
  for (int64_t r = 0; r < 16; ++r) {
    vpf.tick();
    const char* row = k0 + r * row_bytes;
    for (int64_t u = 0; u < 4; ++u)
      for (int64_t kc = 0; kc < nkc; ++kc)
        _mm512_store_si512(kbuf + ((u * nkc + kc) * 16 + r) * 64, _mm512_loadu_si512(row + u * head_bytes + kc * 64));
  }
}

// Scratch (floats) needed by attend_amx besides `sc`: query VNNI, transposed bf16 P, V VNNI, row pointers.
static inline int64_t amx_scratch_floats(int64_t Hq, int64_t D, int64_t max_step_tokens) {
  const int64_t tp = (max_step_tokens + 31) / 32 * 32;
  return (Hq * D / 2 + 15) / 16 * 16 + (Hq * tp / 2 + 15) / 16 * 16 + (tp * D / 2 + 15) / 16 * 16 +
         (2 * max_step_tokens + 15) / 16 * 16 + 32 * D;
}

// As attend_impl<2> (same steps, prefetch pipeline and outputs) with the AMX passes above.
// Requires amx_shape_ok(a); xs: amx_scratch_floats(...) floats, 64-byte aligned.
static void attend_amx(const PagedAttentionArgs& a, int64_t seq, int64_t b0, int64_t b1, const float* qs,
                       float* acc, float* m, float* l, float* sc, float* xs, int64_t pf, int hint, int64_t pstride) {
  const int64_t Hq = a.num_heads, Hkv = a.num_kv_heads, G = Hq / Hkv, D = a.head_dim, bs = a.block_size;
  const int64_t head_bytes = D * 2, row_bytes = Hkv * head_bytes, block_bytes = bs * row_bytes;
  const int64_t ctx = a.context_lens[seq];
  const char* kbase = static_cast<const char*>(a.key_cache);
  const char* vbase = static_cast<const char*>(a.value_cache);
  const int32_t* bt = a.block_tables + seq * a.max_blocks_per_seq;
  const int64_t gb = step_blocks(bs, block_bytes);
  const int64_t max_nt = gb * bs, tp = (max_nt + 31) / 32 * 32, nkc = D / 32, ndc = D / 16;
  float* tmp = sc + max_nt * Hq;
  uint32_t* qv = reinterpret_cast<uint32_t*>(xs);
  uint16_t* pb = reinterpret_cast<uint16_t*>(xs + (Hq * D / 2 + 15) / 16 * 16);
  uint32_t* vv = reinterpret_cast<uint32_t*>(xs + (Hq * D / 2 + 15) / 16 * 16 + (Hq * tp / 2 + 15) / 16 * 16);
  const int64_t rows_off = (Hq * D / 2 + 15) / 16 * 16 + (Hq * tp / 2 + 15) / 16 * 16 + (tp * D / 2 + 15) / 16 * 16;
  const char** rows = reinterpret_cast<const char**>(xs + rows_off);
  char* kbuf = reinterpret_cast<char*>(xs + rows_off + (2 * max_nt + 15) / 16 * 16);

  amx_query_vnni(qs, Hkv, G, D, qv);
  for (int64_t i = 0; i < Hq * D; ++i) acc[i] = 0.f;
  for (int64_t i = 0; i < Hq; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  for (int64_t j = b0; j < min_i64(b0 + gb, b1); ++j)
    if (pf > 0) prefetch_range(kbase + bt[j] * block_bytes, block_bytes, hint, pstride);

  for (int64_t s0 = b0; s0 < b1; s0 += gb) {
    const int64_t nb = min_i64(gb, b1 - s0);
    const int64_t nt = min_i64(ctx - s0 * bs, nb * bs);
    const int64_t ntp = (nt + 31) / 32 * 32;
    const bool do_pf = pf > 0;

    // 1. scores, 16 tokens x G heads per tile (V of each block prefetched during its K pass)
    amx_configure(G, false);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t pbk = bt[s0 + j];
      const char* kblk = kbase + pbk * block_bytes;
      const char* vblk = vbase + pbk * block_bytes;
      const int64_t ntb = min_i64(nt - j * bs, bs);
      for (int64_t t = 0; t < ntb; ++t) rows[j * bs + t] = vblk + t * row_bytes;
      PfCursor vpf;  // V of this block, spread over its K tiles
      if (do_pf) {
        const int64_t ticks = (ntb + 15) / 16 * (Hkv / 4 * 16 + Hkv % 4);
        vpf.p = vblk;
        vpf.end = vblk + block_bytes;
        vpf.step = ((block_bytes + ticks - 1) / ticks + 63) / 64 * 64;
        vpf.hint = hint;
        vpf.stride = pstride;
      }
      for (int64_t t0 = 0; t0 < ntb; t0 += 16) {
        const char* kt = kblk + t0 * row_bytes;
        float* st = sc + (j * bs + t0) * Hq;
        int64_t h = 0;
        for (; h + 4 <= Hkv; h += 4) {
          if (!APEX_AMX_STAGE_K)
            for (int r = 0; r < 16; ++r) vpf.tick();
          APEX_TILE_ZERO(0);
          APEX_TILE_ZERO(1);
          APEX_TILE_ZERO(2);
          APEX_TILE_ZERO(3);
          const uint32_t* q0 = qv + h * nkc * 16 * G;
          const int64_t qh = nkc * 16 * G;  // query tile stride between kv heads
#if APEX_AMX_STAGE_K
          amx_stage_k(kt + h * head_bytes, row_bytes, head_bytes, nkc, kbuf, vpf);
          const char* k0 = kbuf;
          const int64_t ks = 64, kh = nkc * 16 * 64, kcs = 16 * 64;
#else
          const char* k0 = kt + h * head_bytes;
          const int64_t ks = row_bytes, kh = head_bytes, kcs = 64;
#endif
          for (int64_t kc = 0; kc < nkc; ++kc) {
            APEX_TILE_LOAD(4, k0 + kc * kcs, ks);
            APEX_TILE_LOAD(6, q0 + kc * 16 * G, G * 4);
            APEX_TILE_DPBF16(0, 4, 6);
            APEX_TILE_LOAD(5, k0 + kh + kc * kcs, ks);
            APEX_TILE_LOAD(7, q0 + qh + kc * 16 * G, G * 4);
            APEX_TILE_DPBF16(1, 5, 7);
            APEX_TILE_LOAD(4, k0 + 2 * kh + kc * kcs, ks);
            APEX_TILE_LOAD(6, q0 + 2 * qh + kc * 16 * G, G * 4);
            APEX_TILE_DPBF16(2, 4, 6);
            APEX_TILE_LOAD(5, k0 + 3 * kh + kc * kcs, ks);
            APEX_TILE_LOAD(7, q0 + 3 * qh + kc * 16 * G, G * 4);
            APEX_TILE_DPBF16(3, 5, 7);
          }
          APEX_TILE_STORE(0, st + h * G, Hq * 4);
          APEX_TILE_STORE(1, st + (h + 1) * G, Hq * 4);
          APEX_TILE_STORE(2, st + (h + 2) * G, Hq * 4);
          APEX_TILE_STORE(3, st + (h + 3) * G, Hq * 4);
        }
        for (; h < Hkv; ++h) {
          vpf.tick();
          APEX_TILE_ZERO(0);
          for (int64_t kc = 0; kc < nkc; ++kc) {
            APEX_TILE_LOAD(4, kt + h * head_bytes + kc * 64, row_bytes);
            APEX_TILE_LOAD(6, qv + (h * nkc + kc) * 16 * G, G * 4);
            APEX_TILE_DPBF16(0, 4, 6);
          }
          APEX_TILE_STORE(0, st + h * G, Hq * 4);
        }
      }
      vpf.finish();
    }
    // 2. online softmax; bf16 probabilities transposed into pb
#if APEX_AMX_V
    amx_softmax_step(sc, nt, ntp, Hq, m, l, acc, D, tmp, pb, tp);
#else
    softmax_block(sc, nt, Hq, m, l, acc, D, tmp);
#endif
    // 3. probabilities x V per kv head; the next step's K blocks are prefetched, spread over the
    //    token pairs of the V re-layout
    PfBlocks pc;
    if (do_pf && s0 + gb < b1) {
      pc.base = kbase;
      pc.ids = bt + s0 + gb;
      pc.n = min_i64(gb, b1 - s0 - gb);
      pc.block_bytes = block_bytes;
      pc.c.hint = hint;
      pc.c.stride = pstride;
      const int64_t steps = Hkv * (ntp / 2);
      pc.c.step = ((pc.n * block_bytes + steps - 1) / steps + 63) / 64 * 64;
    }
#if APEX_AMX_V
    amx_configure(G, true);
    for (int64_t h = 0; h < Hkv; ++h) {
      amx_v_vnni(rows, nt, ntp, h * head_bytes, D, vv, pc);
      float* ah = acc + h * G * D;
      const uint16_t* ph = pb + h * G * tp;
      const int64_t nc = ntp / 32;
      int64_t dc = 0;
      for (; dc + 4 <= ndc; dc += 4) {
        float* o = ah + dc * 16;
        APEX_TILE_LOAD(0, o, D * 4);
        APEX_TILE_LOAD(1, o + 16, D * 4);
        APEX_TILE_LOAD(2, o + 32, D * 4);
        APEX_TILE_LOAD(3, o + 48, D * 4);
        for (int64_t c = 0; c < nc; ++c) {
          const uint32_t* vb = vv + (c * ndc + dc) * 256;
          APEX_TILE_LOAD(4, ph + c * 32, tp * 2);
          APEX_TILE_LOAD(6, vb, 64);
          APEX_TILE_DPBF16(0, 4, 6);
          APEX_TILE_LOAD(7, vb + 256, 64);
          APEX_TILE_DPBF16(1, 4, 7);
          APEX_TILE_LOAD(6, vb + 512, 64);
          APEX_TILE_DPBF16(2, 4, 6);
          APEX_TILE_LOAD(7, vb + 768, 64);
          APEX_TILE_DPBF16(3, 4, 7);
        }
        APEX_TILE_STORE(0, o, D * 4);
        APEX_TILE_STORE(1, o + 16, D * 4);
        APEX_TILE_STORE(2, o + 32, D * 4);
        APEX_TILE_STORE(3, o + 48, D * 4);
      }
      for (; dc < ndc; ++dc) {
        APEX_TILE_LOAD(0, ah + dc * 16, D * 4);
        for (int64_t c = 0; c < nc; ++c) {
          APEX_TILE_LOAD(4, ph + c * 32, tp * 2);
          APEX_TILE_LOAD(6, vv + (c * ndc + dc) * 256, 64);
          APEX_TILE_DPBF16(0, 4, 6);
        }
        APEX_TILE_STORE(0, ah + dc * 16, D * 4);
      }
    }
#else
    {
      const int64_t steps = Hkv * nt * pv_steps_per_token(G, D);
      if (pc.n) pc.c.step = ((pc.n * block_bytes + steps - 1) / steps + 63) / 64 * 64;
      const char* vb[kMaxStepBlocks];
      for (int64_t j = 0; j < nb; ++j) vb[j] = vbase + bt[s0 + j] * block_bytes;
      const Rows rw{vb, bs, nt, row_bytes};
      for (int64_t h = 0; h < Hkv; ++h)
        pv_group<2>(rw, h * head_bytes, sc + h * G, Hq, acc + h * G * D, G, D, pc);
    }
#endif
    pc.finish();
  }
  __asm__ volatile("tilerelease" ::: "memory");
}
