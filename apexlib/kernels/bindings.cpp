// Python bindings of apexlib's CPU kernels (the only translation unit that includes torch).
//
// Every entry point runs with the GIL released (py::call_guard<py::gil_scoped_release>), so a
// worker thread can run attention while the main Python thread keeps going. The Python wrappers
// in apexlib/attention/cpu.py check shapes and dtypes; the checks here are the cheap ones that
// keep the kernels memory-safe; block ids and context lengths are checked in C++ (ValueError).
//
// Only the torch headers this file uses (the tensor class, at::empty, torch's pybind11 type casters),
// not <torch/extension.h>: that one pulls in the whole C++ frontend (torch/all.h: nn, optim, data,
// autograd API) and made this file ~60 s of a cold build on 2 cores; these take ~25 s.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "cpu_common.h"

namespace {

apex::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return apex::DType::F32;
    case at::kHalf:
      return apex::DType::F16;
    case at::kBFloat16:
      return apex::DType::BF16;
    default:
      throw py::value_error(std::string(name) + " must be float32, float16 or bfloat16, got " +
                            std::string(c10::toString(t.scalar_type())));
  }
}

apex::Isa to_isa(int64_t isa) {
  if (isa < 0 || isa > 2) throw py::value_error("isa must be 0 (scalar), 1 (avx2) or 2 (avx512)");
  const auto i = static_cast<apex::Isa>(isa);
  if (!apex::cpu_supports(i)) throw std::runtime_error(std::string("this CPU does not support ISA ") + apex::isa_name(i));
  return i;
}

// The checks both paged entry points share (the cheap ones that keep the kernels memory-safe) and
// the cache / table fields of the arguments; the caller sets query, out, num_heads and scale.
apex::PagedAttentionArgs paged_args(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                    const at::Tensor& block_tables, const at::Tensor& context_lens) {
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() && key_cache.scalar_type() == value_cache.scalar_type(),
              "key_cache and value_cache must match");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous int32 [num_seqs, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 && context_lens.is_contiguous(),
              "context_lens must be contiguous int32 [num_seqs]");
  apex::PagedAttentionArgs a{};
  a.num_seqs = context_lens.size(0);
  a.num_blocks = key_cache.size(0);
  a.block_size = key_cache.size(1);
  a.num_kv_heads = key_cache.size(2);
  a.head_dim = key_cache.size(3);
  a.max_blocks_per_seq = block_tables.size(1);
  TORCH_CHECK(a.head_dim % 16 == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(block_tables.size(0) == a.num_seqs, "num_seqs mismatch");
  TORCH_CHECK(a.block_size > 0, "block_size must be positive");
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.kv_dtype = to_dtype(key_cache, "key_cache");
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.context_lens = context_lens.data_ptr<int32_t>();
  return a;
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  c10::optional<at::Tensor> out, int64_t isa, int64_t num_threads) {
  TORCH_CHECK(query.dim() == 3, "bad ranks");
  const auto isa_e = to_isa(isa);
  apex::PagedAttentionArgs a = paged_args(key_cache, value_cache, block_tables, context_lens);
  a.num_heads = query.size(1);
  TORCH_CHECK(query.size(0) == a.num_seqs, "num_seqs mismatch");
  TORCH_CHECK(query.size(2) == a.head_dim, "head_dim mismatch");
  TORCH_CHECK(a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");

  const at::Tensor q32 = query.to(at::kFloat).contiguous();
  at::Tensor result = out.has_value() ? *out : at::empty(query.sizes(), query.options());
  TORCH_CHECK(result.sizes() == query.sizes(), "out must have the query's shape");
  const bool direct = result.scalar_type() == at::kFloat && result.is_contiguous();
  at::Tensor out32 = direct ? result : at::empty(query.sizes(), query.options().dtype(at::kFloat));

  a.query = q32.data_ptr<float>();
  a.out = out32.data_ptr<float>();
  a.scale = static_cast<float>(scale);
  try {
    apex::validate_tables(a);
  } catch (const apex::InputError& e) {
    throw py::value_error(e.what());
  }
  const int threads = num_threads > 0 ? static_cast<int>(num_threads) : apex::get_num_threads();
  apex::paged_decode_attention(a, isa_e, threads);
  if (!direct) result.copy_(out32);
  return result;
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.is_contiguous() && value.is_contiguous(), "key/value must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "cache dtypes differ");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(), "slot_mapping must be int64");
  apex::StoreKVArgs a{};
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.src_dtype = to_dtype(key, "key");
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.cache_dtype = to_dtype(key_cache, "key_cache");
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.num_tokens = key.size(0);
  a.row_elems = key_cache.size(2) * key_cache.size(3);
  a.num_slots = key_cache.size(0) * key_cache.size(1);
  TORCH_CHECK(key.numel() == a.num_tokens * a.row_elems && value.numel() == key.numel(), "key/value row size mismatch");
  TORCH_CHECK(slot_mapping.numel() == a.num_tokens, "slot_mapping length mismatch");
  try {
    apex::store_kv(a, apex::get_num_threads());
  } catch (const apex::InputError& e) {
    throw py::value_error(e.what());
  }
}

double read_bandwidth_pass(const at::Tensor& buf, int64_t isa, int64_t num_threads, int64_t variant) {
  TORCH_CHECK(buf.is_contiguous(), "buffer must be contiguous");
  if (variant < 0 || variant > 1) throw py::value_error("variant must be 0 (wide loads) or 1 (widening loads)");
  const int threads = num_threads > 0 ? static_cast<int>(num_threads) : apex::get_num_threads();
  return apex::read_bandwidth_pass(buf.data_ptr(), buf.numel() * buf.element_size() / 512 * 512, to_isa(isa), threads,
                                   static_cast<int>(variant));
}

double arith_stream_pass(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, int64_t num_heads, int64_t isa, int64_t num_threads) {
  const auto isa_e = to_isa(isa);
  apex::PagedAttentionArgs a = paged_args(key_cache, value_cache, block_tables, context_lens);
  a.num_heads = num_heads;
  TORCH_CHECK(a.num_kv_heads > 0 && num_heads > 0 && num_heads % a.num_kv_heads == 0,
              "num_heads must be a positive multiple of num_kv_heads");
  const int threads = num_threads > 0 ? static_cast<int>(num_threads) : apex::get_num_threads();
  try {
    apex::validate_tables(a);
    return apex::arith_stream_pass(a, isa_e, threads);
  } catch (const apex::InputError& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "apexlib CPU kernels: paged decode attention, store_kv, DRAM read and arithmetic stream probes";
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention, release(), py::arg("query"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out"), py::arg("isa"), py::arg("num_threads"));
  m.def("store_kv", &store_kv, release(), py::arg("key"), py::arg("value"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"));
  m.def("read_bandwidth_pass", &read_bandwidth_pass, release(), py::arg("buf"), py::arg("isa"),
        py::arg("num_threads") = 0, py::arg("variant") = 0);
  m.def("arith_stream_pass", &arith_stream_pass, release(), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("num_heads"), py::arg("isa"),
        py::arg("num_threads") = 0);
  m.def("set_num_threads", &apex::set_num_threads, release(), py::arg("n"), py::arg("cpu_ids"));
  m.def("get_num_threads", &apex::get_num_threads);
  m.def("get_cpu_ids", &apex::get_cpu_ids);
  m.def("cpu_supports", [](int64_t isa) { return isa >= 0 && isa <= 2 && apex::cpu_supports(static_cast<apex::Isa>(isa)); });
  m.def("best_isa", [] { return static_cast<int64_t>(apex::best_isa()); });
}
