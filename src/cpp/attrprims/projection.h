// The seeded projection matrix P [p, k]: argument structs and the per-entry math shared by CPU and CUDA.
//
// P is never stored. Entry P[r, c] is a pure function of (seed, kind, r, c) through Philox-4x32-10 with
// counter (block, r_lo, r_hi, tag): one call gives 128 Rademacher signs (columns 128b..128b+127 of row
// r), 4 Gaussians (columns 4b..4b+3), or 4 of row r's SJLT nonzeros. All float math goes through the
// exact_* helpers, so P is bit-identical on every device and under every tiling.
#pragma once

#include "attrprims/common.h"
#include "attrprims/counter_rng.h"

namespace attrprims {

/// Distribution of P's entries.
enum class Kind : int32_t {
  rademacher = 0,  ///< ±1/√k
  gaussian = 1,    ///< N(0, 1)/√k (Box-Muller on 24-bit uniforms: |z| <= 5.77)
  sjlt = 2,        ///< s nonzeros ±1/√s per row, one in each of s near-equal column blocks
};

/// Everything that defines P: two specs that compare equal give the same matrix.
struct ProjectionSpec {
  uint64_t seed = 0;
  Kind kind = Kind::rademacher;
  int64_t k = 1;  ///< output dimension (columns of P)
  int64_t s = 1;  ///< SJLT nonzeros per row, 1 <= s <= k; ignored for dense kinds
};

/// One projection call. project: in [n, c] -> out [n, k] = in @ P[offset:offset+c, :].
/// project_transpose: in [n, k] -> out [n, c] = in @ P[offset:offset+c, :]^T.
/// Rows are `*_row_stride` elements apart; the last dimension is contiguous.
struct ProjectArgs {
  ProjectionSpec spec;
  int64_t n = 0;       ///< rows (examples)
  int64_t c = 0;       ///< rows of P used (the chunk length)
  int64_t offset = 0;  ///< first row of P used
  const void* in = nullptr;
  DType in_dtype = DType::f32;
  int64_t in_row_stride = 0;
  float* out = nullptr;  ///< float32
  int64_t out_row_stride = 0;
  bool accumulate = false;  ///< out += result instead of out = result
  int num_threads = 1;      ///< CPU worker threads (ignored by CUDA)
};

/// Materialise P[offset:offset+c, :] into out [c, k] (float32, row stride out_row_stride).
struct MaterializeArgs {
  ProjectionSpec spec;
  int64_t offset = 0;
  int64_t c = 0;
  float* out = nullptr;
  int64_t out_row_stride = 0;
  int num_threads = 1;
};

/// Largest supported k (column indices stay in int32 on the GPU).
constexpr int64_t kMaxK = (int64_t{1} << 31) - 1;
/// Largest supported row index + 1 of P.
constexpr int64_t kMaxRows = int64_t{1} << 62;

/// Philox stream tags: different kinds with one seed draw from disjoint counter spaces.
constexpr uint32_t kTagRademacher = 0x52414431u;  // "RAD1"
constexpr uint32_t kTagGaussian = 0x47415531u;    // "GAU1"
constexpr uint32_t kTagSjlt = 0x534A4C31u;        // "SJL1"

/// Columns of P covered by one Philox call, per dense kind.
constexpr int64_t kRademacherColsPerCall = 128;
constexpr int64_t kGaussianColsPerCall = 4;

/// Philox output for (row, block) of the stream `tag`.
AP_HD U32x4 projection_words(uint64_t seed, uint32_t tag, uint64_t row, uint32_t block) {
  return philox4x32_10(U32x4{{block, static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), tag}}, seed);
}

/// Scale of the dense kinds, 1/√k rounded once to float (computed on the host for every device).
static inline float dense_scale(int64_t k) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(k))); }
/// Magnitude of an SJLT nonzero, 1/√s.
static inline float sjlt_value(int64_t s) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(s))); }

/// Rademacher entry (row, col): bit col % 32 of word (col / 32) % 4 of projection_words(.., row, col / 128);
/// a set bit means -scale.
AP_HD float rademacher_entry(uint32_t word, int bit, float scale) { return ((word >> bit) & 1u) ? -scale : scale; }

