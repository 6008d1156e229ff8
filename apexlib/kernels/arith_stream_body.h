// Body of the minimum-arithmetic stream probe (arith_stream.cpp), included once per ISA namespace,
// inside that ISA's target region. Expects in the enclosing namespace:
//   struct V { using reg; NR (registers per 16-element group); QN (distinct query registers per
//              head: register r of a group uses query register r % QN); zero(); fma(a, b, c);
//              load_f32/load_f16/load_bf16(const char*, reg* out) (one 16-element group -> NR regs);
//              query(g, qi) (query register qi of head g, from query_value in arith_stream.cpp);
//              store(float*, reg); LU (64-byte lines per unrolled step of the hot loop: 4 for the
//              vector paths, 1 for scalar, whose 16 FMAs per group and head are already unrolled) };
//   constexpr int kChains: independent accumulator chains to aim for (U = kChains / G per query head).
// and in apex:: (arith_stream.cpp, before the ISA namespaces): StreamItem, kMaxGenericGroup.

// Software prefetch cursor over the item's logical stream K(b0), V(b0), K(b0+1), V(b0+1), ... (each
// block's valid bytes only), one 64-byte line per step. Each segment starts at its first line
// (aligned down), so a block whose bytes straddle a line boundary gets every line it touches. Once
// the stream is exhausted (or prefetch is off) the cursor parks on a dummy line with step 0, so the
// hot loop needs no branch for it.
struct PfCursor {
  const StreamItem* it;
  const char* dummy;
  int64_t j;
  int kv;                 // 0: K of block j, 1: V of block j
  const char* p;          // next line to prefetch
  const char* end;        // end of the current segment
  int64_t step;           // 64, or 0 once parked

  void open() {
    const char* start = it->segment(j, kv);
    end = start + it->segment_bytes(j);
    p = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(start) & ~uintptr_t{63});
    step = 64;
  }
  void park() {
    p = end = dummy;
    step = 0;
  }
  void next_segment() {
    if (kv == 0) {
      kv = 1;
    } else {
      kv = 0;
      ++j;
    }
    if (j >= it->b1)
      park();
    else
      open();
  }
  // lines left in the current segment (a large number once parked)
  int64_t lines_left() const { return step ? (end - p + 63) >> 6 : INT64_MAX; }
  void start(const StreamItem* item, const char* dummy_line, int64_t dist) {
    it = item;
    dummy = dummy_line;
    j = item->b0;
    kv = 0;
    if (dist <= 0 || j >= item->b1) {
      park();
      return;
    }
    open();
    // begin `dist` bytes (whole lines) into the stream: the first lines of the item are demand
    // loads, after that every consumed line issues the prefetch of one line ahead
    int64_t skip = dist >> 6;
    while (step && skip > 0) {
      const int64_t left = lines_left();
      if (skip < left) {
        p += skip * 64;
        skip = 0;
      } else {
        skip -= left;
        next_segment();
      }
    }
  }
};

// Streams one work item. G > 0: compile-time group size; the G x U accumulators and G x QN query
// registers are locals of this function and the hot loop is straight-line code (its trip count is
// cut where either the consumed or the prefetched segment ends), so they stay in registers.
// G == 0: run-time group size `gr` (<= kMaxGenericGroup), accumulators and queries in stack arrays
// (a fallback, not tuned).
template <int DT, int G>
double stream_item(const StreamItem& it, int gr, int64_t dist) {
  constexpr int64_t kGroupBytes = 16 * (DT == 0 ? 4 : 2);
  constexpr int kGroupsPerLine = static_cast<int>(64 / kGroupBytes);
  constexpr int NG = G > 0 ? G : kMaxGenericGroup;
  constexpr int U = G > 0 ? (kChains / G > 1 ? kChains / G : 1) : 1;
  const int ng = G > 0 ? G : gr;

  // every loop over acc / q is fully unrolled for G > 0: a variable index would keep them in memory
  V::reg acc[NG][U];
  V::reg q[NG][V::QN];
#pragma GCC unroll 16
  for (int g = 0; g < (G > 0 ? G : ng); ++g) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) acc[g][u] = V::zero();
