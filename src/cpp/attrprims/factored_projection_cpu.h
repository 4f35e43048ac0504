// CPU entry points of the factored projection.
#pragma once

#include "attrprims/factored_projection.h"

namespace attrprims {

/// Throw std::invalid_argument naming the field when `args` is inconsistent (used by the CUDA entry point too).
void check_factored_project_args(const FactoredProjectArgs& args);

/// out [n, k_out·k_in] = (delta_i P_out)ᵀ (a_i P_in) per example (or +=, with accumulate). Bitwise independent
/// of num_threads and of the other examples of the batch; multithreaded over examples.
void factored_project_cpu(const FactoredProjectArgs& args);

}  // namespace attrprims
