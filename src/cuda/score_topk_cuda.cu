// CUDA scoring with a fused per-row top-k: blocks of 64 test rows x one segment of the training rows.
//
// A block computes 64 x 64 score tiles with fp32 FMAs from 16-deep shared-memory tiles (4 x 4 per thread),
// weights them, and 64 of its threads (one per test row) offer the tile's scores to that row's heaps in
// shared memory. Segment heaps go to a workspace; a second kernel merges them with the running lists, one
// thread per row. The number of segments depends only on m and n, every score is summed in the same order,
// and ranking is a total order, so results are bitwise reproducible and independent of the GPU model.
#include <algorithm>
#include <string>

#include "attrprims/score_topk_cpu.h"
#include "cuda_api.h"
#include "cuda_check.h"
#include "device_guard.h"
#include "projection_tiles.cuh"

namespace attrprims {
namespace {

constexpr int kTile = 64;     // test rows per block, and training rows per tile
constexpr int kDepth = 16;    // features per shared-memory step
constexpr int kThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 register tile
constexpr int kLd = kTile + 4;
constexpr int64_t kMinSegment = 1024;  // training rows per segment, at least
constexpr int64_t kTargetBlocks = 512;  // enough blocks for 2+ waves on today's GPUs (not a function of the GPU)

int64_t row_tiles(int64_t m) { return (m + kTile - 1) / kTile; }

int64_t segments_for(const ScoreTopkArgs& a) {
  const int64_t wanted = (kTargetBlocks + row_tiles(a.m) - 1) / row_tiles(a.m);
  return std::max<int64_t>(1, std::min(wanted, a.n / kMinSegment));
}

size_t shared_bytes(int64_t slots) {
  return sizeof(float) * (2 * kDepth * kLd + kTile * (kTile + 1)) + (sizeof(float) + sizeof(int64_t)) * kTile * slots;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) score_topk_kernel(ScoreTopkArgs a, int64_t segments, float* ws_values,
                                                              int64_t* ws_indices) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t slots = a.top + a.bottom;
  int64_t* hi = reinterpret_cast<int64_t*>(smem);  // [kTile][slots] heap indices (8-byte aligned first)
  float* hv = reinterpret_cast<float*>(hi + kTile * slots);  // [kTile][slots] heap values
  float(*as)[kLd] = reinterpret_cast<float(*)[kLd]>(hv + kTile * slots);
  float(*bs)[kLd] = as + kDepth;
  float(*tile)[kTile + 1] = reinterpret_cast<float(*)[kTile + 1]>(bs + kDepth);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile, s = blockIdx.y;
  const int64_t j0 = a.n * s / segments, j1 = a.n * (s + 1) / segments;
  const T* b = static_cast<const T*>(a.b);
  for (int64_t e = tid; e < kTile * slots; e += kThreads) hi[e] = -1;
  for (int64_t c0 = j0; c0 < j1; c0 += kTile) {
    float acc[4][4] = {};
    for (int64_t d0 = 0; d0 < a.k; d0 += kDepth) {
      for (int e = tid; e < kTile * kDepth; e += kThreads) {
        const int r = e / kDepth, d = e % kDepth;
        const bool depth_ok = d0 + d < a.k;
        as[d][r] = depth_ok && i0 + r < a.m ? a.a[(i0 + r) * a.a_row_stride + d0 + d] : 0.0f;
        bs[d][r] = depth_ok && c0 + r < j1 ? load_float(b + (c0 + r) * a.b_row_stride + d0 + d) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kDepth; ++d)
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[m][q] = fmaf(as[d][ty * 4 + m], bs[d][tx * 4 + q], acc[m][q]);
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t col = c0 + tx * 4 + q;
        tile[ty * 4 + m][tx * 4 + q] = a.w != nullptr && col < j1 ? acc[m][q] * a.w[col] : acc[m][q];
      }
    __syncthreads();
    if (tid < kTile && i0 + tid < a.m) {
      float* v = hv + tid * slots;
      int64_t* x = hi + tid * slots;
      const int cols = static_cast<int>(min(static_cast<int64_t>(kTile), j1 - c0));
      for (int c = 0; c < cols; ++c) {
        const int64_t index = a.index_offset + c0 + c;
        heap_offer(v, x, a.top, tile[tid][c], index, true);
        heap_offer(v + a.top, x + a.top, a.bottom, tile[tid][c], index, false);
      }
    }
    __syncthreads();
  }
  if (tid < kTile && i0 + tid < a.m) {
    const int64_t at = (s * a.m + i0 + tid) * slots;
    for (int64_t e = 0; e < slots; ++e) {
      ws_values[at + e] = hv[tid * slots + e];
      ws_indices[at + e] = hi[tid * slots + e];
    }
  }
}

/// One thread per test row: the running lists and every segment's heap through one heap (in the workspace's
/// merge area), sorted best-first into the running lists.
__global__ void score_topk_merge_kernel(ScoreTopkArgs a, int64_t segments, const float* ws_values,
                                        const int64_t* ws_indices, float* merge_values, int64_t* merge_indices) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.m) return;
  const int64_t slots = a.top + a.bottom;
  for (int side = 0; side < 2; ++side) {
    const bool largest = side == 0;
    const int64_t size = largest ? a.top : a.bottom, offset = largest ? 0 : a.top;
    if (size == 0) continue;
    float* list_v = largest ? a.top_values + i * a.top_row_stride : a.bottom_values + i * a.bottom_row_stride;
    int64_t* list_i = largest ? a.top_indices + i * a.top_row_stride : a.bottom_indices + i * a.bottom_row_stride;
    float* v = merge_values + i * slots + offset;
    int64_t* x = merge_indices + i * slots + offset;
    for (int64_t t = 0; t < size; ++t) x[t] = -1;
    for (int64_t t = 0; t < size; ++t) heap_offer(v, x, size, list_v[t], list_i[t], largest);
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t at = (s * a.m + i) * slots + offset;
      for (int64_t t = 0; t < size; ++t) heap_offer(v, x, size, ws_values[at + t], ws_indices[at + t], largest);
    }
    heap_sort_best_first(v, x, size, largest);
    for (int64_t t = 0; t < size; ++t) {
      list_v[t] = v[t];
      list_i[t] = x[t];
    }
  }
}