#pragma GCC unroll 16
    for (int qi = 0; qi < V::QN; ++qi) q[g][qi] = V::query(g, qi);
  }
  // one 16-element group at p into accumulator chains starting at `chain`
  auto consume = [&](const char* p, int chain) __attribute__((always_inline)) {
    V::reg x[V::NR];
    if (DT == 0)
      V::load_f32(p, x);
    else if (DT == 1)
      V::load_f16(p, x);
    else
      V::load_bf16(p, x);
#pragma GCC unroll 16
    for (int r = 0; r < V::NR; ++r) {
      const int u = (chain + r) % U;
      if constexpr (G > 0) {
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) acc[g][u] = V::fma(x[r], q[g][r % V::QN], acc[g][u]);
      } else {
#pragma GCC unroll 1
        for (int g = 0; g < ng; ++g) acc[g][u] = V::fma(x[r], q[g][r % V::QN], acc[g][u]);
      }
    }
  };

  alignas(64) char dummy[64] = {};
  PfCursor pf;
  pf.start(&it, dummy, dist);
  const char* pp = pf.p;
  int64_t pstep = pf.step;
  const int64_t nseg = 2 * (it.b1 - it.b0);
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t j = it.b0 + s / 2;
    const char* p = it.segment(j, static_cast<int>(s & 1));
    const char* e = p + it.segment_bytes(j);
    while (e - p >= 64) {
      int64_t n = (e - p) >> 6;
      const int64_t pl = pf.lines_left();
      if (pl < n) n = pl;
      int64_t i = 0;
      for (; i + V::LU <= n; i += V::LU) {  // LU lines: per line, prefetch one line ahead and consume one
#pragma GCC unroll 4
        for (int l = 0; l < V::LU; ++l) {
          ARITH_PREFETCH_T1(pp);
          pp += pstep;
#pragma GCC unroll 4
          for (int k = 0; k < kGroupsPerLine; ++k)
            consume(p + l * 64 + k * kGroupBytes, (l * kGroupsPerLine + k) * V::NR);
        }
        p += 64 * V::LU;
      }
      for (; i < n; ++i) {
        ARITH_PREFETCH_T1(pp);
        pp += pstep;
#pragma GCC unroll 4
        for (int k = 0; k < kGroupsPerLine; ++k) consume(p + k * kGroupBytes, k * V::NR);
        p += 64;
      }
      if (pstep && pp >= pf.end) {
        pf.next_segment();
        pp = pf.p;
        pstep = pf.step;
      } else {
        pf.p = pp;
      }
    }
    if (p < e) {  // a half line (16-bit elements, odd number of 16-element groups): one group
      ARITH_PREFETCH_T1(pp);
      pp += pstep;
      if (pstep && pp >= pf.end) {
        pf.next_segment();
        pp = pf.p;
        pstep = pf.step;
      } else {
        pf.p = pp;
      }
      consume(p, 0);
    }
  }
  alignas(64) float lanes[16];
  double total = 0.0;
#pragma GCC unroll 16
  for (int g = 0; g < (G > 0 ? G : ng); ++g)
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      V::store(lanes, acc[g][u]);
      for (int l = 0; l < V::W; ++l) total += lanes[l];
    }
  return total;
}

template <int DT>
double run_dt(const StreamItem& it, int gr, int64_t dist) {
  switch (gr) {
    case 1:
      return stream_item<DT, 1>(it, gr, dist);
    case 2:
      return stream_item<DT, 2>(it, gr, dist);
    case 4:
      return stream_item<DT, 4>(it, gr, dist);
    case 8:
      return stream_item<DT, 8>(it, gr, dist);
    default:
      return stream_item<DT, 0>(it, gr, dist);
  }
}

double run_item(const StreamItem& it, DType dt, int gr, int64_t dist) {
  switch (dt) {
    case DType::F32:
      return run_dt<0>(it, gr, dist);
    case DType::F16:
      return run_dt<1>(it, gr, dist);
    default:
      return run_dt<2>(it, gr, dist);
  }
}
