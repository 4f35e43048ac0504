// CUDA forward projection out = in @ P (dense: FMA or tensor-core tiles of P made in shared memory;
// sjlt: scatter with atomics) and the materialisation of P.
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "attrprims/projection_cpu.h"
#include "cuda_api.h"
#include "cuda_check.h"
#include "device_guard.h"
#include "projection_tiles.cuh"

namespace attrprims {
namespace {

constexpr int kThreads = 256;
constexpr int kTileN = 128;  // output columns per block: one Rademacher Philox call per row of P
constexpr int kTileC = 32;   // rows of P per shared-memory tile

/// Rows of P handled by slice z of [0, c) split into `slices` pieces (multiples of kTileC).
struct Slice {
  int64_t lo, hi;
};
__device__ __forceinline__ Slice slice_of(int64_t c, int slices, int z) {
  const int64_t per = ((c + slices - 1) / slices + kTileC - 1) / kTileC * kTileC;
  const int64_t lo = min(c, per * z);
  return {lo, min(c, lo + per)};
}

/// Writes a finished output value: to `out` (optionally accumulating) or to this slice's workspace.
struct OutputSink {
  float* dst;      // out, or workspace + z·n·k
  int64_t ld;      // row stride of dst
  bool accumulate; // only when writing out directly
  __device__ __forceinline__ void put(int64_t i, int64_t j, float v) const {
    float* p = dst + i * ld + j;
    *p = accumulate ? *p + v : v;
  }
};

__device__ __forceinline__ OutputSink sink_for(const ProjectArgs& a, float* workspace, int slices) {
  if (slices == 1) return {a.out, a.out_row_stride, a.accumulate};
  return {workspace + static_cast<int64_t>(blockIdx.z) * a.n * a.spec.k, a.spec.k, false};
}

/// FMA kernel, any input type: block = BM rows x 128 columns of out; thread = (BM/16) x 8 outputs.
/// Each 32 x 128 tile of P is generated once into shared memory and used by all BM rows.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) project_fma_kernel(ProjectArgs a, float scale, float* workspace, int slices) {
  constexpr int TM = BM / 16;
  __shared__ float xs[kTileC][BM + 4];
  __shared__ __align__(16) float ps[kTileC][kTileN + 4];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM, j0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const Slice sl = slice_of(a.c, slices, blockIdx.z);
  const T* x = static_cast<const T*>(a.in);
  float acc[TM][8] = {};
  for (int64_t r0 = sl.lo; r0 < sl.hi; r0 += kTileC) {
    for (int e = tid; e < BM * kTileC; e += kThreads) {
      const int i = e / kTileC, r = e % kTileC;
      const bool valid = i0 + i < a.n && r0 + r < sl.hi;
      xs[r][i] = valid ? load_float(x + (i0 + i) * a.in_row_stride + r0 + r) : 0.0f;
    }
    {  // 32 rows x 128 columns of P: thread -> (row tid / 8, 16 columns)
      const int rr = tid / 8, cg = (tid % 8) * 16;
      dense_run<16>(a.spec, static_cast<uint64_t>(a.offset + r0 + rr), j0 + cg, scale, &ps[rr][cg], 1);
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < kTileC; ++r) {
      float av[TM], bv[8];
#pragma unroll
      for (int m = 0; m < TM; ++m) av[m] = xs[r][ty * TM + m];
      const float4 b0 = *reinterpret_cast<const float4*>(&ps[r][tx * 8]);
      const float4 b1 = *reinterpret_cast<const float4*>(&ps[r][tx * 8 + 4]);
      bv[0] = b0.x, bv[1] = b0.y, bv[2] = b0.z, bv[3] = b0.w, bv[4] = b1.x, bv[5] = b1.y, bv[6] = b1.z, bv[7] = b1.w;
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][j] = fmaf(av[m], bv[j], acc[m][j]);
    }
    __syncthreads();
  }
  const OutputSink sink = sink_for(a, workspace, slices);
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int64_t i = i0 + ty * TM + m;
    if (i >= a.n) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = j0 + tx * 8 + j;
      if (col < a.spec.k) sink.put(i, col, acc[m][j]);
    }
  }
}

