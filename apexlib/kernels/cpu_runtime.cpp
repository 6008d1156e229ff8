// Run-time ISA detection and the kernels' OpenMP thread configuration.
#include <omp.h>
#include <sched.h>

#include <atomic>
#include <mutex>

#include "cpu_common.h"

namespace apex {

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

Isa best_isa() {
  if (cpu_supports(Isa::Avx512)) return Isa::Avx512;
  if (cpu_supports(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
  }
  return "?";
}

namespace {
std::mutex g_mu;
int g_num_threads = 0;  // 0: not configured -> all CPUs this process may run on
std::vector<int> g_cpu_ids;
std::atomic<int> g_pin_generation{0};
thread_local int t_pinned_generation = 0;

int default_threads() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return omp_get_num_procs();
}
}  // namespace

void set_num_threads(int n, const std::vector<int>& cpu_ids) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_num_threads = n;
  g_cpu_ids = cpu_ids;
  g_pin_generation.fetch_add(1);
}

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_num_threads <= 0) g_num_threads = default_threads();
  return g_num_threads;
}

std::vector<int> get_cpu_ids() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_cpu_ids;
}

void pin_current_thread(int tid) {
  const int gen = g_pin_generation.load();
  if (gen == t_pinned_generation) return;
  std::vector<int> ids;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    ids = g_cpu_ids;
  }
  t_pinned_generation = gen;
  if (ids.empty()) return;  // unpinning is not attempted: the thread keeps its last mask
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(ids[static_cast<size_t>(tid) % ids.size()], &set);
  sched_setaffinity(0, sizeof(set), &set);
}

}  // namespace apex
