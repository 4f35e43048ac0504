// NaN/Inf scan over a strided matrix of any input dtype (see non_finite_cpu.h).
#include "attrprims/non_finite_cpu.h"

namespace attrprims {
namespace {

/// Exponent bits all ones: Inf or NaN. Integer tests, so -ffast-math-style assumptions never remove them.
bool bad_f32(uint32_t bits) { return (bits & 0x7F800000u) == 0x7F800000u; }
bool bad_f16(uint16_t bits) { return (bits & 0x7C00u) == 0x7C00u; }
bool bad_bf16(uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u; }
bool bad_f64(uint64_t bits) { return (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull; }

template <typename Bits, typename Bad>
int64_t scan(const void* x, int64_t rows, int64_t cols, int64_t row_stride, Bad bad) {
  for (int64_t r = 0; r < rows; ++r) {
    const Bits* row = static_cast<const Bits*>(x) + r * row_stride;
    Bits any = 0;  // an OR of 0/1 flags in the element width: branch-free and integer, so the loop vectorises
    for (int64_t c = 0; c < cols; ++c) any |= static_cast<Bits>(bad(row[c]));
    if (any != 0)
      for (int64_t c = 0; c < cols; ++c)
        if (bad(row[c])) return r * cols + c;
  }
  return -1;
}

}  // namespace

int64_t find_non_finite_cpu(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride) {
  AP_CHECK(rows >= 0 && cols >= 0, "rows", "rows and cols must be >= 0");
  AP_CHECK(rows <= 1 || row_stride >= cols, "row_stride", "must be >= cols");
  if (rows == 0 || cols == 0) return -1;
  AP_CHECK(x != nullptr, "x", "null pointer");
  switch (dtype) {
    case DType::f32: return scan<uint32_t>(x, rows, cols, row_stride, bad_f32);
    case DType::f16: return scan<uint16_t>(x, rows, cols, row_stride, bad_f16);
    case DType::bf16: return scan<uint16_t>(x, rows, cols, row_stride, bad_bf16);
    default: return scan<uint64_t>(x, rows, cols, row_stride, bad_f64);
  }
}

}  // namespace attrprims