/// Tensor-core kernel for fp16/bf16 input (sm_80+): block = BM rows x 128 columns, 8 warps of WMMA
/// 16x16x16 tiles, fp32 accumulation. P is generated unscaled (±1 exact; Gaussian z as a hi + lo pair of
/// T, about 16 bits of mantissa) and the scale is applied in fp32 at the end.
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) project_wmma_kernel(ProjectArgs a, float scale, float* workspace, int slices) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int WM = BM == 16 ? 1 : 2, WN = 8 / WM;          // warps along rows / columns
  constexpr int FM = BM / (16 * WM), FN = kTileN / (16 * WN);  // 16x16 fragments per warp
  constexpr int LDA = kTileC + 8, LDB = kTileN + 8, LDC = kTileN + 4;
  constexpr int kInBytes = (BM * LDA + 2 * kTileC * LDB) * 2, kOutBytes = BM * LDC * 4;
  __shared__ __align__(128) unsigned char smem[kInBytes > kOutBytes ? kInBytes : kOutBytes];
  T* as = reinterpret_cast<T*>(smem);
  T* bhi = as + BM * LDA;
  T* blo = bhi + kTileC * LDB;
  float* cs = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, warp = tid / 32, wm = warp / WN, wn = warp % WN;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM, j0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const Slice sl = slice_of(a.c, slices, blockIdx.z);
  const T* x = static_cast<const T*>(a.in);
  const bool gaussian = a.spec.kind == Kind::gaussian;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) wmma::fill_fragment(acc[fm][fn], 0.0f);

  for (int64_t r0 = sl.lo; r0 < sl.hi; r0 += kTileC) {
    for (int e = tid; e < BM * kTileC; e += kThreads) {
      const int i = e / kTileC, r = e % kTileC;
      const bool valid = i0 + i < a.n && r0 + r < sl.hi;
      as[i * LDA + r] = valid ? x[(i0 + i) * a.in_row_stride + r0 + r] : T(0.0f);
    }
    {
      const int rr = tid / 8, cg = (tid % 8) * 16;
      const uint64_t row = static_cast<uint64_t>(a.offset + r0 + rr);
      T* hi = bhi + rr * LDB + cg;
      if (!gaussian) {
        float v[16];
        rademacher_run<16>(a.spec.seed, row, j0 + cg, 1.0f, v, 1);
#pragma unroll
        for (int b = 0; b < 16; ++b) hi[b] = T(v[b]);
      } else {
        T* lo = blo + rr * LDB + cg;
#pragma unroll
        for (int q = 0; q < 16; q += 4) {
          float z[4];
          gaussian_run(a.spec.seed, row, j0 + cg + q, z);
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const T h = T(z[b]);
            hi[q + b] = h;
            lo[q + b] = T(z[b] - static_cast<float>(h));
          }
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[FM];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) wmma::load_matrix_sync(af[fm], as + (wm * FM * 16 + fm * 16) * LDA + kk, LDA);
#pragma unroll
      for (int fn = 0; fn < FN; ++fn) {
        const int col = wn * FN * 16 + fn * 16;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, bhi + kk * LDB + col, LDB);
#pragma unroll
        for (int fm = 0; fm < FM; ++fm) wmma::mma_sync(acc[fm][fn], af[fm], bf, acc[fm][fn]);
        if (gaussian) {
          wmma::load_matrix_sync(bf, blo + kk * LDB + col, LDB);
#pragma unroll
          for (int fm = 0; fm < FM; ++fm) wmma::mma_sync(acc[fm][fn], af[fm], bf, acc[fm][fn]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn)
      wmma::store_matrix_sync(cs + (wm * FM * 16 + fm * 16) * LDC + wn * FN * 16 + fn * 16, acc[fm][fn], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  const OutputSink sink = sink_for(a, workspace, slices);
  for (int e = tid; e < BM * kTileN; e += kThreads) {
    const int i = e / kTileN, j = e % kTileN;
    if (i0 + i < a.n && j0 + j < a.spec.k) sink.put(i0 + i, j0 + j, cs[i * LDC + j] * scale);
  }
#else
  __trap();  // never launched: the host picks the FMA kernel below sm_80
#endif
}

/// out = (accumulate ? out : 0) + sum over slices of workspace, in slice order (deterministic).
__global__ void reduce_slices_kernel(ProjectArgs a, const float* workspace, int slices) {
  const int64_t total = a.n * a.spec.k;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < slices; ++z) s += workspace[z * total + e];
    const int64_t i = e / a.spec.k, j = e % a.spec.k;
    float* p = a.out + i * a.out_row_stride + j;
    *p = a.accumulate ? *p + s : s;
  }
}

/// SJLT: thread per (row r of P, nonzero j) scatters v·x[i, r] into out[i, col] for all n rows.
template <typename T>
__global__ void project_sjlt_kernel(ProjectArgs a, float value) {
  const int64_t s = a.spec.s, total = a.c * s;
  const T* x = static_cast<const T*>(a.in);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / s, j = e % s;
    const uint32_t word = sjlt_word(a.spec.seed, static_cast<uint64_t>(a.offset + r), j);
    const int64_t col = sjlt_column(word, j, a.spec.k, s);
    const float v = (word & 1u) ? -value : value;
    for (int64_t i = 0; i < a.n; ++i) atomicAdd(a.out + i * a.out_row_stride + col, v * load_float(x + i * a.in_row_stride + r));
  }
}

