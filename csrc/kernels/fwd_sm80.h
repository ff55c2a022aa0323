// The SM80 forward instantiations, one per (dtype, head dim), each defined
// in its own .cu file (fwd_sm80_<dtype>_hdim<D>.cu) to keep compiles short
// and parallel.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/numeric_types.h>

#include "kernels/fwd_params.h"

namespace gqa::kernels {

template <typename Element, int kHeadDim>
struct FwdSm80 {
  static void run(const FwdParams& params, cudaStream_t stream);
  // Resident thread blocks per multiprocessor, for the split heuristic.
  static int ctas_per_sm(int device);
};

}  // namespace gqa::kernels
