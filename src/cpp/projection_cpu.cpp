// CPU projection: argument checks, choice of instruction set, and the split of work over threads.
#include "attrprims/projection_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "parallel_cpu.h"
#include "projection_cpu_kernels.h"

namespace attrprims {
namespace {

const CpuKernelTable& kernels() {
  return select_cpu_kernels(kCpuKernelsGeneric, AP_AVX2_TABLE(kCpuKernelsAvx2), AP_AVX512_TABLE(kCpuKernelsAvx512));
}

/// The best build without AVX-512: for the SJLT scatter (measured 5-20% slower in the AVX-512 build, which has no
/// wider work to give it) and for sign tables with fewer 16-example blocks than threads (8-lane blocks spread over
/// more threads; the results are bitwise equal).
const CpuKernelTable& kernels_up_to_avx2() {
  return select_cpu_kernels(kCpuKernelsGeneric, AP_AVX2_TABLE(kCpuKernelsAvx2));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_args(const ProjectArgs& a, int64_t in_cols, int64_t out_cols) {
  check_spec(a.spec);
  AP_CHECK(a.n >= 0, "n", "must be >= 0");
  AP_CHECK(a.c >= 0, "c", "must be >= 0");
  AP_CHECK(a.offset >= 0, "offset", "must be >= 0");
  AP_CHECK(a.offset <= kMaxRows - a.c, "offset", "offset + c must be < 2^62");
  AP_CHECK(a.in_dtype == DType::f32 || a.in_dtype == DType::f16 || a.in_dtype == DType::bf16, "in_dtype",
           "must be f32, f16 or bf16");
  AP_CHECK(a.n <= 1 || a.in_row_stride >= in_cols, "in_row_stride", "must be >= the row length");
  AP_CHECK(a.n <= 1 || a.out_row_stride >= out_cols, "out_row_stride", "must be >= the row length");
  AP_CHECK(a.n == 0 || in_cols == 0 || a.in != nullptr, "in", "null pointer");
  AP_CHECK(a.n == 0 || out_cols == 0 || a.out != nullptr, "out", "null pointer");
}

/// Row ranges per column tile: enough units to feed every thread, each at least a few register blocks.
int64_t row_splits(int64_t n, int64_t tiles, int threads) {
  if (tiles >= threads) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(threads, tiles), ceil_div(n, 24)));
}

/// Forward Rademacher projection by sign tables: per pass over a run of P's rows, the sign bytes of those
/// rows (shared by all examples), then blocks of the table's lane count of examples, split into runs of columns
/// when there are fewer blocks than threads. Each output's sum runs in the same order whatever the threads, the
/// column runs or the other rows, so results stay bitwise independent of all three.
void rademacher_by_sign_tables(const ProjectArgs& a, int threads) {
  const CpuKernelTable& widest = kernels();
  const CpuKernelTable& kt = ceil_div(a.n, widest.sign_table_lanes) < threads ? kernels_up_to_avx2() : widest;
  const int64_t k = a.spec.k, lanes = kt.sign_table_lanes, blocks = ceil_div(a.n, lanes);
  // Fewer blocks of examples than threads: split the columns too (each split builds its own tables).
  const int64_t splits = blocks >= threads ? 1 : std::min(ceil_div(threads, blocks), k / 64);
  if (a.c == 0) {
    if (!a.accumulate)
      for (int64_t i = 0; i < a.n; ++i) std::memset(a.out + i * a.out_row_stride, 0, sizeof(float) * k);
    return;
  }
  const int64_t rows_per_pass = std::max<int64_t>(64, 8 * kCpuSignBytesPerPass / k / 512 * 512);
  const int64_t pass_rows = std::min(a.c, rows_per_pass);
  std::vector<uint8_t> signs(static_cast<size_t>(ceil_div(pass_rows, 8) * k));
  for (int64_t r0 = 0; r0 < a.c; r0 += rows_per_pass) {
    const int64_t r1 = std::min(a.c, r0 + rows_per_pass), groups = ceil_div(r1 - r0, 8);
    const int64_t units = std::min<int64_t>(groups, 8 * threads);
    parallel_for(threads, units, [&](int64_t u) {
      kt.rademacher_sign_bytes(a, r0, r1, groups * u / units, groups * (u + 1) / units, signs.data());
    });
    const bool add = a.accumulate || r0 > 0;
    parallel_for(threads, blocks * splits, [&](int64_t u) {
      const int64_t b = u / splits, s = u % splits;
      const int64_t j0 = s == 0 ? 0 : k * s / splits / 8 * 8, j1 = s + 1 == splits ? k : k * (s + 1) / splits / 8 * 8;
      kt.rademacher_sign_table_block(a, signs.data(), r0, r1, lanes * b, j0, j1, add);
    });
  }
}

}  // namespace