/// Dense materialisation: thread per (row, group of 4 columns).
__global__ void materialize_dense_kernel(MaterializeArgs a, float scale) {
  const int64_t groups = (a.spec.k + 3) / 4, total = a.c * groups;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / groups, col0 = (e % groups) * 4;
    const uint64_t row = static_cast<uint64_t>(a.offset + r);
    float v[4];
    dense_run<4>(a.spec, row, col0, scale, v, 1);
    for (int b = 0; b < 4 && col0 + b < a.spec.k; ++b) a.out[r * a.out_row_stride + col0 + b] = v[b];
  }
}

/// SJLT materialisation (out already zeroed): thread per (row, nonzero).
__global__ void materialize_sjlt_kernel(MaterializeArgs a, float value) {
  const int64_t s = a.spec.s, total = a.c * s;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / s, j = e % s;
    const uint32_t word = sjlt_word(a.spec.seed, static_cast<uint64_t>(a.offset + r), j);
    a.out[r * a.out_row_stride + sjlt_column(word, j, a.spec.k, s)] = (word & 1u) ? -value : value;
  }
}

int grid_for(int64_t total, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65535 * 8)));
}

/// Slices of c for the dense kernels: enough blocks to fill any current GPU (~1024), each slice at least
/// 2048 rows of P, workspace at most 256 MiB. Depends on (n, c, k) only, so results do not depend on the GPU.
int dense_slices(const ProjectArgs& a, int bm) {
  const int64_t tiles = ((a.spec.k + kTileN - 1) / kTileN) * ((a.n + bm - 1) / bm);
  int64_t slices = std::min<int64_t>((1024 + tiles - 1) / tiles, (a.c + 2047) / 2048);
  slices = std::min<int64_t>(slices, (int64_t{64} << 20) / std::max<int64_t>(1, a.n * a.spec.k));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(slices, 65535)));
}

int tile_rows(const ProjectArgs& a) { return a.n <= 16 ? 16 : 64; }

void check_cuda_args(const ProjectArgs& a, int64_t in_cols, int64_t out_cols) {
  check_spec(a.spec);
  AP_CHECK(a.n >= 0 && a.c >= 0 && a.offset >= 0 && a.offset <= kMaxRows - a.c, "offset", "must be >= 0, offset + c < 2^62");
  AP_CHECK(a.n <= 1 || a.in_row_stride >= in_cols, "in_row_stride", "must be >= the row length");
  AP_CHECK(a.n <= 1 || a.out_row_stride >= out_cols, "out_row_stride", "must be >= the row length");
  AP_CHECK(a.n <= int64_t{65535} * 16, "n", "must be <= 1048560 rows per CUDA call");
}

