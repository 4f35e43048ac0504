// Rademacher forward projection by sign tables, compiled once per instruction set (included by
// projection_cpu_kernels_impl.h, under its rules).
//
// P has entries ±1/√k, so x @ P needs no multiplications. The signs of 8 consecutive rows of P in one
// column form a byte, and the signed sum of the matching 8 coordinates of x is one of 256 values. For a
// block of kSignLanes examples (one vector lane each: 8 with AVX2, 16 with AVX-512) those 256 sums are
// tabulated once per 8 coordinates (256 adds), after which every output column costs one table load and one
// add per 8 coordinates: 8 · kSignLanes multiply-adds of the GEMM formulation for the price of one vector add.
// The scale 1/√k is applied once at the end. Every lane sums in the same order whatever the lane count, so all
// builds give bitwise equal results.

namespace attrprims {
namespace AP_ISA_NS {

constexpr int64_t kSignGroup = 8;    // rows of P (coordinates of x) per sign byte
// Sign bytes whose tables are held together: 4 x 8 KiB (AVX2), or 4 x 16 KiB (AVX-512: past L1, but measured
// faster than 2 x 16 KiB, which passes over the accumulators twice as often).
constexpr int64_t kTableGroups = 4;
#if defined(__AVX512F__)
typedef float vsign __attribute__((vector_size(64)));
constexpr int64_t kSignLanes = 16;   // examples per block, one per lane
#else
typedef v8f vsign;
constexpr int64_t kSignLanes = 8;
#endif

static inline vsign load_sign_lanes(const float* p) {
  vsign v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

/// Transpose of an 8x8 bit matrix held as bit 8i+j = element (i, j) (Hacker's Delight, transpose8).
static inline uint64_t transpose_bits8(uint64_t x) {
  uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
  x ^= t ^ (t << 28);
  return x;
}

/// signs[g * k + j], for local groups g in [g0, g1): bit t set iff P[offset + r0 + 8g + t, j] < 0
/// (rows at or past r1 give clear bits).
static void rademacher_sign_bytes(const ProjectArgs& a, int64_t r0, int64_t r1, int64_t g0, int64_t g1,
                                  uint8_t* signs) {
  const int64_t k = a.spec.k;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t first = r0 + kSignGroup * g, rows = min64(kSignGroup, r1 - first);
    for (int64_t blk = 0; blk * kRademacherColsPerCall < k; ++blk) {
      uint32_t w[kSignGroup][4] = {};
      for (int64_t t = 0; t < rows; ++t) {
        const U32x4 u = projection_words(a.spec.seed, kTagRademacher, static_cast<uint64_t>(a.offset + first + t),
                                         static_cast<uint32_t>(blk));
        for (int q = 0; q < 4; ++q) w[t][q] = u.v[q];
      }
      // Byte b of `gathered` is byte `byte` of row b's word q; transposed, byte b holds bit b of every row.
      alignas(8) uint8_t bytes[kRademacherColsPerCall];
      for (int q = 0; q < 4; ++q) {
        for (int byte = 0; byte < 4; ++byte) {
          uint64_t gathered = 0;
          for (int t = 0; t < kSignGroup; ++t)
            gathered |= static_cast<uint64_t>((w[t][q] >> (8 * byte)) & 0xFFu) << (8 * t);
          const uint64_t transposed = transpose_bits8(gathered);
          std::memcpy(bytes + 32 * q + 8 * byte, &transposed, 8);
        }
      }
      const int64_t col0 = blk * kRademacherColsPerCall;
      std::memcpy(signs + g * k + col0, bytes, static_cast<size_t>(min64(kRademacherColsPerCall, k - col0)));
    }
  }
}

/// table[m] = Σ_t (bit t of m ? -x_t : x_t) for the 8 coordinate vectors x[0..7] (kSignLanes examples each).
static void build_sign_table(const float* x, vsign* table) {
  constexpr int64_t L = kSignLanes;
  vsign lo[16], hi[16];
  const vsign x0 = load_sign_lanes(x), x1 = load_sign_lanes(x + L), x2 = load_sign_lanes(x + 2 * L);
  const vsign x3 = load_sign_lanes(x + 3 * L), x4 = load_sign_lanes(x + 4 * L), x5 = load_sign_lanes(x + 5 * L);
  const vsign x6 = load_sign_lanes(x + 6 * L), x7 = load_sign_lanes(x + 7 * L);
  for (int m = 0; m < 16; ++m) {
    lo[m] = ((m & 1) ? -x0 : x0) + ((m & 2) ? -x1 : x1) + (((m & 4) ? -x2 : x2) + ((m & 8) ? -x3 : x3));
    hi[m] = ((m & 1) ? -x4 : x4) + ((m & 2) ? -x5 : x5) + (((m & 4) ? -x6 : x6) + ((m & 8) ? -x7 : x7));
  }
  for (int h = 0; h < 16; ++h)
    for (int l = 0; l < 16; ++l) table[16 * h + l] = hi[h] + lo[l];
}

/// out[i0:i0+L, j0:j1] = (add ? out + : ) (1/√k) · x[i0:i0+L, r0:r1] @ sign(P[offset+r0 : offset+r1, j0:j1]) for
/// L = kSignLanes, from the sign bytes of rows r0..r1 (rows past n are skipped).
static void rademacher_sign_table_block(const ProjectArgs& a, const uint8_t* signs, int64_t r0, int64_t r1,
                                        int64_t i0, int64_t j0, int64_t j1, bool add) {
  constexpr int64_t L = kSignLanes;
  const int64_t k = a.spec.k, width = j1 - j0, lanes = min64(L, a.n - i0);
  const int64_t groups = (r1 - r0 + kSignGroup - 1) / kSignGroup;
  Buffer<vsign> acc(width), table(kTableGroups * 256);  // acc[j] holds column j0 + j
  std::memset(static_cast<void*>(acc.p), 0, sizeof(vsign) * static_cast<size_t>(width));
  alignas(64) float xt[kTableGroups * kSignGroup * L];  // xt[L * t + lane] = x[i0 + lane, coordinate t]
  for (int64_t g0 = 0; g0 < groups; g0 += kTableGroups) {
    const int64_t ng = min64(kTableGroups, groups - g0);
    for (int64_t t = 0; t < ng * kSignGroup; ++t) {
      const int64_t r = r0 + kSignGroup * g0 + t;
      for (int64_t lane = 0; lane < L; ++lane)
        xt[L * t + lane] =
            lane < lanes && r < r1 ? load_as_float(a.in, a.in_dtype, (i0 + lane) * a.in_row_stride + r) : 0.0f;
    }
    for (int64_t g = 0; g < ng; ++g) build_sign_table(xt + kSignGroup * L * g, table.p + 256 * g);
    const uint8_t* sg = signs + g0 * k + j0;
    int64_t j = 0;
    for (; j + 8 <= width; j += 8) {
      vsign s0 = acc.p[j], s1 = acc.p[j + 1], s2 = acc.p[j + 2], s3 = acc.p[j + 3];
      vsign s4 = acc.p[j + 4], s5 = acc.p[j + 5], s6 = acc.p[j + 6], s7 = acc.p[j + 7];
      for (int64_t g = 0; g < ng; ++g) {
        uint64_t b;
        std::memcpy(&b, sg + g * k + j, 8);
        const vsign* t = table.p + 256 * g;
        s0 += t[b & 255];
        s1 += t[(b >> 8) & 255];
        s2 += t[(b >> 16) & 255];
        s3 += t[(b >> 24) & 255];
        s4 += t[(b >> 32) & 255];
        s5 += t[(b >> 40) & 255];
        s6 += t[(b >> 48) & 255];
        s7 += t[b >> 56];
      }
      acc.p[j] = s0, acc.p[j + 1] = s1, acc.p[j + 2] = s2, acc.p[j + 3] = s3;
      acc.p[j + 4] = s4, acc.p[j + 5] = s5, acc.p[j + 6] = s6, acc.p[j + 7] = s7;
    }
    for (; j < width; ++j)
      for (int64_t g = 0; g < ng; ++g) acc.p[j] += table.p[256 * g + sg[g * k + j]];
  }
  const float scale = dense_scale(k);
  for (int64_t lane = 0; lane < lanes; ++lane) {
    float* o = a.out + (i0 + lane) * a.out_row_stride + j0;
    for (int64_t jj = 0; jj < width; ++jj) {
      const float v = acc.p[jj][lane] * scale;
      o[jj] = add ? o[jj] + v : v;
    }
  }
}

}  // namespace AP_ISA_NS
}  // namespace attrprims
