// The (dtype, head dim) instantiation that serves a call: the forward's and
// the backward's kernels are instantiated for the same ones.
#pragma once

#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "kernels/fwd_params.h"
#include "kernels/fwd_tiles.h"

namespace gqa::kernels {

// Calls fn.template operator()<Element, kHeadDim>() for the instantiation
// that serves params.
template <class Fn>
auto dispatch_sm80(const FwdParams& params, Fn&& fn) {
  const int d = fwd_round_head_dim(params.head_dim);
  if (params.head_dim <= 0 || params.head_dim > kMaxHeadDim || params.head_dim % 8 != 0) {
    throw std::invalid_argument("gqa_ext: the CUDA kernels take head dims that are multiples of 8 up to " +
                                std::to_string(kMaxHeadDim) + ", got " + std::to_string(params.head_dim));
  }
  if (params.dtype != DType::kFloat16 && params.dtype != DType::kBFloat16) {
    throw std::invalid_argument("gqa_ext: the CUDA kernels take float16 and bfloat16 only");
  }
  if (params.dtype == DType::kFloat16) {
    if (d == 64) return fn.template operator()<cutlass::half_t, 64>();
    if (d == 128) return fn.template operator()<cutlass::half_t, 128>();
    return fn.template operator()<cutlass::half_t, 256>();
  }
  if (d == 64) return fn.template operator()<cutlass::bfloat16_t, 64>();
  if (d == 128) return fn.template operator()<cutlass::bfloat16_t, 128>();
  return fn.template operator()<cutlass::bfloat16_t, 256>();
}

}  // namespace gqa::kernels
