// CPU Gram kernel, compiled once per instruction set: the including TU defines AP_ISA_NS and AP_ISA_TABLE.
//
// A 6 x 8 fp64 register tile (12 ymm accumulators, 2 loads and 6 broadcasts per 12 FMAs, as in BLIS's
// Haswell/Zen dgemm kernel; with AVX-512, 12 x 8 over two row panels, one zmm per row) reads X packed twice,
// both sequentially: as an 8-wide column panel for the tile's columns and 6-wide row panels for its rows. A
// tile's partial sums start at zero and are added into G once per pass, so each entry of G sees the rows of X
// in one fixed order, and the AVX2 and AVX-512 builds (both one FMA per row) give bitwise equal G.
#include "cpu_simd_impl.h"
#include "gram_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

static_assert(kGramPanel == 8 && kGramTileRows == 6, "the micro-kernel is 6 x 8");

#if defined(__AVX512F__)
typedef double v8d __attribute__((vector_size(64)));
constexpr int kPanelsPerCall = 2;  // AVX-512: a 12 x 8 tile, one zmm per row (12 FMAs per load and 12 broadcasts)

static inline v8d splat8d(double x) { return v8d{x, x, x, x, x, x, x, x}; }
static inline v8d fma8d(v8d a, v8d b, v8d c) {
  return reinterpret_cast<v8d>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                               reinterpret_cast<__m512d>(c)));
}

/// out[6p + i][j] = Σ_r A_p[r·6 + i]·B[r·8 + j] for row panels p < panels (1 or 2), i < 6, j < 8, r < depth.
static void micro_kernel(const double* A0, const double* A1, int panels, const double* B, int64_t depth,
                         double out[12][8]) {
  v8d c[12];
  for (int i = 0; i < 12; ++i) c[i] = splat8d(0.0);
  if (panels == 2) {
    for (int64_t r = 0; r < depth; ++r) {
      v8d b;
      std::memcpy(&b, B + r * 8, sizeof(b));
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) {
        c[i] = fma8d(splat8d(A0[r * 6 + i]), b, c[i]);
        c[6 + i] = fma8d(splat8d(A1[r * 6 + i]), b, c[6 + i]);
      }
    }
  } else {
    for (int64_t r = 0; r < depth; ++r) {
      v8d b;
      std::memcpy(&b, B + r * 8, sizeof(b));
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) c[i] = fma8d(splat8d(A0[r * 6 + i]), b, c[i]);
    }
  }
  for (int i = 0; i < 6 * panels; ++i) std::memcpy(out[i], &c[i], sizeof(c[i]));
}
#else
constexpr int kPanelsPerCall = 1;  // a 6 x 8 tile in 4-wide vectors (12 ymm accumulators)

/// out[i][j] = Σ_r A0[r·6 + i]·B[r·8 + j] for i < 6, j < 8, r < depth (A0: a row panel, B: a column panel).
static void micro_kernel(const double* A0, const double*, int, const double* B, int64_t depth, double out[12][8]) {
  v4d c0[6], c1[6];
  for (int i = 0; i < 6; ++i) c0[i] = c1[i] = splat4(0.0);
#pragma GCC unroll 2
  for (int64_t r = 0; r < depth; ++r) {
    const v4d b0 = load4(B + r * 8), b1 = load4(B + r * 8 + 4);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const v4d av = splat4(A0[r * 6 + i]);
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
  const double* B = p.cols + q * p.depth * kGramPanel;
  const int64_t j0 = q * kGramPanel, nj = a.k - j0 < kGramPanel ? a.k - j0 : kGramPanel;
  double out[12][8];
  for (int64_t i = i0; i < i1; i += kPanelsPerCall * kGramTileRows) {
    const int panels = i + kGramTileRows < i1 ? kPanelsPerCall : 1;
    const double* A0 = p.rows + (i / kGramTileRows) * p.depth * kGramTileRows;
    micro_kernel(A0, A0 + p.depth * kGramTileRows, panels, B, p.depth, out);
    const int64_t ni = min64(a.k - i, panels * kGramTileRows);
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
