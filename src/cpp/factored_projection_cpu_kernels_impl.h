// CPU factored-projection kernel, compiled once per instruction set: the including TU defines AP_ISA_NS and
// AP_ISA_TABLE (the SIMD helpers and the 6x16 micro-kernel come from cpu_simd_impl.h).
//
// One example at a time, kBlockT positions at a time: U_a = a_blk P_in [rows, ld_in] and U_d = delta_blk
// P_out [rows, o-range] by the micro-kernel, with the depth (d_in or d_out) in chunks of kChunkD rows of packed
// P. A chunk of P (256 x 64 floats = 64 KiB) stays in L2 while each 6-row block of inputs passes over it once,
// so each input element is read from memory, and converted from fp16/bf16, exactly once. Then
// acc [k_out, ld_in] += U_dᵀ U_a, summed over the position blocks in order; acc stays in L1/L2.
#include <cstring>

#include "cpu_simd_impl.h"
#include "factored_projection_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

static_assert(kFactoredPackCols == kNR, "packed P rows are read kNR columns at a time");

constexpr int64_t kBlockT = 96;   // positions per block (a multiple of kMR)
constexpr int64_t kChunkD = 256;  // rows of packed P per depth chunk

/// C[0:rows, 0:width] += X[0:rows, 0:depth] @ B[0:depth, 0:width], X of dtype dt with rows x_stride elements
/// apart, B rows ldb floats apart, C rows `width` floats apart (width a multiple of kNR). xbuf: kMR x kChunkD.
static void project_rows(const void* x, DType dt, int64_t x_stride, int64_t rows, int64_t depth, const float* B,
                         int64_t ldb, int64_t width, float* C, float* xbuf) {
  for (int64_t d0 = 0; d0 < depth; d0 += kChunkD) {
    const int64_t dc = min64(kChunkD, depth - d0);
    for (int64_t ib = 0; ib < rows; ib += kMR) {
      const int mr = static_cast<int>(min64(kMR, rows - ib));
      const float* X = xbuf;
      int64_t ldx = kChunkD;
      if (dt == DType::f32) {
        X = static_cast<const float*>(x) + ib * x_stride + d0;
        ldx = x_stride;
      } else {
        convert_rows(static_cast<const uint16_t*>(x) + ib * x_stride + d0, dt, x_stride, mr, dc, xbuf, kChunkD);
      }
      for (int64_t jg = 0; jg < width; jg += kNR)
        run_micro(mr, X, ldx, B + d0 * ldb + jg, ldb, dc, C + ib * width + jg, width);
    }
  }
}

static void example(const FactoredProjectArgs& a, const FactoredPacked& p, int64_t i, int64_t o0, int64_t o1) {
  const int64_t ko = o1 - o0, wo = (ko + kNR - 1) / kNR * kNR, ld_in = p.ld_in;
  const int64_t esize = dtype_size(a.a_dtype);
  const char* a_rows = static_cast<const char*>(a.a) + i * a.a_stride_n * esize;
  const char* d_rows = static_cast<const char*>(a.delta) + i * a.delta_stride_n * esize;
  Buffer<float> ua(kBlockT * ld_in), ud(kBlockT * wo), udt(ko * kBlockT), acc(ko * ld_in), xbuf(kMR * kChunkD);
  std::memset(acc.p, 0, sizeof(float) * ko * ld_in);
  for (int64_t t0 = 0; t0 < a.t; t0 += kBlockT) {
    const int64_t rows = min64(kBlockT, a.t - t0);
    std::memset(ua.p, 0, sizeof(float) * rows * ld_in);
    std::memset(ud.p, 0, sizeof(float) * rows * wo);
    project_rows(a_rows + t0 * a.a_stride_t * esize, a.a_dtype, a.a_stride_t, rows, a.d_in, p.p_in, ld_in, ld_in,
                 ua.p, xbuf.p);
    project_rows(d_rows + t0 * a.delta_stride_t * esize, a.a_dtype, a.delta_stride_t, rows, a.d_out, p.p_out + o0,
                 p.ld_out, wo, ud.p, xbuf.p);
    // The micro-kernel broadcasts along the rows of its first operand, so U_d goes in transposed.
    for (int64_t s = 0; s < rows; ++s)
      for (int64_t o = 0; o < ko; ++o) udt.p[o * kBlockT + s] = ud.p[s * wo + o];
    for (int64_t ob = 0; ob < ko; ob += kMR) {
      const int mr = static_cast<int>(min64(kMR, ko - ob));
      for (int64_t jg = 0; jg < ld_in; jg += kNR)
        run_micro(mr, udt.p + ob * kBlockT, kBlockT, ua.p + jg, ld_in, rows, acc.p + ob * ld_in + jg, ld_in);
    }
  }
  float* out = a.out + i * a.out_row_stride;
  for (int64_t o = 0; o < ko; ++o)
    for (int64_t j = 0; j < a.k_in; ++j)
      put_factored_output(out + factored_out_col(o0 + o, j, a.k_in), acc.p[o * ld_in + j], a.accumulate);
}

}  // namespace AP_ISA_NS

extern const FactoredCpuKernelTable AP_ISA_TABLE = {AP_ISA_NAME, AP_ISA_NS::example};

}  // namespace attrprims
