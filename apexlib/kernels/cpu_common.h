// Shared declarations of apexlib's CPU kernels.
//
// The kernel translation units (paged_decode_attention.cpp, store_kv.cpp, read_bandwidth.cpp,
// arith_stream.cpp, cpu_runtime.cpp) are plain C++17 + OpenMP and do not include any torch header: they take raw
// pointers and sizes, so they compile in about a second each. Only bindings.cpp includes
// torch headers; it validates tensors and calls into the functions declared here.
//
// ISA-specific code is compiled inside `#pragma GCC target` regions (APEX_TARGET_BEGIN/END), never
// with -march flags, and is selected at run time from CPUID, so one build runs on AVX2-only
// machines and uses AVX-512 where present. Code inside such a region must not instantiate
// templates or inline functions that are shared with other translation units (std::max, std::vector
// members...): the linker could keep the AVX-512 copy of such a COMDAT function for every caller.
// Everything inside lives in an ISA-named namespace and uses the helpers below, which are `static`.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__clang__)
#define APEX_PRAGMA(x) _Pragma(#x)
#define APEX_TARGET_BEGIN(t) APEX_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define APEX_TARGET_END APEX_PRAGMA(clang attribute pop)
#else
#define APEX_PRAGMA(x) _Pragma(#x)
#define APEX_TARGET_BEGIN(t) APEX_PRAGMA(GCC push_options) APEX_PRAGMA(GCC target(t))
#define APEX_TARGET_END APEX_PRAGMA(GCC pop_options)
#endif

#define APEX_ISA_AVX2 "avx,avx2,fma,f16c"
#define APEX_ISA_AVX512 "avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"

namespace apex {

// Element types of tensors handed to the kernels (values match apexlib/attention/cpu.py).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
// Instruction-set paths (values match apexlib/attention/cpu.py).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// ---- scalar conversions (IEEE round-to-nearest-even; do not build with -ffast-math) ----
static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }
static inline uint16_t f32_to_bf16(float f) {
  uint32_t w = f32_bits(f);
  if ((w & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((w >> 16) | 0x0040u);  // quiet NaN
  w += 0x7fffu + ((w >> 16) & 1u);
  return static_cast<uint16_t>(w >> 16);
}
// fp16 <-> fp32 after Maratyszcza's FP16 library (exact, handles subnormals, inf, NaN).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(r);
}
static inline uint16_t f32_to_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Error in the caller's input: bindings.cpp turns it into a Python ValueError.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- runtime (cpu_runtime.cpp) ----
bool cpu_supports(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);
// Threads used by every kernel; cpu_ids (may be empty) pins OpenMP thread i to cpu_ids[i % size].
void set_num_threads(int n, const std::vector<int>& cpu_ids);
int get_num_threads();
std::vector<int> get_cpu_ids();
// Called by thread `tid` of a kernel's parallel region: pins it if pinning changed since its last call.
void pin_current_thread(int tid);

// ---- paged decode attention (paged_decode_attention.cpp) ----
struct PagedAttentionArgs {
  const float* query;       // [num_seqs, num_heads, head_dim] fp32, contiguous, not yet scaled
  const void* key_cache;    // [num_blocks, block_size, num_kv_heads, head_dim] of kv_dtype, contiguous
  const void* value_cache;  // same layout as key_cache
  DType kv_dtype;
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
  const int32_t* context_lens;  // [num_seqs]
  float* out;                   // [num_seqs, num_heads, head_dim] fp32, contiguous
  int64_t num_seqs, num_heads, num_kv_heads, head_dim;
  int64_t num_blocks, block_size, max_blocks_per_seq;
  float scale;
};
// Throws InputError for bad context lengths / block ids (naming the argument).
void validate_tables(const PagedAttentionArgs& a);
void paged_decode_attention(const PagedAttentionArgs& a, Isa isa, int num_threads);
// The work split of paged_decode_attention (and of the arithmetic stream probe): whole-block splits
// of every sequence, about four per thread and at least 64 tokens each, so that a lone long request
// is spread over all threads. `order` lists the splits longest first; first[s] .. first[s + 1] are
// the splits of sequence s (none for a zero-length context).
struct SplitPlan {
  struct Split {
    int64_t seq, b0, b1;
  };
  std::vector<Split> splits;
  std::vector<int64_t> order, first;
};
SplitPlan plan_splits(const PagedAttentionArgs& a, int num_threads);

// ---- append K/V (store_kv.cpp) ----
struct StoreKVArgs {
  const void* key;    // [num_tokens, num_kv_heads, head_dim] of src_dtype (row stride key_stride elements)
  const void* value;  // same
  DType src_dtype;
  void* key_cache;  // [num_blocks, block_size, num_kv_heads, head_dim] of cache_dtype, contiguous
  void* value_cache;
  DType cache_dtype;
  const int64_t* slot_mapping;  // [num_tokens]
  int64_t num_tokens, row_elems, num_slots;
};
void store_kv(const StoreKVArgs& a, int num_threads);

// ---- DRAM read bandwidth probe (read_bandwidth.cpp) ----
// Reads `bytes` bytes at p (a multiple of 512) with `num_threads` threads; returns a checksum.
// variant 0: widest loads summed; 1: fp16 halves widened to fp32 and summed (see read_bandwidth.cpp).
double read_bandwidth_pass(const void* p, int64_t bytes, Isa isa, int num_threads, int variant);

// ---- minimum-arithmetic stream probe (arith_stream.cpp) ----
// Reads every valid K and V element of the paged context once (the kernel's work split), widens it
// to fp32 and does num_heads / num_kv_heads FMAs with it; returns a checksum (see arith_stream.cpp).
// Uses key_cache, value_cache, kv_dtype, block_tables, context_lens and the sizes; query, out and
// scale are ignored. Call validate_tables first. Throws InputError for a group size above 256.
double arith_stream_pass(const PagedAttentionArgs& a, Isa isa, int num_threads);

}  // namespace apex
