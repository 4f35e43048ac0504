// CPU projection kernels, compiled once per instruction set: the including TU defines AP_ISA_NS and
// AP_ISA_TABLE (the SIMD helpers and micro-kernel come from cpu_simd_impl.h, under the same rules).
//
// Dense kinds: a tile of P (256 rows x 128 columns, 128 KiB, L2-resident) is generated once per work
// unit and applied to all of the unit's rows with a 6x16 register-blocked FMA micro-kernel. P is
// generated scaled (entries ±1/√k or z/√k), so no pass over the output is needed afterwards. The forward
// Rademacher projection at larger k goes by sign tables instead (projection_cpu_sign_tables_impl.h).
#include <cstring>

#include "cpu_simd_impl.h"
#include "projection_cpu_kernels.h"

namespace attrprims {
namespace AP_ISA_NS {

constexpr int64_t kTileDepth = 256;    // rows of P per tile
constexpr int64_t kRowBlockCols = 128; // columns produced per row by one fill_row_block call

/// Input element idx of a buffer of dtype dt, as float.
static inline float load_as_float(const void* base, DType dt, int64_t idx) {
  if (dt == DType::f32) return static_cast<const float*>(base)[idx];
  const uint16_t h = static_cast<const uint16_t*>(base)[idx];
  return dt == DType::f16 ? f16_bits_to_float(h) : bf16_bits_to_float(h);
}

}  // namespace AP_ISA_NS
}  // namespace attrprims

#include "projection_cpu_sign_tables_impl.h"

