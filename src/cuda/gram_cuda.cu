// CUDA Gram accumulation G += Xᵀ X: one block per 64 x 64 tile of the lower triangle of G.
//
// f32/f64 inputs: fp64 FMAs from 16-row shared-memory tiles, 4 x 4 outputs per thread (products of floats
// are exact in fp64). f16/bf16 inputs: tensor cores (WMMA 16x16x16, fp32 accumulate), four warps of 32 x 32;
// every kSlice rows the fp32 fragments are flushed into per-thread fp64 sums, so fp32 rounding covers at
// most kSlice rows. Each tile belongs to one block and sums rows in a fixed order: no atomics, reproducible.
#include <mma.h>

#include <string>

#include "attrprims/gram_cpu.h"
#include "cuda_api.h"
#include "cuda_check.h"
#include "device_guard.h"
#include "projection_tiles.cuh"

namespace attrprims {
namespace {

constexpr int kTile = 64;    // rows and columns of G per block
constexpr int kDepth = 16;   // rows of X per shared-memory step
constexpr int kSlice = 256;  // rows of X per fp32 tensor-core slice
constexpr int kFmaThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 register tile
constexpr int kTcThreads = 128;   // 4 warps, each owning a 32 x 32 quarter of the tile

template <typename T>
__device__ __forceinline__ double load_double(const T* p) {
  return static_cast<double>(load_float(p));
}
template <>
__device__ __forceinline__ double load_double<double>(const double* p) {
  return *p;
}

/// Tile (ti, tj), ti >= tj, of the lower triangle from the block's linear index u = ti·(ti+1)/2 + tj.
__device__ __forceinline__ void tile_of(int64_t u, int64_t& ti, int64_t& tj) {
  ti = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(u) + 1.0) - 1.0) / 2.0);
  while (ti * (ti + 1) / 2 > u) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= u) ++ti;
  tj = u - ti * (ti + 1) / 2;
}

/// G[row, col] += v (fp64) or its Kahan-compensated fp32 form, when (row, col) is inside G.
__device__ __forceinline__ void add_entry(const GramUpdateArgs& a, int64_t row, int64_t col, double v) {
  if (row >= a.k || col >= a.k) return;
  const int64_t at = row * a.g_row_stride + col;
  if (a.g_f32) {
    gram_add_compensated(static_cast<float*>(a.g) + at, a.comp + at, static_cast<float>(v));
  } else {
    gram_add(static_cast<double*>(a.g) + at, v);
  }
}

/// f32/f64 inputs: fp64 FMA tiles.
template <typename T>
__global__ void __launch_bounds__(kFmaThreads) gram_fma_kernel(GramUpdateArgs a) {
  __shared__ double xi[kDepth][kTile + 1];
  __shared__ double xj[kDepth][kTile + 1];
  int64_t ti, tj;
  tile_of(blockIdx.x, ti, tj);
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const T* x = static_cast<const T*>(a.x);
  double acc[4][4] = {};
  for (int64_t r0 = 0; r0 < a.b; r0 += kDepth) {
    for (int e = tid; e < kDepth * kTile; e += kFmaThreads) {
      const int r = e / kTile, c = e % kTile;
      const bool row_ok = r0 + r < a.b;
      const T* src = x + (r0 + r) * a.x_row_stride;
      xi[r][c] = row_ok && i0 + c < a.k ? load_double(src + i0 + c) : 0.0;
      xj[r][c] = row_ok && j0 + c < a.k ? load_double(src + j0 + c) : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kDepth; ++r)
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[m][q] = fma(xi[r][ty * 4 + m], xj[r][tx * 4 + q], acc[m][q]);
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) add_entry(a, i0 + ty * 4 + m, j0 + tx * 4 + q, acc[m][q]);
}

/// f16/bf16 inputs: tensor cores with fp32 fragments, flushed to fp64 every kSlice rows.
template <typename T>
__global__ void __launch_bounds__(kTcThreads) gram_tensor_core_kernel(GramUpdateArgs a) {
  namespace wmma = nvcuda::wmma;
  constexpr int kLd = kTile + 8;  // multiple of 8 elements, as WMMA requires for 16-bit types
  constexpr int kOutLd = kTile + 4;
  constexpr int kPerThread = kTile * kTile / kTcThreads;
  __shared__ __align__(32) T xi[kDepth][kLd];
  __shared__ __align__(32) T xj[kDepth][kLd];
  __shared__ __align__(32) float out[kTile][kOutLd];
  int64_t ti, tj;
  tile_of(blockIdx.x, ti, tj);
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const T* x = static_cast<const T*>(a.x);
  const T zero = static_cast<T>(0.0f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
  double sums[kPerThread] = {};
  for (int64_t s0 = 0; s0 < a.b; s0 += kSlice) {
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n) wmma::fill_fragment(c[m][n], 0.0f);
    const int64_t s1 = min(a.b, s0 + kSlice);
    for (int64_t r0 = s0; r0 < s1; r0 += kDepth) {
      for (int e = tid; e < kDepth * kTile; e += kTcThreads) {
        const int r = e / kTile, col = e % kTile;
        const bool row_ok = r0 + r < s1;
        const T* src = x + (r0 + r) * a.x_row_stride;
        xi[r][col] = row_ok && i0 + col < a.k ? src[i0 + col] : zero;
        xj[r][col] = row_ok && j0 + col < a.k ? src[j0 + col] : zero;
      }
      __syncthreads();
      // A = X[rows, i-tile]ᵀ is X's tile read column-major; B = X[rows, j-tile] read row-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) wmma::load_matrix_sync(fa[m], &xi[0][wm * 32 + m * 16], kLd);
#pragma unroll
      for (int n = 0; n < 2; ++n) wmma::load_matrix_sync(fb[n], &xj[0][wn * 32 + n * 16], kLd);
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n) wmma::mma_sync(c[m][n], fa[m], fb[n], c[m][n]);
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n)
        wmma::store_matrix_sync(&out[wm * 32 + m * 16][wn * 32 + n * 16], c[m][n], kOutLd, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int idx = e * kTcThreads + tid;
      sums[e] += static_cast<double>(out[idx / kTile][idx % kTile]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int idx = e * kTcThreads + tid;
    add_entry(a, i0 + idx / kTile, j0 + idx % kTile, sums[e]);
  }
}

}  // namespace

void gram_update_cuda(const GramUpdateArgs& a, int device, cudaStream_t stream) {
  check_gram_update_args(a);
  const int64_t tiles = (a.k + kTile - 1) / kTile, blocks = tiles * (tiles + 1) / 2;
  AP_CHECK(blocks <= int64_t{0x7FFFFFFF}, "k", "must be <= " + std::to_string(kTile * 65535) + " on CUDA");
  if (a.b == 0 || a.k == 0) return;
  DeviceGuard guard(device);
  const auto grid = static_cast<unsigned>(blocks);
  switch (a.x_dtype) {
    case DType::f64: gram_fma_kernel<double><<<grid, kFmaThreads, 0, stream>>>(a); break;
    case DType::f32: gram_fma_kernel<float><<<grid, kFmaThreads, 0, stream>>>(a); break;
    case DType::f16: gram_tensor_core_kernel<__half><<<grid, kTcThreads, 0, stream>>>(a); break;
    default: gram_tensor_core_kernel<__nv_bfloat16><<<grid, kTcThreads, 0, stream>>>(a); break;
  }
  AP_CUDA_LAUNCH_CHECK("gram_update_cuda");
}

}  // namespace attrprims
