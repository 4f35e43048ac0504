// CPU entry points of the streaming Gram accumulation.
#pragma once

#include "attrprims/gram.h"

namespace attrprims {

/// Throw std::invalid_argument naming the field when `args` is inconsistent (used by the CUDA entry point too).
void check_gram_update_args(const GramUpdateArgs& args);

/// Lower triangle of G += Xᵀ X (blocked SYRK with fp64 products and sums). Every entry of G is summed over
/// the rows of X in the same order whatever num_threads is, so results are bitwise independent of it.
void gram_update_cpu(const GramUpdateArgs& args);

}  // namespace attrprims