namespace attrprims {
namespace AP_ISA_NS {

/// vals[0:128] = P[row, 128·blk : 128·blk + 128] for a dense kind.
static void fill_row_block(const ProjectionSpec& sp, float scale, uint64_t row, int64_t blk, float* vals) {
  if (sp.kind == Kind::rademacher) {
    const U32x4 w = projection_words(sp.seed, kTagRademacher, row, static_cast<uint32_t>(blk));
    for (int q = 0; q < 4; ++q) {
      const uint32_t word = w.v[q];
      for (int b = 0; b < 32; ++b) vals[q * 32 + b] = rademacher_entry(word, b, scale);
    }
    return;
  }
  constexpr int kCalls = kRowBlockCols / kGaussianColsPerCall;
  uint32_t w0[kCalls], w1[kCalls], w2[kCalls], w3[kCalls];
  for (int g = 0; g < kCalls; ++g) {
    const U32x4 w = projection_words(sp.seed, kTagGaussian, row, static_cast<uint32_t>(blk * kCalls + g));
    w0[g] = w.v[0];
    w1[g] = w.v[1];
    w2[g] = w.v[2];
    w3[g] = w.v[3];
  }
  float z0[kCalls], z1[kCalls], z2[kCalls], z3[kCalls];
  for (int g = 0; g < kCalls; ++g) {
    box_muller(w0[g], w1[g], &z0[g], &z1[g]);
    box_muller(w2[g], w3[g], &z2[g], &z3[g]);
  }
  for (int g = 0; g < kCalls; ++g) {
    vals[4 * g + 0] = exact_mul(z0[g], scale);
    vals[4 * g + 1] = exact_mul(z1[g], scale);
    vals[4 * g + 2] = exact_mul(z2[g], scale);
    vals[4 * g + 3] = exact_mul(z3[g], scale);
  }
}

/// out[i0:i1, out_col0 : out_col0+width] += in[i0:i1, in_col0 : in_col0+depth] @ B[0:depth, 0:width]
/// (B rows ldb apart, ldb >= width rounded up to 16, columns past width readable).
static void apply_tile(const ProjectArgs& a, const float* B, int64_t ldb, int64_t width, int64_t depth,
                       int64_t in_col0, int64_t out_col0, int64_t i0, int64_t i1, float* abuf) {
  alignas(32) float scratch[kMR * kNR];
  for (int64_t ib = i0; ib < i1; ib += kMR) {
    const int mr = static_cast<int>(min64(kMR, i1 - ib));
    const float* A;
    int64_t lda;
    if (a.in_dtype == DType::f32) {
      A = static_cast<const float*>(a.in) + ib * a.in_row_stride + in_col0;
      lda = a.in_row_stride;
    } else {
      convert_rows(static_cast<const uint16_t*>(a.in) + ib * a.in_row_stride + in_col0, a.in_dtype,
                   a.in_row_stride, mr, depth, abuf, kTileDepth);
      A = abuf;
      lda = kTileDepth;
    }
    float* C = a.out + ib * a.out_row_stride + out_col0;
    for (int64_t jg = 0; jg < width; jg += kNR) {
      if (jg + kNR <= width) {
        run_micro(mr, A, lda, B + jg, ldb, depth, C + jg, a.out_row_stride);
        continue;
      }
      const int64_t w = width - jg;  // ragged last group: compute on a padded copy
      for (int i = 0; i < mr; ++i)
        for (int64_t j = 0; j < kNR; ++j) scratch[i * kNR + j] = j < w ? C[i * a.out_row_stride + jg + j] : 0.0f;
      run_micro(mr, A, lda, B + jg, ldb, depth, scratch, kNR);
      for (int i = 0; i < mr; ++i)
        for (int64_t j = 0; j < w; ++j) C[i * a.out_row_stride + jg + j] = scratch[i * kNR + j];
    }
  }
}

static void zero_block(const ProjectArgs& a, int64_t col0, int64_t width, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) std::memset(a.out + i * a.out_row_stride + col0, 0, sizeof(float) * width);
}

static void dense_forward(const ProjectArgs& a, int64_t j0, int64_t i0, int64_t i1) {
  const int64_t width = min64(kCpuTileCols, a.spec.k - j0);
  const float scale = dense_scale(a.spec.k);
  if (!a.accumulate) zero_block(a, j0, width, i0, i1);
  Buffer<float> tile(kTileDepth * kCpuTileCols), abuf(kMR * kTileDepth);
  for (int64_t r0 = 0; r0 < a.c; r0 += kTileDepth) {
    const int64_t depth = min64(kTileDepth, a.c - r0);
    for (int64_t rr = 0; rr < depth; ++rr)
      fill_row_block(a.spec, scale, static_cast<uint64_t>(a.offset + r0 + rr), j0 / kRowBlockCols,
                     tile.p + rr * kCpuTileCols);
    apply_tile(a, tile.p, kCpuTileCols, width, depth, r0, j0, i0, i1, abuf.p);
  }
}

static void dense_transpose(const ProjectArgs& a, int64_t r0, int64_t i0, int64_t i1) {
  constexpr int64_t ld = kCpuTransposeTileRows;
  const int64_t width = min64(ld, a.c - r0);
  const float scale = dense_scale(a.spec.k);
  if (!a.accumulate) zero_block(a, r0, width, i0, i1);
  Buffer<float> tile(kTileDepth * ld), abuf(kMR * kTileDepth);
  alignas(32) float vals[kRowBlockCols];
  for (int64_t c0 = 0; c0 < a.spec.k; c0 += kTileDepth) {
    const int64_t depth = min64(kTileDepth, a.spec.k - c0);
    // tile[cc, rr] = P[offset + r0 + rr, c0 + cc]: the transposed tile feeds the same micro-kernel.
    for (int64_t rr = 0; rr < width; ++rr) {
      for (int64_t cb = 0; cb < depth; cb += kRowBlockCols) {
        fill_row_block(a.spec, scale, static_cast<uint64_t>(a.offset + r0 + rr), (c0 + cb) / kRowBlockCols, vals);
        const int64_t cols = min64(kRowBlockCols, depth - cb);
        for (int64_t cc = 0; cc < cols; ++cc) tile.p[(cb + cc) * ld + rr] = vals[cc];
      }
    }
    for (int64_t rr = width; rr < ld; ++rr)
      for (int64_t cc = 0; cc < depth; ++cc) tile.p[cc * ld + rr] = 0.0f;
    apply_tile(a, tile.p, ld, width, depth, c0, r0, i0, i1, abuf.p);
  }
}

/// Columns and signed values of the SJLT nonzeros of P rows offset+r0 .. offset+r0+rows.
static void sjlt_block(const ProjectionSpec& sp, int64_t first_row, int64_t rows, int64_t* cols, float* vals) {
  const float v = sjlt_value(sp.s);
  for (int64_t rr = 0; rr < rows; ++rr) {
    const uint64_t row = static_cast<uint64_t>(first_row + rr);
    for (int64_t jb = 0; jb < sp.s; jb += 4) {
      const U32x4 w = projection_words(sp.seed, kTagSjlt, row, static_cast<uint32_t>(jb >> 2));
      for (int64_t j = jb; j < min64(sp.s, jb + 4); ++j) {
        const uint32_t word = word_at(w, j & 3);
        cols[rr * sp.s + j] = sjlt_column(word, j, sp.k, sp.s);
        vals[rr * sp.s + j] = (word & 1u) ? -v : v;
      }
    }
  }
}

/// P rows per SJLT block: about 4096 nonzeros, at least one row.
static int64_t sjlt_rows_per_block(int64_t s) { return s >= 4096 ? 1 : 4096 / s; }

static void sjlt_forward(const ProjectArgs& a, int64_t i0, int64_t i1) {
  const int64_t s = a.spec.s, rb = sjlt_rows_per_block(s);
  if (!a.accumulate) zero_block(a, 0, a.spec.k, i0, i1);
  Buffer<int64_t> cols(rb * s);
  Buffer<float> vals(rb * s);
  for (int64_t r0 = 0; r0 < a.c; r0 += rb) {
    const int64_t rows = min64(rb, a.c - r0);
    sjlt_block(a.spec, a.offset + r0, rows, cols.p, vals.p);
    for (int64_t i = i0; i < i1; ++i) {
      float* o = a.out + i * a.out_row_stride;
      const int64_t base = i * a.in_row_stride + r0;
      for (int64_t rr = 0; rr < rows; ++rr) {
        const float xv = load_as_float(a.in, a.in_dtype, base + rr);
        for (int64_t j = 0; j < s; ++j) o[cols.p[rr * s + j]] += vals.p[rr * s + j] * xv;
      }
    }
  }
}

static void sjlt_transpose(const ProjectArgs& a, int64_t r0, int64_t i0, int64_t i1) {
  const int64_t s = a.spec.s, rows = min64(kCpuSjltTileRows, a.c - r0);
  Buffer<int64_t> cols(rows * s);
  Buffer<float> vals(rows * s);
  sjlt_block(a.spec, a.offset + r0, rows, cols.p, vals.p);
  for (int64_t i = i0; i < i1; ++i) {
    float* o = a.out + i * a.out_row_stride + r0;
    const int64_t base = i * a.in_row_stride;
    for (int64_t rr = 0; rr < rows; ++rr) {
      float acc = 0.0f;
      for (int64_t j = 0; j < s; ++j) acc += vals.p[rr * s + j] * load_as_float(a.in, a.in_dtype, base + cols.p[rr * s + j]);
      o[rr] = a.accumulate ? o[rr] + acc : acc;
    }
  }
}

static void materialize(const MaterializeArgs& a, int64_t r0, int64_t r1) {
  const int64_t k = a.spec.k;
  if (a.spec.kind == Kind::sjlt) {
    Buffer<int64_t> cols(a.spec.s);
    Buffer<float> vals(a.spec.s);
    for (int64_t r = r0; r < r1; ++r) {
      float* o = a.out + r * a.out_row_stride;
      std::memset(o, 0, sizeof(float) * k);
      sjlt_block(a.spec, a.offset + r, 1, cols.p, vals.p);
      for (int64_t j = 0; j < a.spec.s; ++j) o[cols.p[j]] = vals.p[j];
    }
    return;
  }
  const float scale = dense_scale(k);
  alignas(32) float vals[kRowBlockCols];
  for (int64_t r = r0; r < r1; ++r) {
    float* o = a.out + r * a.out_row_stride;
    for (int64_t c0 = 0; c0 < k; c0 += kRowBlockCols) {
      fill_row_block(a.spec, scale, static_cast<uint64_t>(a.offset + r), c0 / kRowBlockCols, vals);
      std::memcpy(o + c0, vals, sizeof(float) * min64(kRowBlockCols, k - c0));
    }
  }
}

}  // namespace AP_ISA_NS

extern const CpuKernelTable AP_ISA_TABLE = {
    AP_ISA_NAME,          AP_ISA_NS::kSignLanes,     AP_ISA_NS::dense_forward,  AP_ISA_NS::dense_transpose, AP_ISA_NS::sjlt_forward,
    AP_ISA_NS::sjlt_transpose, AP_ISA_NS::materialize, AP_ISA_NS::rademacher_sign_bytes,
    AP_ISA_NS::rademacher_sign_table_block,
};

}  // namespace attrprims
