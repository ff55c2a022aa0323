// Merging attention results over disjoint key sets (e.g. the parts of a
// cache attended separately) by the log-sum-exp rule. No torch types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/fwd_params.h"

namespace gqa::kernels {

struct MergeStatesParams {
  // outs (N, R, D) and lses (N, R) float32, contiguous; out (R, D) in outs'
  // dtype and lse (R) float32, contiguous.
  const void* outs;
  const float* lses;
  void* out;
  float* lse;
  int64_t num_parts, rows, head_dim;
  DType dtype;  // float32, float16 or bfloat16
};

// lse = log(sum_i exp(lses_i)), out = sum_i exp(lses_i - lse) * outs_i in
// float32. Parts of weight 0 (lse -inf) are skipped, whatever their outs
// hold; a row whose parts are all -inf gets out 0 and lse -inf. Throws
// std::runtime_error on a CUDA error.
void run_merge_states(const MergeStatesParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
