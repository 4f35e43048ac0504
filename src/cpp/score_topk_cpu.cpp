// CPU scoring with a fused top-k: argument checks, packing of the test rows, the split into (test rows x
// training segment) units with heaps per segment, and the final per-row merge with the running lists.
#include "attrprims/score_topk_cpu.h"

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "parallel_cpu.h"
#include "score_topk_cpu_kernels.h"

namespace attrprims {
namespace {

const ScoreCpuKernelTable& kernels() {
  return select_cpu_kernels(kScoreCpuKernelsGeneric, AP_AVX2_TABLE(kScoreCpuKernelsAvx2));
}

constexpr int64_t kPanelsPerUnit = 16;   // test panels per unit (256 rows: 256·k floats, in L2)
constexpr int64_t kMinSegment = 192;     // training rows per segment, at least
constexpr int64_t kUnitsPerThread = 4;   // enough units to balance the threads

std::string got(int64_t v) { return ", got " + std::to_string(v); }

}  // namespace

void check_score_topk_args(const ScoreTopkArgs& a) {
  AP_CHECK(a.m >= 0, "m", "must be >= 0" + got(a.m));
  AP_CHECK(a.n >= 0, "n", "must be >= 0" + got(a.n));
  AP_CHECK(a.k >= 0, "k", "must be >= 0" + got(a.k));
  AP_CHECK(a.top >= 0, "top", "must be >= 0" + got(a.top));
  AP_CHECK(a.bottom >= 0, "bottom", "must be >= 0" + got(a.bottom));
  AP_CHECK(a.index_offset >= 0, "index_offset", "must be >= 0" + got(a.index_offset));
  AP_CHECK(a.b_dtype == DType::f32 || a.b_dtype == DType::f16 || a.b_dtype == DType::bf16, "b_dtype",
           "must be f32, f16 or bf16");
  AP_CHECK(a.m <= 1 || a.a_row_stride >= a.k, "a_row_stride", "must be >= k" + got(a.a_row_stride));
  AP_CHECK(a.n <= 1 || a.b_row_stride >= a.k, "b_row_stride", "must be >= k" + got(a.b_row_stride));
  AP_CHECK(a.m <= 1 || a.top_row_stride >= a.top, "top_row_stride", "must be >= top" + got(a.top_row_stride));
  AP_CHECK(a.m <= 1 || a.bottom_row_stride >= a.bottom, "bottom_row_stride",
           "must be >= bottom" + got(a.bottom_row_stride));
  const bool reads = a.m > 0 && a.n > 0 && a.k > 0;
  AP_CHECK(!reads || a.a != nullptr, "a", "null pointer");
  AP_CHECK(!reads || a.b != nullptr, "b", "null pointer");
  AP_CHECK(a.m == 0 || a.top == 0 || (a.top_values != nullptr && a.top_indices != nullptr), "top_values",
           "null pointer");
  AP_CHECK(a.m == 0 || a.bottom == 0 || (a.bottom_values != nullptr && a.bottom_indices != nullptr),
           "bottom_values", "null pointer");
}

void score_topk_cpu(const ScoreTopkArgs& a) {
  check_score_topk_args(a);
  const int64_t slots = a.top + a.bottom;
  if (a.m == 0 || a.n == 0 || slots == 0) return;
  const ScoreCpuKernelTable& kt = kernels();
  const int threads = std::max(1, a.num_threads);
  // Test rows packed once: panel p = [k, 16] of rows 16p..16p+15 (zeros past m).
  const int64_t panels = (a.m + kScorePanel - 1) / kScorePanel;
  std::vector<float> test(static_cast<size_t>(panels * a.k * kScorePanel), 0.0f);
  parallel_for(threads, panels, [&](int64_t p) {
    for (int64_t c = 0; c < std::min(kScorePanel, a.m - p * kScorePanel); ++c) {
      const float* row = a.a + (p * kScorePanel + c) * a.a_row_stride;
      for (int64_t r = 0; r < a.k; ++r) test[static_cast<size_t>((p * a.k + r) * kScorePanel + c)] = row[r];
    }
  });
  const int64_t row_groups = (panels + kPanelsPerUnit - 1) / kPanelsPerUnit;
  const int64_t wanted = (threads * kUnitsPerThread + row_groups - 1) / row_groups;
  const int64_t segments = std::max<int64_t>(1, std::min(wanted, a.n / kMinSegment));
  // Heaps per (segment, test row): `top` slots then `bottom` slots, all empty (-1) to begin with.
  const size_t cells = static_cast<size_t>(segments * a.m * slots);
  std::vector<float> values(cells, 0.0f);
  std::vector<int64_t> indices(cells, -1);
  parallel_for(threads, segments * row_groups, [&](int64_t u) {
    const int64_t s = u / row_groups, g = u % row_groups;
    const int64_t p0 = g * kPanelsPerUnit, p1 = std::min(panels, p0 + kPanelsPerUnit);
    const int64_t j0 = a.n * s / segments, j1 = a.n * (s + 1) / segments;
    const size_t at = static_cast<size_t>(s * a.m * slots);
    kt.segment(a, test.data(), p0, p1, j0, j1, ScoreHeaps{values.data() + at, indices.data() + at, slots});
  });
  // Merge per row: the running list and every segment's heap go through one heap, which is then sorted.
  parallel_for(threads, a.m, [&](int64_t i) {
    std::vector<float> hv(static_cast<size_t>(slots));
    std::vector<int64_t> hi(static_cast<size_t>(slots));
    const struct {
      int64_t size, offset;
      float* values;
      int64_t* indices;
      bool largest;
    } lists[2] = {{a.top, 0, a.top_values + i * a.top_row_stride, a.top_indices + i * a.top_row_stride, true},
                  {a.bottom, a.top, a.bottom_values + i * a.bottom_row_stride,
                   a.bottom_indices + i * a.bottom_row_stride, false}};
    for (const auto& l : lists) {
      if (l.size == 0) continue;
      float* v = hv.data();
      int64_t* x = hi.data();
      std::fill(x, x + l.size, int64_t{-1});
      for (int64_t t = 0; t < l.size; ++t) heap_offer(v, x, l.size, l.values[t], l.indices[t], l.largest);
      for (int64_t s = 0; s < segments; ++s) {
        const size_t at = static_cast<size_t>((s * a.m + i) * slots + l.offset);
        for (int64_t t = 0; t < l.size; ++t) heap_offer(v, x, l.size, values[at + t], indices[at + t], l.largest);
      }
      heap_sort_best_first(v, x, l.size, l.largest);
      std::copy(v, v + l.size, l.values);
      std::copy(x, x + l.size, l.indices);
    }
  });
}

}  // namespace attrprims
