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
// after each V column tile cost the same per step whatever its size; with 16-token GQA-4 blocks
// (32 KiB of K) that was a visible share of the work (GQA-4 fp16/bf16 +3-6 % GB/s at batch 8-32,
// context 1k-4k on 2 SPR cores; 128-token / 256 KiB steps were no better, grouping MHA's 128 KiB
// blocks was 10 % slower, hence the byte cap).
// Software prefetch (pf > 0) runs one pass ahead: V of block i during its K pass, K of the next
// step's table entries (scattered in memory) during the V pass, so DRAM requests stay in flight.
// The prefetches are spread evenly over the compute of the pass (one head's slice of V per K head
// step; the next K blocks in equal slices per V token step, PfSegments) rather than issued in bursts:
// a burst of 64-128 prefetches fills the core's line-fill buffers and stalls the loads of the
// compute it was meant to overlap with. Measured on 2 SPR cores (batch 8-32, context 1k-4k):
// MHA fp16/bf16 0.66-0.69 -> 0.79-0.83 of DRAM read bandwidth, GQA-4 0.47-0.53 -> 0.53-0.60.
//
// Tried for GQA-4 and not kept (no measurable change at DRAM or in L2, 2 SPR cores):
// * score tiles of 4 tokens x 4 query heads (query chunk loaded once per 4 K rows, 16 accumulators
//   reduced by one reduce_w): K-pass loads drop but the pass is FMA/convert-port bound;
// * bf16 K converted as even/odd halves of 32-bit words (1 uop per 16 elements instead of 2, the
//   query stored permuted to match): no gain;
// * prefetch distance of 2-8 blocks instead of one pass: no gain (GQA-4 at 32-128 KiB ahead
//   0.57 either way).
// Tried for bf16 KV and not kept (2 SPR cores, GQA-4 bf16, batch 8/32, context 1k/4k):
// * AVX512_BF16 vdpbf16ps for both passes (Q.K over head_dim pairs straight from the cache, query
//   rounded to bf16; P.V over two tokens' V rows interleaved with vpunpck[lh]wd times the bf16 pair
//   (p_t, p_t+1)): vdpbf16ps zmm issues once per 2 cycles here (latency 8; fp32 FMA: 2 per cycle),
//   half the multiply rate of the FMAs it replaces, so dropping the widening did not pay: in cache
//   GQA-4 28.7 -> 26.4 GB/s (2 threads; MHA 35.4 -> 40.2).
// * AMX-BF16 tiles (commit 83336e7, reverted; K tiles loaded straight from the cache, scores stored
//   into sc, V re-laid into token-pair VNNI rows, probabilities rounded to bf16): 1.5x faster than
//   this body with K/V in L2 (GQA-4, 1 thread, 16.3 -> 25.0 GB/s), but slower from DRAM: 0.47-0.52
//   of DRAM read against 0.57-0.64; K on tiles + this body's V pass 0.50-0.57; with the prefetches
//   issued in bursts (not in that commit) 0.55-0.60. A tile load of data that is not in cache yet,
//   or that vector stores just wrote, stalls the core (no out-of-order run-ahead to the next misses
//   and prefetches), so the tile path overlaps the DRAM stream worse than the FMA code it replaces.
// Ceilings of this pipeline on the same rows (measured with the AMX variant): prefetches + softmax
// alone 0.85-0.89 of DRAM read; plus this body's V pass (no K pass) 0.66-0.70. The passes add to the
// memory time almost serially (per core: ~18 us of DRAM time per 64-token step, ~16 us of compute in
// cache, ~30 us measured), which is why a cheaper pass moves the ratio and MHA (a quarter of the
// compute per byte) reaches ~0.8. fp32 GQA-4 (half the compute per byte of fp16/bf16, no widening)
// reaches 0.74-0.78 on the same rows, so 0.8 for 16-bit GQA-4 needs the per-byte compute roughly
// halved or real overlap. Not tried, estimated: AVX512_FP16 vfmadd231ph (measured 2 per cycle, 32
// lanes) accumulating a few tokens in fp16 before an fp32 flush; the flush (2 vcvtph2ps + 2 adds per
// accumulator) eats the saving at 4-token chains, 8-token chains cut the V pass by ~35%, i.e. ~15 %
// of the compute, and the error grows to ~2^-8 * max|V|. Overlap, first try, not kept: the K pass of
// step s+1 run inside the V pass of step s (one K row of G heads every few V token steps through the
// PfCursor hook, so that the out-of-order window always holds independent work) was slower: GQA-4
// fp16/bf16 0.50-0.54 of DRAM against 0.58-0.66 in the same session, and slower in cache (the
// inlined K row work spills the V tile's accumulators); a register-budgeted version is untried.
// Where the time goes (fp16, batch 32, context 4096): skipping the V pass's FMAs entirely (prefetch
// kept) only lifts GQA-4 from 0.56 to 0.63, skipping the K pass's to 0.70; MHA (a quarter of the
// FMAs per byte) gets 0.78-0.84. In cache, 2 threads process ~24 GB/s of GQA-4 (K/V in LLC), so
// compute and DRAM hardly overlap; 0.8 needs both passes far cheaper (fp32 query: 4 FMAs per K and
// per V element is the floor; bf16 query: vdpbf16ps / AMX for the K pass only).

