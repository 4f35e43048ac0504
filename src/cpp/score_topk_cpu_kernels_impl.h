// CPU scoring kernel, compiled once per instruction set: the including TU defines AP_ISA_NS and AP_ISA_TABLE
// (the 6x16 micro-kernel comes from cpu_simd_impl.h).
//
// The test rows are packed once per call into [k, 16] panels; training rows are read in place (fp16/bf16
// converted kGroup rows at a time). Each 6 x 16 tile (6 training rows x 16 test rows, full depth k) lives in
// registers and goes straight into the test rows' heaps: no score is ever written to memory. A test panel
// stays in L1 while the kGroup training rows (in L2) pass over it.
#include "cpu_simd_impl.h"
#include "score_topk_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

static_assert(kScorePanel == kNR, "test panels are the micro-kernel's width");
constexpr int64_t kGroup = 48;  // training rows per group (a multiple of kMR)

/// The value a candidate must beat to enter a heap whose root is (v, idx): -inf (top) / +inf (bottom) while it
/// has empty slots. Candidates of a unit arrive in increasing index order, so a tie with the root never enters.
static inline float entry_bar(const float* v, const int64_t* idx, int64_t size, bool largest) {
  if (size == 0) return largest ? __builtin_inff() : -__builtin_inff();
  if (idx[0] < 0) return largest ? -__builtin_inff() : __builtin_inff();
  return v[0];
}

static void segment(const ScoreTopkArgs& a, const float* test, int64_t p0, int64_t p1, int64_t j0, int64_t j1,
                    const ScoreHeaps& h) {
  const bool convert = a.b_dtype != DType::f32;
  Buffer<float> rows_buf(convert ? kGroup * (a.k > 0 ? a.k : 1) : 1);
  // Entry bars of this unit's test rows [16·p0, 16·p1): a cheap first test before any heap is touched.
  const int64_t i0 = p0 * kNR, i1 = min64(a.m, p1 * kNR);
  Buffer<float> bar_top(i1 - i0 + 1), bar_bottom(i1 - i0 + 1);
  for (int64_t i = i0; i < i1; ++i) {
    bar_top.p[i - i0] = entry_bar(h.values + i * h.ld, h.indices + i * h.ld, a.top, true);
    bar_bottom.p[i - i0] = entry_bar(h.values + i * h.ld + a.top, h.indices + i * h.ld + a.top, a.bottom, false);
  }
  float tile[kMR * kNR];
  for (int64_t g0 = j0; g0 < j1; g0 += kGroup) {
    const int64_t rows = min64(kGroup, j1 - g0);
    const float* X = static_cast<const float*>(a.b) + g0 * a.b_row_stride;
    int64_t ldx = a.b_row_stride;
    if (convert) {
      convert_rows(static_cast<const uint16_t*>(a.b) + g0 * a.b_row_stride, a.b_dtype, a.b_row_stride, rows, a.k,
                   rows_buf.p, a.k);
      X = rows_buf.p;
      ldx = a.k;
    }
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = min64(kNR, a.m - p * kNR);
      for (int64_t jb = 0; jb < rows; jb += kMR) {
        const int mr = static_cast<int>(min64(kMR, rows - jb));
        for (int e = 0; e < kMR * kNR; ++e) tile[e] = 0.0f;
        run_micro(mr, X + jb * ldx, ldx, test + p * a.k * kNR, kNR, a.k, tile, kNR);
        for (int r = 0; r < mr; ++r) {
          const int64_t j = g0 + jb + r, index = a.index_offset + j;
          const float w = a.w != nullptr ? a.w[j] : 1.0f;
          for (int64_t c = 0; c < cols; ++c) {
            const float s = a.w != nullptr ? tile[r * kNR + c] * w : tile[r * kNR + c];
            const int64_t i = p * kNR + c;
            float* values = h.values + i * h.ld;
            int64_t* indices = h.indices + i * h.ld;
            if (s > bar_top.p[i - i0]) {
              heap_offer(values, indices, a.top, s, index, true);
              bar_top.p[i - i0] = entry_bar(values, indices, a.top, true);
            }
            if (s < bar_bottom.p[i - i0]) {
              heap_offer(values + a.top, indices + a.top, a.bottom, s, index, false);
              bar_bottom.p[i - i0] = entry_bar(values + a.top, indices + a.top, a.bottom, false);
            }
          }
        }
      }
    }
  }
}

}  // namespace AP_ISA_NS

extern const ScoreCpuKernelTable AP_ISA_TABLE = {AP_ISA_NAME, AP_ISA_NS::segment};

}  // namespace attrprims
