// CPU entry points of scoring with a fused per-row top-k.
#pragma once

#include "attrprims/score_topk.h"

namespace attrprims {

/// Throw std::invalid_argument naming the field when `args` is inconsistent (used by the CUDA entry point too).
void check_score_topk_args(const ScoreTopkArgs& args);

/// Merge the scores (a_i · b_j)·w_j of this call into each row's running top/bottom lists, leaving them sorted
/// best-first. Scores are fp32 dot products in a fixed order and ranking is total, so the result is bitwise
/// independent of num_threads.
void score_topk_cpu(const ScoreTopkArgs& args);

}  // namespace attrprims