// 2026-11-25, with the KV pool and the DRAM probe on 2 MiB pages and the probe's faster (widening)
// loop as the reference (~35 GB/s on 2 cores; the old wide-load loop on 4 KiB pages read ~29-31, so
// the ratios quoted above are ~11-17 % flattering): the benchmark's minimum-arithmetic stream
// (arith_stream.cpp: same bytes, same order, widening + G FMAs per element, T1 prefetch per line)
// reaches 0.84-0.89 of DRAM on Llama-2-7B's 128 KiB blocks and 0.62-0.65 on Llama-3.1-8B's 32 KiB
// blocks. For GQA-4 at 16-token blocks the scattered 32 KiB blocks are the limit (the same stream
// with one FMA per element: ~0.72; with 64-token blocks: 0.72-0.80), so no kernel doing this
// arithmetic in fp32 reaches 0.8 of DRAM there on this machine; this body runs at 0.81-0.86 of the
// stream (0.69-0.75 of DRAM for MHA, 0.51-0.56 for GQA-4). With 64-token blocks the stream reaches
// 0.94-1.0 (MHA) / 0.72-0.80 (GQA-4) and this body 0.72-0.78 / 0.55-0.64: there its compute limits. Tried, not kept: a K pass producing 16 query heads' scores at once (one register
// accumulator each, one reduce_w, V prefetch spread over its d loop): K pass alone +9 % (GQA-4) /
// +23 % (MHA) in L2, no change from DRAM; prefetching a token row's V in one burst was 5-10 % slower;
// for MHA a token-major V pass (V read in memory order, acc read-modify-written in L1): no change
// from DRAM (25.2-25.5 vs 22.9-25.6 GB/s), slower in L2; 64 KiB steps for MHA: 3 % slower.

// 2026-11-29, AVX2 path on a 2-core AMD EPYC (Zen 3, AVX2 + FMA + F16C, no AVX-512; DRAM read ~27 GB/s
// when quiet), measured while other jobs shared the cores (the DRAM probe read 8-21 GB/s during the
// runs, so every figure here is depressed and noisy): kernel / minimum-arithmetic stream on the 16
// fp16/bf16 target rows 0.56-1.00 (MHA 0.75-1.00, GQA-4 0.56-0.80; data/results/cpu_attention/
// 2026-11-29-epyc-avx2-2c-bs16-before.json). One thread, K/V in cache (batch 2, context 256): GQA-4
// bf16 6.1 vs 18.3 GB/s (0.33), MHA bf16 19.3 vs 39.8 (0.48): on Zen 3 the gap is this body's compute,
// not DRAM, and it is 2-3x larger than on SPR (0.81-0.86 of the stream there). Zen 3's L1D is 32 KiB,
// 8-way, 64 sets: the V pass's column tiles walk a step's token rows 2 KiB (GQA-4) / 8 KiB (MHA)
// apart, i.e. one or two L1 sets, so a line is evicted before the next column tile reads its other
// half. Tried, not kept: copying the step's V rows of one kv head into a contiguous per-thread
// buffer (memcpy per row, 16 KiB per head and step) before the V pass. Same run, alternating with
// the kept body, twice each: in cache GQA-4 bf16 6.1/8.9 vs 6.1/5.0 GB/s, MHA bf16 9.7/15.3 vs 19.3/9.9
// (noise as large as the effect); from DRAM lower in all 6 pairs (GQA-4 fp16 batch 32 ctx 1k 2.80/2.85
// vs 3.93/3.86, GQA-4 bf16 batch 8 ctx 4k 2.80/3.05 vs 3.36/3.35, MHA fp16 batch 8 ctx 1k 3.73/3.73 vs
// 4.20/4.05; busy cores; the benchmark run with this variant and the vLLM peer:
// 2026-11-29-epyc-avx2-2c-bs16-vpack-variant.json, kernel / stream 0.55-0.89 outside one outlier row,
// vLLM 0.32's CPU op (vec16) 1.4-3.0 GB/s, ours 1.2-3.0x it). Next from there: a V pass whose column tile covers whole 64-byte lines
// (bf16/fp16: DV = 4, GT = 2 on 16 ymm registers; tried below, slower).

