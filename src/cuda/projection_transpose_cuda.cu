// CUDA transposed projection out = in @ P^T (k -> p, for mapping projected vectors back).
#include <algorithm>

#include "attrprims/projection_cpu.h"
#include "cuda_api.h"
#include "cuda_check.h"
#include "device_guard.h"
#include "projection_tiles.cuh"

namespace attrprims {
namespace {

constexpr int kThreads = 256;
constexpr int kTileRows = 64;  // rows of `in` per block
constexpr int kTileP = 64;     // rows of P (output columns) per block
constexpr int kTileK = 32;     // columns of P per shared-memory tile

/// Dense: block = 64 rows x 64 output columns, thread = 4 x 4; the 64 x 32 tile of P is made in shared
/// memory, transposed so that the inner loop reads it along P's rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) project_transpose_fma_kernel(ProjectArgs a, float scale) {
  __shared__ float ys[kTileK][kTileRows + 4];
  __shared__ float ps[kTileK][kTileP + 4];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileP, i0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const T* y = static_cast<const T*>(a.in);
  float acc[4][4] = {};
  for (int64_t c0 = 0; c0 < a.spec.k; c0 += kTileK) {
    for (int e = tid; e < kTileRows * kTileK; e += kThreads) {
      const int i = e / kTileK, cc = e % kTileK;
      const bool valid = i0 + i < a.n && c0 + cc < a.spec.k;
      ys[cc][i] = valid ? load_float(y + (i0 + i) * a.in_row_stride + c0 + cc) : 0.0f;
    }
    {  // 64 rows x 32 columns of P: thread -> (row tid / 4, 8 columns)
      const int rr = tid / 4, cg = (tid % 4) * 8;
      dense_run<8>(a.spec, static_cast<uint64_t>(a.offset + r0 + rr), c0 + cg, scale, &ps[cg][rr], kTileP + 4);
    }
    __syncthreads();
#pragma unroll 4
    for (int cc = 0; cc < kTileK; ++cc) {
      float av[4], bv[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) av[m] = ys[cc][ty * 4 + m];
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = ps[cc][tx * 4 + q];
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[m][q] = fmaf(av[m], bv[q], acc[m][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t i = i0 + ty * 4 + m;
    if (i >= a.n) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t r = r0 + tx * 4 + q;
      if (r >= a.c) continue;
      float* p = a.out + i * a.out_row_stride + r;
      *p = a.accumulate ? *p + acc[m][q] : acc[m][q];
    }
  }
}

/// SJLT: thread per output (i, r) gathers its s nonzeros (deterministic, no atomics).
template <typename T>
__global__ void project_transpose_sjlt_kernel(ProjectArgs a, float value) {
  const int64_t s = a.spec.s, total = a.n * a.c;
  const T* y = static_cast<const T*>(a.in);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / a.c, r = e % a.c;
    const uint64_t row = static_cast<uint64_t>(a.offset + r);
    float acc = 0.0f;
    for (int64_t jb = 0; jb < s; jb += 4) {
      const U32x4 w = projection_words(a.spec.seed, kTagSjlt, row, static_cast<uint32_t>(jb >> 2));
      for (int64_t j = jb; j < min(s, jb + 4); ++j) {
        const uint32_t word = word_at(w, j & 3);
        const float v = (word & 1u) ? -value : value;
        acc += v * load_float(y + i * a.in_row_stride + sjlt_column(word, j, a.spec.k, s));
      }
    }
    float* p = a.out + i * a.out_row_stride + r;
    *p = a.accumulate ? *p + acc : acc;
  }
}

template <typename T>
void launch(const ProjectArgs& a, cudaStream_t stream) {
  if (a.spec.kind == Kind::sjlt) {
    const int64_t blocks = std::min<int64_t>((a.n * a.c + kThreads - 1) / kThreads, 65535 * 8);
    project_transpose_sjlt_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, sjlt_value(a.spec.s));
    AP_CUDA_LAUNCH_CHECK("project_transpose_sjlt_kernel");
    return;
  }
  const dim3 grid(static_cast<unsigned>((a.c + kTileP - 1) / kTileP), static_cast<unsigned>((a.n + kTileRows - 1) / kTileRows));
  project_transpose_fma_kernel<T><<<grid, kThreads, 0, stream>>>(a, dense_scale(a.spec.k));
  AP_CUDA_LAUNCH_CHECK("project_transpose_fma_kernel");
}

}  // namespace

void project_transpose_cuda(const ProjectArgs& a, int device, cudaStream_t stream) {
  check_spec(a.spec);
  AP_CHECK(a.n >= 0 && a.c >= 0 && a.offset >= 0 && a.offset <= kMaxRows - a.c, "offset", "must be >= 0, offset + c < 2^62");
  AP_CHECK(a.n <= 1 || a.in_row_stride >= a.spec.k, "in_row_stride", "must be >= k");
  AP_CHECK(a.n <= 1 || a.out_row_stride >= a.c, "out_row_stride", "must be >= c");
  AP_CHECK(a.n <= int64_t{65535} * kTileRows, "n", "must be <= 4194240 rows per CUDA call");
  AP_CHECK((a.c + kTileP - 1) / kTileP <= int64_t{0x7FFFFFFF}, "c", "too many rows of P for one CUDA call");
  if (a.n == 0 || a.c == 0) return;
  DeviceGuard guard(device);
  dispatch_input_type(a.in_dtype, "in_dtype", [&](auto x) { launch<decltype(x)>(a, stream); });
}

}  // namespace attrprims