template <typename T>
void launch(const ScoreTopkArgs& a, int64_t segments, float* ws_values, int64_t* ws_indices, int device,
            cudaStream_t stream) {
  const int64_t slots = a.top + a.bottom;
  const size_t bytes = shared_bytes(slots);
  int limit = 0;
  AP_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                "cudaDeviceGetAttribute");
  AP_CHECK(bytes <= static_cast<size_t>(limit), "top",
           "top + bottom = " + std::to_string(slots) + " needs " + std::to_string(bytes) +
               " bytes of shared memory per block; this GPU allows " + std::to_string(limit));
  AP_CUDA_CHECK(cudaFuncSetAttribute(score_topk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(bytes)),
                "cudaFuncSetAttribute(score_topk_kernel)");
  const dim3 grid(static_cast<unsigned>(row_tiles(a.m)), static_cast<unsigned>(segments));
  score_topk_kernel<T><<<grid, kThreads, bytes, stream>>>(a, segments, ws_values, ws_indices);
  AP_CUDA_LAUNCH_CHECK("score_topk_kernel");
}

}  // namespace

int64_t score_topk_workspace_bytes_cuda(const ScoreTopkArgs& a) {
  check_score_topk_args(a);
  const int64_t cells = (segments_for(a) + 1) * a.m * (a.top + a.bottom);
  return cells * static_cast<int64_t>(sizeof(float) + sizeof(int64_t));
}

void score_topk_cuda(const ScoreTopkArgs& a, void* workspace, int64_t workspace_bytes, int device,
                     cudaStream_t stream) {
  check_score_topk_args(a);
  const int64_t slots = a.top + a.bottom;
  AP_CHECK(row_tiles(a.m) <= int64_t{0x7FFFFFFF}, "m", "too many test rows for one CUDA call");
  if (a.m == 0 || a.n == 0 || slots == 0) return;
  const int64_t segments = segments_for(a);
  AP_CHECK(workspace_bytes >= score_topk_workspace_bytes_cuda(a), "workspace_bytes",
           "must be >= score_topk_workspace_bytes_cuda(args), got " + std::to_string(workspace_bytes));
  AP_CHECK(workspace != nullptr, "workspace", "null pointer");
  // Workspace: int64 indices first (8-byte alignment), then float values; segments, then the merge area.
  const int64_t cells = (segments + 1) * a.m * slots;
  int64_t* ws_indices = static_cast<int64_t*>(workspace);
  float* ws_values = reinterpret_cast<float*>(ws_indices + cells);
  const int64_t merge_at = segments * a.m * slots;
  DeviceGuard guard(device);
  dispatch_input_type(a.b_dtype, "b_dtype", [&](auto x) {
    launch<decltype(x)>(a, segments, ws_values, ws_indices, device, stream);
  });
  const int threads = 128;
  score_topk_merge_kernel<<<static_cast<unsigned>((a.m + threads - 1) / threads), threads, 0, stream>>>(
      a, segments, ws_values, ws_indices, ws_values + merge_at, ws_indices + merge_at);
  AP_CUDA_LAUNCH_CHECK("score_topk_merge_kernel");
}

}  // namespace attrprims
