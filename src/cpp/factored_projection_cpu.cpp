// CPU factored projection: argument checks, packing of P_in and P_out, and the split of work over threads.
#include "attrprims/factored_projection_cpu.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "factored_projection_cpu_kernels.h"
#include "parallel_cpu.h"

namespace attrprims {
namespace {

const FactoredCpuKernelTable& kernels() {
  return select_cpu_kernels(kFactoredCpuKernelsGeneric, AP_AVX2_TABLE(kFactoredCpuKernelsAvx2));
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// p [rows, cols] (rows `stride` apart) copied into rows of `ld` floats, zero past column `cols`.
std::vector<float> pack(const float* p, int64_t rows, int64_t cols, int64_t stride, int64_t ld) {
  std::vector<float> dst(static_cast<size_t>(rows * ld), 0.0f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst.data() + r * ld, p + r * stride, sizeof(float) * cols);
  return dst;
}

std::string got(int64_t v) { return ", got " + std::to_string(v); }

}  // namespace

void check_factored_project_args(const FactoredProjectArgs& a) {
  AP_CHECK(a.n >= 0, "n", "must be >= 0" + got(a.n));
  AP_CHECK(a.t >= 0, "t", "must be >= 0" + got(a.t));
  AP_CHECK(a.d_in >= 0, "d_in", "must be >= 0" + got(a.d_in));
  AP_CHECK(a.d_out >= 0, "d_out", "must be >= 0" + got(a.d_out));
  AP_CHECK(a.k_in >= 1, "k_in", "must be >= 1" + got(a.k_in));
  AP_CHECK(a.k_out >= 1 && a.k_out <= (int64_t{1} << 62) / a.k_in, "k_out",
           "must be >= 1 with k_out * k_in < 2^62" + got(a.k_out));
  AP_CHECK(a.a_dtype == DType::f32 || a.a_dtype == DType::f16 || a.a_dtype == DType::bf16, "a_dtype",
           "must be f32, f16 or bf16");
  // Input strides may be 0 (a broadcast view) and may overlap: inputs are only read.
  AP_CHECK(a.a_stride_n >= 0, "a_stride_n", "must be >= 0" + got(a.a_stride_n));
  AP_CHECK(a.a_stride_t >= 0, "a_stride_t", "must be >= 0" + got(a.a_stride_t));
  AP_CHECK(a.delta_stride_n >= 0, "delta_stride_n", "must be >= 0" + got(a.delta_stride_n));
  AP_CHECK(a.delta_stride_t >= 0, "delta_stride_t", "must be >= 0" + got(a.delta_stride_t));
  AP_CHECK(a.d_in <= 1 || a.p_in_row_stride >= a.k_in, "p_in_row_stride", "must be >= k_in" + got(a.p_in_row_stride));
  AP_CHECK(a.d_out <= 1 || a.p_out_row_stride >= a.k_out, "p_out_row_stride",
           "must be >= k_out" + got(a.p_out_row_stride));
  AP_CHECK(a.n <= 1 || a.out_row_stride >= a.k_out * a.k_in, "out_row_stride",
           "must be >= k_out * k_in" + got(a.out_row_stride));
  const bool reads = a.n > 0 && a.t > 0;
  AP_CHECK(!reads || a.d_in == 0 || a.a != nullptr, "a", "null pointer");
  AP_CHECK(!reads || a.d_out == 0 || a.delta != nullptr, "delta", "null pointer");
  AP_CHECK(!reads || a.d_in == 0 || a.p_in != nullptr, "p_in", "null pointer");
  AP_CHECK(!reads || a.d_out == 0 || a.p_out != nullptr, "p_out", "null pointer");
  AP_CHECK(a.n == 0 || a.out != nullptr, "out", "null pointer");
}

void factored_project_cpu(const FactoredProjectArgs& a) {
  check_factored_project_args(a);
  if (a.n == 0 || (a.t == 0 && a.accumulate)) return;
  const FactoredCpuKernelTable& kt = kernels();
  const int64_t ld_in = round_up(a.k_in, kFactoredPackCols), ld_out = round_up(a.k_out, kFactoredPackCols);
  const std::vector<float> p_in = pack(a.p_in, a.t > 0 ? a.d_in : 0, a.k_in, a.p_in_row_stride, ld_in);
  const std::vector<float> p_out = pack(a.p_out, a.t > 0 ? a.d_out : 0, a.k_out, a.p_out_row_stride, ld_out);
  const FactoredPacked packed{p_in.data(), ld_in, p_out.data(), ld_out};
  const int threads = std::max(1, a.num_threads);
  // Fewer examples than threads: also split out_i's rows into groups of whole 16-row panels. Every output is
  // made by the same operations under any split (U_a is recomputed per group), so bits do not depend on it.
  const int64_t panels = ld_out / kFactoredPackCols;
  const int64_t groups = a.n >= threads ? 1 : std::min(panels, (threads + a.n - 1) / a.n);
  parallel_for(threads, a.n * groups, [&](int64_t u) {
    const int64_t i = u / groups, g = u % groups;
    const int64_t o0 = panels * g / groups * kFactoredPackCols;
    const int64_t o1 = std::min(a.k_out, panels * (g + 1) / groups * kFactoredPackCols);
    kt.example(a, packed, i, o0, o1);
  });
}

}  // namespace attrprims
