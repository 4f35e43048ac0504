// CPU entry points of the seeded projection.
#pragma once

#include "attrprims/projection.h"

namespace attrprims {

/// Throw std::invalid_argument naming the field when `spec` cannot define a matrix (used by the CUDA entry points too).
void check_spec(const ProjectionSpec& spec);

/// out [n, k] = in [n, c] @ P[offset:offset+c, :] (or +=, with accumulate). Bitwise independent of
/// num_threads and of the other rows of the batch; multithreaded over output tiles.
void project_cpu(const ProjectArgs& args);

/// out [n, c] = in [n, k] @ P[offset:offset+c, :]^T (or +=, with accumulate).
void project_transpose_cpu(const ProjectArgs& args);

/// out [c, k] = P[offset:offset+c, :], exactly.
void materialize_cpu(const MaterializeArgs& args);

}  // namespace attrprims
