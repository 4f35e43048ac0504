// CPU Gram kernel, compiled once per instruction set: the including TU defines AP_ISA_NS and AP_ISA_TABLE.
//
// A 6 x 8 fp64 register tile (12 ymm accumulators, 2 loads and 6 broadcasts per 12 FMAs, as in BLIS's
// Haswell/Zen dgemm kernel; with AVX-512, 12 x 16 over two row and two column panels) reads X packed twice,
// both sequentially: as 8-wide column panels for the tile's columns and 6-wide row panels for its rows. A
// tile's partial sums start at zero and are added into G once per pass, so each entry of G sees the rows of X
// in one fixed order, and the AVX2 and AVX-512 builds (both one FMA per row) give bitwise equal G.
#include "cpu_simd_impl.h"
#include "gram_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

static_assert(kGramPanel == 8 && kGramTileRows == 6, "the micro-kernel is 6 x 8");

#if defined(__AVX512F__)
typedef double v8d __attribute__((vector_size(64)));
// AVX-512: tiles of up to 12 x 16 (two row panels by two column panels), one zmm per row and column panel:
// 24 accumulators, 2 loads and 12 broadcasts per 24 FMAs.
constexpr int kRowPanelsPerCall = 2, kColPanelsPerCall = 2;

static inline v8d splat8d(double x) { return v8d{x, x, x, x, x, x, x, x}; }
static inline v8d fma8d(v8d a, v8d b, v8d c) {
  return reinterpret_cast<v8d>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                               reinterpret_cast<__m512d>(c)));
}

/// out[6p + i][8c + j] = Σ_r A_p[r·6 + i]·B_c[r·8 + j] for row panels p < R, column panels c < C, r < depth.
template <int R, int C>
static void micro_kernel(const double* const* A, const double* const* B, int64_t depth, double out[12][16]) {
  v8d acc[6 * R][C];
  for (int i = 0; i < 6 * R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = splat8d(0.0);
  for (int64_t r = 0; r < depth; ++r) {
    v8d b[C];
    for (int c = 0; c < C; ++c) std::memcpy(&b[c], B[c] + r * 8, sizeof(v8d));
#pragma GCC unroll 12
    for (int i = 0; i < 6 * R; ++i) {
      const v8d av = splat8d(A[i / 6][r * 6 + i % 6]);
      for (int c = 0; c < C; ++c) acc[i][c] = fma8d(av, b[c], acc[i][c]);
    }
  }
  for (int i = 0; i < 6 * R; ++i)
    for (int c = 0; c < C; ++c) std::memcpy(out[i] + 8 * c, &acc[i][c], sizeof(v8d));
}

static void run_micro(int row_panels, int col_panels, const double* const* A, const double* const* B, int64_t depth,
                      double out[12][16]) {
  if (row_panels == 2) {
    if (col_panels == 2) return micro_kernel<2, 2>(A, B, depth, out);
    return micro_kernel<2, 1>(A, B, depth, out);
  }
  if (col_panels == 2) return micro_kernel<1, 2>(A, B, depth, out);
  micro_kernel<1, 1>(A, B, depth, out);
}
#else
constexpr int kRowPanelsPerCall = 1, kColPanelsPerCall = 1;  // a 6 x 8 tile in 4-wide vectors (12 ymm accumulators)

/// out[i][j] = Σ_r A[0][r·6 + i]·B[0][r·8 + j] for i < 6, j < 8, r < depth (a row panel and a column panel).
static void run_micro(int, int, const double* const* A, const double* const* B, int64_t depth, double out[12][16]) {
  v4d c0[6], c1[6];
  for (int i = 0; i < 6; ++i) c0[i] = c1[i] = splat4(0.0);
#pragma GCC unroll 2
  for (int64_t r = 0; r < depth; ++r) {
    const v4d b0 = load4(B[0] + r * 8), b1 = load4(B[0] + r * 8 + 4);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const v4d av = splat4(A[0][r * 6 + i]);
      c0[i] = fma4(av, b0, c0[i]);
      c1[i] = fma4(av, b1, c1[i]);
    }
  }
  for (int i = 0; i < 6; ++i) {
    store4(out[i], c0[i]);
    store4(out[i] + 4, c1[i]);
  }
}
#endif

static void tiles(const GramUpdateArgs& a, const GramPacked& p, int64_t q, int64_t i0, int64_t i1) {
  const int64_t j0 = q * kGramPanel, nj = min64(a.k - j0, kColPanelsPerCall * kGramPanel);
  const int col_panels = nj > kGramPanel ? 2 : 1;
  const double* B[2] = {p.cols + q * p.depth * kGramPanel, p.cols + (q + 1) * p.depth * kGramPanel};
  double out[12][16];
  for (int64_t i = i0; i < i1; i += kRowPanelsPerCall * kGramTileRows) {
    const int row_panels = i + kGramTileRows < i1 ? kRowPanelsPerCall : 1;
    const double* A[2] = {p.rows + (i / kGramTileRows) * p.depth * kGramTileRows,
                          p.rows + (i / kGramTileRows + 1) * p.depth * kGramTileRows};
    run_micro(row_panels, col_panels, A, B, p.depth, out);
    const int64_t ni = min64(a.k - i, row_panels * kGramTileRows);
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

extern const GramCpuKernelTable AP_ISA_TABLE = {AP_ISA_NAME, AP_ISA_NS::kColPanelsPerCall, AP_ISA_NS::tiles};

}  // namespace attrprims