// Earlier notes that lived in apexlib/attention/cpu.py (2 SPR cores in a VM): the KV pool on 2 MiB pages
// (apexlib.runner.host_memory, as the engine's CPU tier) made the kernel +8-10 % (page walks of scattered
// blocks sat in front of the prefetches); one SPR core reads only ~18.6 of the ~35 GB/s of two (a core is
// bound by its line-fill buffers), so every core must keep its misses in flight while it computes;
// fp32 MHA reached 0.78-0.82 of DRAM; prefetch hints T0/T2, one prefetch per 128 B-4 KiB and no software
// prefetch were all slower than T1 on every line.

// 2026-11-29 (later), AVX2 GQA-4 path on the same 2-core AMD EPYC (Zen 3, ~2.5 GHz, L1D 32 KiB, L2 512 KiB per
// core), other sessions busy on the cores throughout (load 2-4 on 2 cores), so only same-run ratios count.
// Benchmark, target rows (fp16/bf16, batch 8/32, context 1k/4k, block 16, 2 threads, this body unchanged):
// kernel / stream MHA 0.76-0.92, GQA-4 0.62-0.74 (fp16; 0.80 on a row whose DRAM probe read 16 GB/s) and
// 0.58-0.64 (bf16); stream / DRAM 0.62-0.97; vLLM 0.32's CPU op 1.9-3.0x slower on 15 of 16 rows
// (data/results/cpu_attention/2026-11-29-epyc-avx2-2c-bs16-b8-32.json).
// In cache the gap is the same (1 thread, K/V in L2, GQA-4 bf16 batch 1 context 256, best of 3000 calls):
// kernel 10.5-11.7 GB/s against the stream's 19-21 (0.52-0.58); the stream runs at the FMA peak here
// (4 FMAs per 8 elements, 2 FMAs per cycle, ~2.5 GHz -> ~20 GB/s per core). Split of the kernel's time, in
// units of the stream's time for the same bytes (variants with one part left out, same run): K pass ~0.55
// (ideal 0.5), V pass ~0.72 (ideal 0.5), softmax ~0.08, software prefetch ~0.1, the rest (score
// reductions, loop bookkeeping) ~0.3. No one part holds the missing 0.8. The V loop per token and column
// tile (GT = 4 heads x DV = 2 vectors) is ~27 instructions for 8 FMAs (4 broadcasts, 2 widening loads, 2
// shifts for bf16, the prefetch tick, addressing), so the loop is probably issue-bound rather than
// FMA-bound (this VM exposes no performance counters to confirm it).
// Tried, not kept (in cache unless said; ratio = kernel / stream, best of 3000 calls, alternating runs):
// * V column tiles covering whole 64-byte lines (GT = 2, DV = 4: each V element widened twice for
//   GQA-4): 0.50-0.53 against 0.55-0.56;
// * probabilities pre-broadcast per kv head and step into an 8-lane buffer (FMA operands loaded instead of
//   vbroadcastss): 0.37-0.49 against 0.55-0.58 (broadcasts are loads either way);
// * V pass in chunks of 8 or 16 tokens x all column tiles (each line used by both half-line tiles while in
//   L1; the 2 KiB row stride maps a step's rows to two L1 sets): 0.46-0.51 against 0.52-0.56;
// * K pass over two token rows at once (query chunk loaded once for both; 8 accumulators): K pass alone
//   0.91-0.93 against 0.90-0.91, full kernel unchanged;
// * V pass 4 tokens per prefetch tick (GQA tiles only): GQA-4 bf16 +0-3 %, fp16 mixed, from DRAM within the
//   noise; with MHA tiles unrolled too MHA fp16 was 15-20 % slower;
// * prefetch hint T0 or NTA instead of T1 from DRAM (1 thread, batch 4, context 1k, 4 KV sets): no
//   difference outside the noise (on Zen the hint level hardly matters).
// * bf16 widened as even/odd halves of 32-bit words in both passes (one 32-byte load + shift + and per 16
//   elements instead of two widening loads and two shifts; the query permuted per 16-element chunk in the
//   driver, each item's output columns unpermuted once at its end; results identical): GQA-4 bf16 in cache
//   +2-4 % (best 11.3 -> 11.6-11.8 GB/s), MHA bf16 +1-8 %, from DRAM (1 thread, batch 4, context 1k)
//   0.55-0.67 against 0.58-0.69: nothing outside the noise, so not worth the permuted layouts.
// Few long sequences (the split above, 2 threads): batch 1-2 at 8k-32k reach kernel / stream 0.82-0.95 for
// MHA but 0.37-0.61 for GQA-4, and in one run with both, GQA-4 batch 1 at 8k 0.44-0.55 against batch 8
// at 1k 0.53-0.74 although both cut into the same eight 1024-token items
// (2026-11-29-epyc-avx2-2c-bs16-b1-2-long.json, -gqa-b1-vs-b8.json); with 2 threads on 2 shared cores the
// median call is 2-5x slower than the best one (a descheduled team member stalls the other), so that gap is
// not resolved here. Next: the issue-bound V loop (fewer instructions per FMA than ~3) and the score
// reduction per K row, measured on quiet cores.

