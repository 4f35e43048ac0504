// Host entry points of the CUDA kernels; includes no CUDA header (cudaStream_t is forward-declared).
#pragma once

#include <string>

#include "attrprims/factored_projection.h"
#include "attrprims/gram.h"
#include "attrprims/projection.h"
#include "attrprims/score_topk.h"

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace attrprims {

/// Bytes of device workspace project_cuda needs for `args` (0 when it writes `out` directly).
int64_t project_workspace_bytes_cuda(const ProjectArgs& args);

/// out [n, k] = in [n, c] @ P[offset:offset+c] on `device`, enqueued on `stream` (no host sync).
/// Dense kinds split c over a fixed number of slices (a function of n, c, k only, not of the GPU) and
/// sum the slices in a fixed order, so results are reproducible; sjlt sums with atomics.
void project_cuda(const ProjectArgs& args, void* workspace, int64_t workspace_bytes, int device, cudaStream_t stream);

/// out [n, c] = in [n, k] @ P[offset:offset+c]^T on `device`, enqueued on `stream`.
void project_transpose_cuda(const ProjectArgs& args, int device, cudaStream_t stream);

/// out [c, k] = P[offset:offset+c], bit-identical to materialize_cpu.
void materialize_cuda(const MaterializeArgs& args, int device, cudaStream_t stream);

/// out [n, k_out·k_in] = (delta_i P_out)ᵀ (a_i P_in) per example on `device`, enqueued on `stream`. One block
/// per (example, 64 x 64 tile of out_i), summing in a fixed order: bitwise reproducible, no atomics.
void factored_project_cuda(const FactoredProjectArgs& args, int device, cudaStream_t stream);

/// Lower triangle of G += Xᵀ X on `device`, enqueued on `stream`: one block per 64 x 64 tile, rows summed in a
/// fixed order (fp64, or fp32 tensor-core slices of 256 rows for f16/bf16), so results are reproducible.
void gram_update_cuda(const GramUpdateArgs& args, int device, cudaStream_t stream);

/// Bytes of device workspace score_topk_cuda needs for `args` (segment heaps and the merge area).
int64_t score_topk_workspace_bytes_cuda(const ScoreTopkArgs& args);

/// Merge the scores (a_i · b_j)·w_j into each row's running top/bottom lists on `device`, enqueued on `stream`.
/// Blocks of 64 test rows x a training segment keep heaps in shared memory (so top + bottom is bounded by the
/// GPU's shared memory per block), then one thread per row merges; bitwise reproducible.
void score_topk_cuda(const ScoreTopkArgs& args, void* workspace, int64_t workspace_bytes, int device,
                     cudaStream_t stream);

/// What the CUDA runtime reports on this machine: devices (0 with `error` set when none is usable).
struct CudaRuntimeInfo {
  int device_count = 0;
  std::string error;
  int runtime_version = 0;
  int driver_version = 0;
};
CudaRuntimeInfo cuda_runtime_info();

}  // namespace attrprims
