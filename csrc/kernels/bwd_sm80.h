// The SM80 backward instantiations, one per (dtype, head dim), each defined
// in its own .cu file (bwd_sm80_<dtype>_hdim<D>.cu) to keep compiles short
// and parallel.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/numeric_types.h>

#include "kernels/bwd_params.h"

namespace gqa::kernels {

template <typename Element, int kHeadDim>
struct BwdSm80 {
  static void run(const BwdParams& params, cudaStream_t stream);
};

}  // namespace gqa::kernels