void check_spec(const ProjectionSpec& spec) {
  AP_CHECK(spec.kind == Kind::rademacher || spec.kind == Kind::gaussian || spec.kind == Kind::sjlt, "kind",
           "unknown kind");
  AP_CHECK(spec.k >= 1 && spec.k <= kMaxK, "k", "must be in [1, 2^31 - 1], got " + std::to_string(spec.k));
  AP_CHECK(spec.kind != Kind::sjlt || (spec.s >= 1 && spec.s <= spec.k), "s",
           "must be in [1, k] for sjlt, got " + std::to_string(spec.s));
}

void project_cpu(const ProjectArgs& a) {
  check_args(a, a.c, a.spec.k);
  if (a.n == 0) return;
  const int threads = std::max(1, a.num_threads);
  if (a.spec.kind == Kind::sjlt) {
    const CpuKernelTable& kt = kernels_up_to_avx2();
    const int64_t splits = std::min<int64_t>(a.n, threads);
    parallel_for(threads, splits, [&](int64_t u) { kt.sjlt_forward(a, a.n * u / splits, a.n * (u + 1) / splits); });
    return;
  }
  if (a.spec.kind == Kind::rademacher && a.spec.k >= kCpuSignTableMinK && a.spec.k <= kCpuSignTableMaxK) {
    rademacher_by_sign_tables(a, threads);
    return;
  }
  const CpuKernelTable& kt = kernels();
  const int64_t tiles = ceil_div(a.spec.k, kCpuTileCols), splits = row_splits(a.n, tiles, threads);
  parallel_for(threads, tiles * splits, [&](int64_t u) {
    const int64_t t = u / splits, s = u % splits;
    kt.dense_forward(a, t * kCpuTileCols, a.n * s / splits, a.n * (s + 1) / splits);
  });
}

void project_transpose_cpu(const ProjectArgs& a) {
  check_args(a, a.spec.k, a.c);
  if (a.n == 0 || a.c == 0) return;
  const CpuKernelTable& kt = a.spec.kind == Kind::sjlt ? kernels_up_to_avx2() : kernels();
  const int threads = std::max(1, a.num_threads);
  const int64_t tile_rows = a.spec.kind == Kind::sjlt ? kCpuSjltTileRows : kCpuTransposeTileRows;
  const int64_t tiles = ceil_div(a.c, tile_rows), splits = row_splits(a.n, tiles, threads);
  parallel_for(threads, tiles * splits, [&](int64_t u) {
    const int64_t t = u / splits, s = u % splits, i0 = a.n * s / splits, i1 = a.n * (s + 1) / splits;
    if (a.spec.kind == Kind::sjlt) {
      kt.sjlt_transpose(a, t * tile_rows, i0, i1);
    } else {
      kt.dense_transpose(a, t * tile_rows, i0, i1);
    }
  });
}

void materialize_cpu(const MaterializeArgs& a) {
  check_spec(a.spec);
  AP_CHECK(a.c >= 0, "c", "must be >= 0");
  AP_CHECK(a.offset >= 0 && a.offset <= kMaxRows - a.c, "offset", "must be >= 0 with offset + c < 2^62");
  AP_CHECK(a.c <= 1 || a.out_row_stride >= a.spec.k, "out_row_stride", "must be >= k");
  AP_CHECK(a.c == 0 || a.out != nullptr, "out", "null pointer");
  const CpuKernelTable& kt = kernels();
  constexpr int64_t kRowsPerUnit = 64;
  const int64_t units = ceil_div(a.c, kRowsPerUnit);
  parallel_for(std::max(1, a.num_threads), units, [&](int64_t u) {
    kt.materialize(a, u * kRowsPerUnit, std::min(a.c, (u + 1) * kRowsPerUnit));
  });
}

}  // namespace attrprims
