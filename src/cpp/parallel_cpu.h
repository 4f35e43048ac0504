// A minimal fork-join parallel loop over independent work units: on the process's OpenMP team when one is loaded
// (torch's libgomp), else on std::thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace attrprims {

/// libgomp's entry point for `#pragma omp parallel` (also provided by LLVM's and Intel's OpenMP runtimes), looked up
/// in the process, or null. torch runs its CPU ops on an OpenMP team whose threads spin-wait for milliseconds after
/// each op; threads of our own started then would share the cores with those spinners (measured on 2 cores: a
/// 1 ms projection took 2.3 ms right after a small torch op). Running on that same team lets the spinning threads
/// take the work instead. The lookup is repeated until it succeeds, since this library may load before torch.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

inline GompParallel openmp_team() {
#if defined(__unix__) || defined(__APPLE__)
  static std::atomic<GompParallel> found{nullptr};
  GompParallel fn = found.load(std::memory_order_acquire);
  if (fn == nullptr) {
    fn = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    if (fn != nullptr) found.store(fn, std::memory_order_release);
  }
  return fn;
#else
  return nullptr;
#endif
}

/// Run fn(u) for u in [0, units) on up to num_threads threads (the caller's included). Units are
/// handed out dynamically; the first exception thrown by any unit is rethrown after all threads join.
template <typename Fn>
void parallel_for(int num_threads, int64_t units, Fn&& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, units));
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto drain = [&]() {
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) {
      try {
        fn(u);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(units);
      }
    }
  };
  if (workers == 1) {
    drain();
  } else if (GompParallel team = openmp_team()) {
    // No exception leaves drain, as an OpenMP region requires.
    team([](void* d) { (*static_cast<decltype(drain)*>(d))(); }, &drain, static_cast<unsigned>(workers), 0);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(workers - 1));
    for (int64_t t = 1; t < workers; ++t) pool.emplace_back(drain);
    drain();
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace attrprims
