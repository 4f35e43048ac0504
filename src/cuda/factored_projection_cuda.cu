// CUDA factored projection out_i = (delta_i P_out)ᵀ (a_i P_in): one block per (example, 64 x 64 tile of out_i).
//
// For each block of kTileT positions the block makes U_a = a_blk P_in[:, j-tile] and U_d = delta_blk
// P_out[:, o-tile] (64 x 64 each) in shared memory from kTileD-deep tiles of the inputs and of P, then adds
// U_dᵀ U_a into the out tile, which it keeps in registers (4 x 4 per thread). Features and positions are summed
// in a fixed order with fp32 FMAs: no atomics, so results are bitwise reproducible run to run.
#include <string>

#include "attrprims/factored_projection_cpu.h"
#include "cuda_api.h"
#include "cuda_check.h"
#include "device_guard.h"
#include "projection_tiles.cuh"

namespace attrprims {
namespace {

constexpr int kThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 register tile
constexpr int kTileK = 64;     // rows (o) and columns (j) of out_i per block
constexpr int kTileT = 64;     // positions per step
constexpr int kTileD = 16;     // features per shared-memory tile of inputs and P
constexpr int kLd = kTileK + 4;  // padded shared rows: 16-byte aligned, fewer bank conflicts (kTileT == kTileK)
constexpr int64_t kMaxGrid = 65535;

/// Shared memory of one block: 43.5 KiB, under the 48 KiB static limit.
struct Tiles {
  float xs[kTileD][kLd];   ///< input tile, transposed: xs[feature][position]
  float ps[kTileD][kLd];   ///< P tile: ps[feature][column]
  float ua[kTileT][kLd];   ///< U_a tile: ua[position][j]
  float ud[kTileT][kLd];   ///< U_d tile: ud[position][o]
};

/// acc[m][q] += u[m]·v[q]: one step of a thread's 4 x 4 register tile.
__device__ __forceinline__ void outer_fma(float acc[4][4], float4 u, float4 v) {
  const float us[4] = {u.x, u.y, u.z, u.w}, vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[m][q] = fmaf(us[m], vs[q], acc[m][q]);
}

/// dst[s][c] = Σ_f x[s, f]·p[f, c0 + c] for s < kTileT, c < kTileK: x rows (positions) x_stride elements apart,
/// `rows` of them valid, `depth` features; p rows p_stride apart, columns past k read as 0. Thread (ty, tx) makes
/// positions 4ty..4ty+3 of columns 4tx..4tx+3. Ends with every thread past its last read of sm.xs / sm.ps.
template <typename T>
__device__ void project_tile(const T* x, int64_t x_stride, int rows, int64_t depth, const float* p, int64_t p_stride,
                             int64_t c0, int64_t k, Tiles& sm, float (*dst)[kLd]) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  for (int64_t f0 = 0; f0 < depth; f0 += kTileD) {
    for (int e = tid; e < kTileT * kTileD; e += kThreads) {
      const int s = e / kTileD, f = e % kTileD;
      sm.xs[f][s] = s < rows && f0 + f < depth ? load_float(x + s * x_stride + f0 + f) : 0.0f;
    }
    for (int e = tid; e < kTileD * kTileK; e += kThreads) {
      const int f = e / kTileK, c = e % kTileK;
      sm.ps[f][c] = f0 + f < depth && c0 + c < k ? p[(f0 + f) * p_stride + c0 + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < kTileD; ++f)
      outer_fma(acc, *reinterpret_cast<const float4*>(&sm.xs[f][ty * 4]),
                *reinterpret_cast<const float4*>(&sm.ps[f][tx * 4]));
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) dst[ty * 4 + m][tx * 4 + q] = acc[m][q];
}

/// Block (i, jt, ot) writes out_i[64·ot.., 64·jt..]; T is the dtype of a and delta.
template <typename T>
__global__ void __launch_bounds__(kThreads) factored_project_kernel(FactoredProjectArgs a) {
  __shared__ __align__(16) Tiles sm;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTileK, o0 = static_cast<int64_t>(blockIdx.z) * kTileK;
  const T* a_rows = static_cast<const T*>(a.a) + i * a.a_stride_n;
  const T* d_rows = static_cast<const T*>(a.delta) + i * a.delta_stride_n;
  float acc[4][4] = {};
  for (int64_t t0 = 0; t0 < a.t; t0 += kTileT) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTileT), a.t - t0));
    project_tile(a_rows + t0 * a.a_stride_t, a.a_stride_t, rows, a.d_in, a.p_in, a.p_in_row_stride, j0, a.k_in, sm,
                 sm.ua);
    project_tile(d_rows + t0 * a.delta_stride_t, a.delta_stride_t, rows, a.d_out, a.p_out, a.p_out_row_stride, o0,
                 a.k_out, sm, sm.ud);
    __syncthreads();
    for (int s = 0; s < rows; ++s)
      outer_fma(acc, *reinterpret_cast<const float4*>(&sm.ud[s][ty * 4]),
                *reinterpret_cast<const float4*>(&sm.ua[s][tx * 4]));
    __syncthreads();  // ua / ud are rewritten next step (without an inner barrier when a depth is 0)
  }
  float* out = a.out + i * a.out_row_stride;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t o = o0 + ty * 4 + m;
    if (o >= a.k_out) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + tx * 4 + q;
      if (j < a.k_in) put_factored_output(out + factored_out_col(o, j, a.k_in), acc[m][q], a.accumulate);
    }
  }
}

int64_t tiles(int64_t k) { return (k + kTileK - 1) / kTileK; }

template <typename T>
void launch(const FactoredProjectArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.n), static_cast<unsigned>(tiles(a.k_in)),
                  static_cast<unsigned>(tiles(a.k_out)));
  factored_project_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  AP_CUDA_LAUNCH_CHECK("factored_project_kernel");
}

}  // namespace

void factored_project_cuda(const FactoredProjectArgs& a, int device, cudaStream_t stream) {
  check_factored_project_args(a);
  AP_CHECK(a.n <= int64_t{0x7FFFFFFF}, "n", "must be < 2^31 examples per CUDA call");
  AP_CHECK(tiles(a.k_in) <= kMaxGrid, "k_in", "must be <= " + std::to_string(kMaxGrid * kTileK) + " on CUDA");
  AP_CHECK(tiles(a.k_out) <= kMaxGrid, "k_out", "must be <= " + std::to_string(kMaxGrid * kTileK) + " on CUDA");
  if (a.n == 0 || (a.t == 0 && a.accumulate)) return;
  DeviceGuard guard(device);
  dispatch_input_type(a.a_dtype, "a_dtype", [&](auto x) { launch<decltype(x)>(a, stream); });
}

}  // namespace attrprims