// 2026-11-29 (evening), same 2-core EPYC; another session's serve benchmarks shared the cores for most of
// it (load 1.2-3.2 on 2 cores), so again only same-run ratios count. Tried, not kept: an AVX2 path
// specialised at compile time for head_dim 128, G = 1 / 4 and 16-bit K/V (commit 712f9a4, reverted),
// picked at run time when the shape matched: constant trip counts; the 8 scores of 8 / G KV heads reduced
// by one reduce_w straight into the score row (no pending queue); V tiles of 4 heads x 16 columns / 1 head
// x 64 columns, two tokens per iteration with pointer bumps; the next step's K prefetched as one
// contiguous chunk per V tile pass, a fixed number of lines per token pair (the V inner loop compiled to
// 16 FMAs, 8 broadcasts, 4 widening loads and ~12 other instructions per token pair, no spills).
// Alternating processes against this body, two rounds each: in cache (1 thread, best of 1500 calls)
// GQA-4 fp16 8.1/6.0 vs 7.7/8.0 GB/s, bf16 8.5/8.5 vs 7.7/7.9, MHA fp16 8.5/12.2 vs 10.9/11.2, bf16
// 11.8/11.8 vs 10.6/11.2; from DRAM (2 threads, median of 9; GQA-4 batch 8 ctx 4k, batch 32 ctx 1k,
// batch 1 ctx 8k; MHA batch 8 ctx 1k; DRAM read 15.6-19.5 GB/s) GQA-4 7.7-10.7 vs 7.2-11.1 GB/s, MHA
// 12.1-14.0 vs 11.3-15.9. No difference outside the noise: the loop bookkeeping is not what holds this
// body back. Its benchmark run (2026-11-29-epyc-avx2-2c-bs16-d128-variant-{targets,long}.json): kernel /
// stream GQA-4 0.52-0.66, MHA 0.71-0.91, vLLM 0.32's op 1.7-3.4x slower. Also tried there, slower: the K
// pass over two token rows at once (each query vector loaded once for both rows; 2 rows x 4 heads of
// accumulators, one reduce_w split over the two score rows): in cache GQA-4 fp16 8.4/5.8 vs 8.8/8.1 GB/s,
// bf16 5.7/5.7 vs 8.5/8.4.
// Where this body stands (2026-11-29-epyc-avx2-2c-bs16-final-{targets,long}.json, 2 threads, vLLM in the
// same run): target rows kernel / stream MHA 0.80-0.95 (2 of 8 rows >= 0.9), GQA-4 0.57-0.80 (none);
// ratio_to_vllm 1.60-3.58 on all 16 rows; batch 1 at 8k: MHA 0.87-0.89, GQA-4 0.61-0.65. On quieter cores
// batch 1 GQA-4 is no longer behind batch 8: same run, GQA-4 b1 8k 0.61-0.65 against b8 1k-4k 0.57-0.80,
// both cut into 1024-4096-token items, so the old gap was shared-core noise; what remains is GQA-4's.
// What bounds GQA-4 (same binary, K/V in the 32 MiB LLC, batch 8 x 256 tokens, one KV set): the kernel
// processes 8.2-10.1 GB/s on 1 thread and 14.5-15.9 on 2 (fp16), the stream 17-21 and 36-38: the body
// spends 2-2.5x the stream's core time per byte (kernel / stream in LLC 0.40-0.50 for GQA-4, 0.39-0.56
// for MHA; the fixed cost of a call, 57-75 us against the stream's 18-24 with batch 8 x 1 token, is
// 10-15 % of these 0.5-1.5 ms calls and does not explain the gap). From DRAM (19-21 GB/s) the stream is memory-bound (15-17 GB/s) while this body reaches only
// 10-11 for GQA-4, i.e. its compute (~0.063 s/GB) and the memory time (~0.05 s/GB) mostly add up instead
// of overlapping. MHA has a quarter of GQA-4's FMAs per byte, so the same inefficiency hides under DRAM
// (0.86-0.97 in the same probe). 0.9 of the stream for 16-bit GQA-4 on 2 Zen 3 cores therefore needs the
// body's in-cache compute per byte roughly halved (towards the stream's 4 FMAs + 1 widening per 8
// elements, with nothing else per element) or real overlap of the passes with DRAM; tiling, bookkeeping,
// broadcast count and prefetch placement have each been tried above without moving it.

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
