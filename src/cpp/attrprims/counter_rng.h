// Philox-4x32-10 (Salmon et al., SC'11): the counter-based RNG that defines every random matrix here.
#pragma once

#include "attrprims/common.h"

namespace attrprims {

/// Four 32-bit words: a Philox counter or its output.
struct U32x4 {
  uint32_t v[4];
};

/// Philox-4x32 with 10 rounds: a pure function of (counter, 64-bit key). Matches the Random123
/// known-answer vectors; tests/reference.py reimplements it in NumPy and checks it bit for bit.
AP_HD U32x4 philox4x32_10(U32x4 ctr, uint64_t key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  uint32_t c0 = ctr.v[0], c1 = ctr.v[1], c2 = ctr.v[2], c3 = ctr.v[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
#if defined(__CUDA_ARCH__)
    const uint32_t hi0 = __umulhi(kMul0, c0), lo0 = kMul0 * c0;
    const uint32_t hi1 = __umulhi(kMul1, c2), lo1 = kMul1 * c2;
#else
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0, p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
#endif
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

/// w.v[i] for a run-time i in 0..3, by selects: an indexed load would put w in GPU local memory.
AP_HD uint32_t word_at(const U32x4& w, int64_t i) {
  return i == 0 ? w.v[0] : i == 1 ? w.v[1] : i == 2 ? w.v[2] : w.v[3];
}

}  // namespace attrprims
