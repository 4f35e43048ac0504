// A minimal fork-join parallel loop over independent work units, on std::thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace attrprims {

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
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(drain);
  drain();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace attrprims