template <typename T>
void launch_dense(const ProjectArgs& a, float* workspace, int slices, bool tensor_cores, cudaStream_t stream) {
  const int bm = tile_rows(a);
  const dim3 grid(static_cast<unsigned>((a.spec.k + kTileN - 1) / kTileN), static_cast<unsigned>((a.n + bm - 1) / bm),
                  static_cast<unsigned>(slices));
  const float scale = dense_scale(a.spec.k);
  if constexpr (!std::is_same<T, float>::value) {
    if (tensor_cores) {
      if (bm == 16) {
        project_wmma_kernel<T, 16><<<grid, kThreads, 0, stream>>>(a, scale, workspace, slices);
      } else {
        project_wmma_kernel<T, 64><<<grid, kThreads, 0, stream>>>(a, scale, workspace, slices);
      }
      AP_CUDA_LAUNCH_CHECK("project_wmma_kernel");
      return;
    }
  }
  if (bm == 16) {
    project_fma_kernel<T, 16><<<grid, kThreads, 0, stream>>>(a, scale, workspace, slices);
  } else {
    project_fma_kernel<T, 64><<<grid, kThreads, 0, stream>>>(a, scale, workspace, slices);
  }
  AP_CUDA_LAUNCH_CHECK("project_fma_kernel");
}

template <typename T>
void launch_project(const ProjectArgs& a, float* workspace, int64_t workspace_bytes, int device, cudaStream_t stream) {
  if (a.spec.kind == Kind::sjlt) {
    if (!a.accumulate)
      AP_CUDA_CHECK(cudaMemset2DAsync(a.out, a.out_row_stride * 4, 0, a.spec.k * 4, a.n, stream), "cudaMemset2DAsync");
    if (a.c == 0) return;
    project_sjlt_kernel<T><<<grid_for(a.c * a.spec.s, kThreads), kThreads, 0, stream>>>(a, sjlt_value(a.spec.s));
    AP_CUDA_LAUNCH_CHECK("project_sjlt_kernel");
    return;
  }
  const int slices = dense_slices(a, tile_rows(a));
  AP_CHECK(slices == 1 || workspace_bytes >= project_workspace_bytes_cuda(a), "workspace",
           "smaller than project_workspace_bytes_cuda(args)");
  int major = 0;
  AP_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  launch_dense<T>(a, workspace, slices, major >= 8, stream);
  if (slices > 1) {
    reduce_slices_kernel<<<grid_for(a.n * a.spec.k, kThreads), kThreads, 0, stream>>>(a, workspace, slices);
    AP_CUDA_LAUNCH_CHECK("reduce_slices_kernel");
  }
}

}  // namespace

int64_t project_workspace_bytes_cuda(const ProjectArgs& a) {
  if (a.spec.kind == Kind::sjlt || a.n == 0 || a.c == 0) return 0;
  const int slices = dense_slices(a, tile_rows(a));
  return slices == 1 ? 0 : int64_t{4} * slices * a.n * a.spec.k;
}

void project_cuda(const ProjectArgs& a, void* workspace, int64_t workspace_bytes, int device, cudaStream_t stream) {
  check_cuda_args(a, a.c, a.spec.k);
  if (a.n == 0) return;
  DeviceGuard guard(device);
  float* ws = static_cast<float*>(workspace);
  dispatch_input_type(a.in_dtype, "in_dtype", [&](auto x) {
    launch_project<decltype(x)>(a, ws, workspace_bytes, device, stream);
  });
}

void materialize_cuda(const MaterializeArgs& a, int device, cudaStream_t stream) {
  check_spec(a.spec);
  AP_CHECK(a.c >= 0 && a.offset >= 0 && a.offset <= kMaxRows - a.c, "offset", "must be >= 0, offset + c < 2^62");
  AP_CHECK(a.c <= 1 || a.out_row_stride >= a.spec.k, "out_row_stride", "must be >= k");
  if (a.c == 0) return;
  DeviceGuard guard(device);
  if (a.spec.kind == Kind::sjlt) {
    AP_CUDA_CHECK(cudaMemset2DAsync(a.out, a.out_row_stride * 4, 0, a.spec.k * 4, a.c, stream), "cudaMemset2DAsync");
    materialize_sjlt_kernel<<<grid_for(a.c * a.spec.s, kThreads), kThreads, 0, stream>>>(a, sjlt_value(a.spec.s));
    AP_CUDA_LAUNCH_CHECK("materialize_sjlt_kernel");
    return;
  }
  materialize_dense_kernel<<<grid_for(a.c * ((a.spec.k + 3) / 4), kThreads), kThreads, 0, stream>>>(a, dense_scale(a.spec.k));
  AP_CUDA_LAUNCH_CHECK("materialize_dense_kernel");
}

}  // namespace attrprims