/// ln(u) for u in (0, 1], from float +,*,/ only (so it is reproducible bit for bit): u = m 2^e with
/// m in [√½, √2), ln m = 2 atanh((m-1)/(m+1)) by its series to s^9 (error < 1e-9).
AP_HD float unit_log(float u) {
  const uint32_t bits = float_bits(u);
  // Mantissa in [1, 2); above √2 halve it (exponent - 1, exact) and count one more power of two.
  const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;
  const uint32_t big = mbits > 0x3FB504F3u;  // float_bits(1.41421354f)
  const float m = bits_float(mbits - (big << 23));
  const int e = static_cast<int>(bits >> 23) - 127 + static_cast<int>(big);
  const float s = exact_div(exact_add(m, -1.0f), exact_add(m, 1.0f));
  const float s2 = exact_mul(s, s);
  float poly = exact_add(0.142857143f, exact_mul(s2, 0.111111111f));
  poly = exact_add(0.2f, exact_mul(s2, poly));
  poly = exact_add(0.333333333f, exact_mul(s2, poly));
  poly = exact_add(1.0f, exact_mul(s2, poly));
  const float ln_m = exact_mul(exact_mul(2.0f, s), poly);
  return exact_add(exact_mul(static_cast<float>(e), 0.693147181f), ln_m);
}

/// cos and sin of (q + f)·π/2 for quadrant q in 0..3 and f in [0, 1), by Taylor polynomials on [0, π/2).
AP_HD void quarter_turn_cos_sin(uint32_t q, float f, float* cos_out, float* sin_out) {
  const float t = exact_mul(f, 1.57079637f);
  const float t2 = exact_mul(t, t);
  float sp = exact_add(2.75573192e-06f, exact_mul(t2, -2.50521084e-08f));
  sp = exact_add(-1.98412698e-04f, exact_mul(t2, sp));
  sp = exact_add(8.33333333e-03f, exact_mul(t2, sp));
  sp = exact_add(-1.66666667e-01f, exact_mul(t2, sp));
  sp = exact_add(1.0f, exact_mul(t2, sp));
  const float sn = exact_mul(t, sp);
  float cp = exact_add(-2.75573192e-07f, exact_mul(t2, 2.08767570e-09f));
  cp = exact_add(2.48015873e-05f, exact_mul(t2, cp));
  cp = exact_add(-1.38888889e-03f, exact_mul(t2, cp));
  cp = exact_add(4.16666667e-02f, exact_mul(t2, cp));
  cp = exact_add(-0.5f, exact_mul(t2, cp));
  const float cs = exact_add(1.0f, exact_mul(t2, cp));
  // Rotating by q quarter turns: (cos, sin) -> (c,s), (-s,c), (-c,-s), (s,-c); selects and sign flips
  // are done on the bits so that the loop over calls vectorises.
  const uint32_t odd = 0u - (q & 1u);
  const uint32_t cbits = float_bits(cs), sbits = float_bits(sn);
  *cos_out = bits_float(((sbits & odd) | (cbits & ~odd)) ^ (((q ^ (q >> 1)) & 1u) << 31));
  *sin_out = bits_float(((cbits & odd) | (sbits & ~odd)) ^ ((q >> 1) << 31));
}

/// Two standard normals from two random words (Box-Muller): u = (a>>8 + 1)/2^24 in (0, 1],
/// angle = (b>>30 + ((b>>8) & 0x3FFFFF)/2^22)·π/2.
AP_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u = exact_mul(static_cast<float>((a >> 8) + 1u), 5.9604644775390625e-08f);
  const float radius = exact_sqrt(exact_mul(-2.0f, unit_log(u)));
  float cs, sn;
  quarter_turn_cos_sin(b >> 30, exact_mul(static_cast<float>((b >> 8) & 0x3FFFFFu), 2.384185791015625e-07f), &cs,
                       &sn);
  *z0 = exact_mul(radius, cs);
  *z1 = exact_mul(radius, sn);
}

/// The four unscaled normals z of Gaussian Philox call b: P[row, 4b + i] = exact_mul(z[i], dense_scale(k)).
AP_HD void gaussian4(const U32x4& w, float z[4]) {
  box_muller(w.v[0], w.v[1], &z[0], &z[1]);
  box_muller(w.v[2], w.v[3], &z[2], &z[3]);
}

/// Column of SJLT nonzero j (0 <= j < s) of a row, whose sign is word & 1 (set: negative), where
/// word = projection_words(seed, kTagSjlt, row, j / 4).v[j % 4]. Column block j is [j·k/s, (j+1)·k/s);
/// the column inside it comes from the word's top 31 bits, so the s columns of a row are distinct.
AP_HD int64_t sjlt_column(uint32_t word, int64_t j, int64_t k, int64_t s) {
  const int64_t lo = j * k / s, width = (j + 1) * k / s - lo;
  return lo + static_cast<int64_t>((static_cast<uint64_t>(word >> 1) * static_cast<uint64_t>(width)) >> 31);
}

/// The word of SJLT nonzero j of `row` (one Philox call serves nonzeros 4·(j/4) .. 4·(j/4)+3).
AP_HD uint32_t sjlt_word(uint64_t seed, uint64_t row, int64_t j) {
  return word_at(projection_words(seed, kTagSjlt, row, static_cast<uint32_t>(j >> 2)), j & 3);
}

}  // namespace attrprims
