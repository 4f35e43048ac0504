// CPU scoring kernel, compiled once per instruction set: the including TU defines AP_ISA_NS and AP_ISA_TABLE
// (the 6x16 micro-kernel comes from cpu_simd_impl.h).
//
// Training rows are transposed into packed [k, 16] panels, kPanels at a time (converted from fp16/bf16 once);
// each 6-row block of test rows then meets every panel of the group over the full depth k, so a 6 x 16 tile of
// scores lives in registers and goes straight into the rows' heaps: no score is ever written to memory.
#include "cpu_simd_impl.h"
#include "score_topk_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

constexpr int64_t kPanels = 8;  // panels of 16 training rows packed together (128 rows)

/// dst[r·16 + c] = b[j0 + c, r] for c < cols (zeros past), r < k: a transposed panel of training rows.
/// row_buf: k floats for a converted fp16/bf16 row.
static void pack_panel(const ScoreTopkArgs& a, int64_t j0, int64_t cols, float* dst, float* row_buf) {
  for (int64_t c = 0; c < kNR; ++c) {
    if (c >= cols) {
      for (int64_t r = 0; r < a.k; ++r) dst[r * kNR + c] = 0.0f;
      continue;
    }
    const int64_t row = (j0 + c) * a.b_row_stride;
    const float* src = static_cast<const float*>(a.b) + row;
    if (a.b_dtype != DType::f32) {
      convert_rows(static_cast<const uint16_t*>(a.b) + row, a.b_dtype, a.b_row_stride, 1, a.k, row_buf, a.k);
      src = row_buf;
    }
    for (int64_t r = 0; r < a.k; ++r) dst[r * kNR + c] = src[r];
  }
}

static void segment(const ScoreTopkArgs& a, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const ScoreHeaps& h) {
  Buffer<float> packed(kPanels * kNR * (a.k > 0 ? a.k : 1)), row_buf(a.k > 0 ? a.k : 1);
  float tile[kMR * kNR];
  for (int64_t g0 = j0; g0 < j1; g0 += kPanels * kNR) {
    const int64_t panels = min64(kPanels, (j1 - g0 + kNR - 1) / kNR);
    for (int64_t p = 0; p < panels; ++p)
      pack_panel(a, g0 + p * kNR, min64(kNR, j1 - g0 - p * kNR), packed.p + p * kNR * a.k, row_buf.p);
    for (int64_t ib = i0; ib < i1; ib += kMR) {
      const int mr = static_cast<int>(min64(kMR, i1 - ib));
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t c0 = g0 + p * kNR, cols = min64(kNR, j1 - c0);
        for (int e = 0; e < kMR * kNR; ++e) tile[e] = 0.0f;
        run_micro(mr, a.a + ib * a.a_row_stride, a.a_row_stride, packed.p + p * kNR * a.k, kNR, a.k, tile, kNR);
        for (int r = 0; r < mr; ++r) {
          float* values = h.values + (ib + r - i0) * h.ld;
          int64_t* indices = h.indices + (ib + r - i0) * h.ld;
          for (int64_t c = 0; c < cols; ++c) {
            const float s = a.w != nullptr ? tile[r * kNR + c] * a.w[c0 + c] : tile[r * kNR + c];
            const int64_t index = a.index_offset + c0 + c;
            heap_offer(values, indices, a.top, s, index, true);
            heap_offer(values + a.top, indices + a.top, a.bottom, s, index, false);
          }
        }
      }
    }
  }
}

}  // namespace AP_ISA_NS

extern const ScoreCpuKernelTable AP_ISA_TABLE = {AP_ISA_NAME, AP_ISA_NS::segment};

}  // namespace attrprims
