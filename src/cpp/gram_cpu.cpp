// CPU Gram accumulation: argument checks, packing of X into fp64 panels, and the split of work over threads.
#include "attrprims/gram_cpu.h"

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "gram_cpu_kernels.h"
#include "parallel_cpu.h"

namespace attrprims {
namespace {

const GramCpuKernelTable& kernels() {
  return select_cpu_kernels(kGramCpuKernelsGeneric, AP_AVX2_TABLE(kGramCpuKernelsAvx2),
                            AP_AVX512_TABLE(kGramCpuKernelsAvx512));
}

constexpr int64_t kMaxDepth = 256;            // rows of X per pass: a column panel (16 KiB) stays in L1
constexpr int64_t kPackBudget = int64_t{1} << 22;  // doubles of packed X per pass (32 MiB)
constexpr int64_t kRowsPerUnit = 96;            // rows of G per work unit (16 micro-kernel tiles)

std::string got(int64_t v) { return ", got " + std::to_string(v); }

/// dst[0:n] = the n elements of dtype dt from base[idx], as doubles (the dtype is looked at once per run).
void load_doubles(const void* base, DType dt, int64_t idx, int64_t n, double* dst) {
  const uint16_t* halves = static_cast<const uint16_t*>(base) + idx;
  switch (dt) {
    case DType::f64: std::copy_n(static_cast<const double*>(base) + idx, n, dst); return;
    case DType::f32: std::copy_n(static_cast<const float*>(base) + idx, n, dst); return;
    case DType::f16:
      for (int64_t c = 0; c < n; ++c) dst[c] = f16_bits_to_float(halves[c]);
      return;
    default:
      for (int64_t c = 0; c < n; ++c) dst[c] = bf16_bits_to_float(halves[c]);
  }
}

/// Columns j0..j0+width of rows r0..r0+depth of X, as fp64 [depth, width] with zeros past column k.
void pack_panel(const GramUpdateArgs& a, int64_t r0, int64_t depth, int64_t j0, int64_t width, double* dst) {
  const int64_t nj = std::min(width, a.k - j0);
  for (int64_t r = 0; r < depth; ++r) {
    double* d = dst + r * width;
    load_doubles(a.x, a.x_dtype, (r0 + r) * a.x_row_stride + j0, nj, d);
    std::fill(d + nj, d + width, 0.0);
  }
}

struct Unit {
  int64_t q, i0, i1;  // column panel and rows [i0, i1) of G
};

/// Work units covering the lower triangle: for each run of `panels` column panels, its rows from the tile holding
/// the diagonal of the first down.
std::vector<Unit> lower_triangle_units(int64_t k, int64_t panels) {
  std::vector<Unit> units;
  for (int64_t q = 0; q * kGramPanel < k; q += panels)
    for (int64_t i0 = q * kGramPanel / kGramTileRows * kGramTileRows; i0 < k; i0 += kRowsPerUnit)
      units.push_back({q, i0, std::min(k, i0 + kRowsPerUnit)});
  return units;
}

}  // namespace

void check_gram_update_args(const GramUpdateArgs& a) {
  AP_CHECK(a.b >= 0, "b", "must be >= 0" + got(a.b));
  AP_CHECK(a.k >= 0, "k", "must be >= 0" + got(a.k));
  AP_CHECK(a.x_dtype == DType::f32 || a.x_dtype == DType::f16 || a.x_dtype == DType::bf16 || a.x_dtype == DType::f64,
           "x_dtype", "must be f32, f16, bf16 or f64");
  AP_CHECK(a.b <= 1 || a.x_row_stride >= a.k, "x_row_stride", "must be >= k" + got(a.x_row_stride));
  AP_CHECK(a.k <= 1 || a.g_row_stride >= a.k, "g_row_stride", "must be >= k" + got(a.g_row_stride));
  AP_CHECK(a.b == 0 || a.k == 0 || a.x != nullptr, "x", "null pointer");
  AP_CHECK(a.k == 0 || a.g != nullptr, "g", "null pointer");
  AP_CHECK(a.k == 0 || !a.g_f32 || a.comp != nullptr, "comp", "null pointer (required when g_f32)");
}

void gram_update_cpu(const GramUpdateArgs& a) {
  check_gram_update_args(a);
  if (a.b == 0 || a.k == 0) return;
  const GramCpuKernelTable& kt = kernels();
  const int64_t col_panels = (a.k + kGramPanel - 1) / kGramPanel;
  const int64_t row_panels = (a.k + kGramTileRows - 1) / kGramTileRows;
  const int64_t width = col_panels * kGramPanel + row_panels * kGramTileRows;  // doubles per packed row of X
  const int64_t max_depth = std::clamp(kPackBudget / width, int64_t{64}, kMaxDepth);
  const int64_t rows_cap = std::min(max_depth, a.b);
  std::vector<double> cols(static_cast<size_t>(col_panels * kGramPanel * rows_cap));
  std::vector<double> rows(static_cast<size_t>(row_panels * kGramTileRows * rows_cap));
  const std::vector<Unit> units = lower_triangle_units(a.k, kt.panels_per_unit);
  const int threads = std::max(1, a.num_threads);
  for (int64_t r0 = 0; r0 < a.b; r0 += max_depth) {
    const int64_t depth = std::min(max_depth, a.b - r0);
    parallel_for(threads, col_panels + row_panels, [&](int64_t u) {
      if (u < col_panels) {
        pack_panel(a, r0, depth, u * kGramPanel, kGramPanel, cols.data() + u * depth * kGramPanel);
      } else {
        const int64_t v = u - col_panels;
        pack_panel(a, r0, depth, v * kGramTileRows, kGramTileRows, rows.data() + v * depth * kGramTileRows);
      }
    });
    const GramPacked packed{cols.data(), rows.data(), depth};
    parallel_for(threads, static_cast<int64_t>(units.size()), [&](int64_t u) {
      kt.tiles(a, packed, units[u].q, units[u].i0, units[u].i1);
    });
  }
}

}  // namespace attrprims
