// CPU Gram kernel, compiled once per instruction set: the including TU defines AP_ISA_NS and AP_ISA_TABLE.
//
// A 6 x 8 fp64 register tile (12 ymm accumulators, 2 loads and 6 broadcasts per 12 FMAs, as in BLIS's
// Haswell/Zen dgemm kernel) reads X packed twice, both sequentially: as an 8-wide column panel for the tile's
// columns and a 6-wide row panel for its rows. A tile's partial sums start at zero and are added into G once
// per pass, so each entry of G sees the rows of X in one fixed order.
#include "cpu_simd_impl.h"
#include "gram_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

static_assert(kGramPanel == 8 && kGramTileRows == 6, "the micro-kernel is 6 x 8");

/// out[i][j] = Σ_r A[r·6 + i]·B[r·8 + j] for i < 6, j < 8, r < depth (A: a row panel, B: a column panel).
static void micro_kernel(const double* A, const double* B, int64_t depth, double out[6][8]) {
  v4d c0[6], c1[6];
  for (int i = 0; i < 6; ++i) c0[i] = c1[i] = splat4(0.0);
#pragma GCC unroll 2
  for (int64_t r = 0; r < depth; ++r) {
    const v4d b0 = load4(B + r * 8), b1 = load4(B + r * 8 + 4);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const v4d av = splat4(A[r * 6 + i]);
      c0[i] = fma4(av, b0, c0[i]);
      c1[i] = fma4(av, b1, c1[i]);
    }
  }
  for (int i = 0; i < 6; ++i) {
    store4(out[i], c0[i]);
    store4(out[i] + 4, c1[i]);
  }
}

static void tiles(const GramUpdateArgs& a, const GramPacked& p, int64_t q, int64_t i0, int64_t i1) {
  const double* B = p.cols + q * p.depth * kGramPanel;
  const int64_t j0 = q * kGramPanel, nj = a.k - j0 < kGramPanel ? a.k - j0 : kGramPanel;
  double out[6][8];
  for (int64_t i = i0; i < i1; i += kGramTileRows) {
    micro_kernel(p.rows + (i / kGramTileRows) * p.depth * kGramTileRows, B, p.depth, out);
    const int64_t ni = a.k - i < kGramTileRows ? a.k - i : kGramTileRows;
    for (int64_t r = 0; r < ni; ++r) {
      const int64_t row = (i + r) * a.g_row_stride + j0;
      if (a.g_f32) {
        float* g = static_cast<float*>(a.g) + row;
        for (int64_t c = 0; c < nj; ++c) gram_add_compensated(g + c, a.comp + row + c, static_cast<float>(out[r][c]));
      } else {
        double* g = static_cast<double*>(a.g) + row;
        for (int64_t c = 0; c < nj; ++c) gram_add(g + c, out[r][c]);
      }
    }
  }
}

}  // namespace AP_ISA_NS

extern const GramCpuKernelTable AP_ISA_TABLE = {AP_ISA_NAME, AP_ISA_NS::tiles};

}  // namespace attrprims
