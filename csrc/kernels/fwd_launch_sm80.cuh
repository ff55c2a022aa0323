// Launch template of the SM80 forward. Included once per instantiation
// (fwd_sm80_<dtype>_hdim<D>.cu), so that each .cu compiles one kernel.
#pragma once

#include "kernels/cuda_check.h"
#include "kernels/fwd_kernel_sm80.cuh"
#include "kernels/fwd_sm80.h"

namespace gqa::kernels {

template <typename Element, int kHeadDim>
int FwdSm80<Element, kHeadDim>::ctas_per_sm(int device) {
  using Traits = FwdTraitsSm80<Element, kHeadDim>;
  // Per device: the opt-in above 48 KB and the occupancy both depend on it.
  static int cached[64] = {};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    auto kernel = &gqa_fwd_sm80_kernel<Traits>;
    GQA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
    int n = 0;
    GQA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Traits::kNThreads, Traits::kSmemBytes));
    cached[device] = n > 0 ? n : 1;
  }
  return cached[device];
}

template <typename Element, int kHeadDim>
void FwdSm80<Element, kHeadDim>::run(const FwdParams& params, cudaStream_t stream) {
  using Traits = FwdTraitsSm80<Element, kHeadDim>;
  int device = 0;
  GQA_CUDA_CHECK(cudaGetDevice(&device));
  ctas_per_sm(device);  // raises the shared-memory limit once per device
  const int rows = params.seqlen_q * (params.pack_gqa ? params.heads_q / params.heads_kv : 1);
  const dim3 grid((rows + Traits::kBlockM - 1) / Traits::kBlockM, params.pack_gqa ? params.heads_kv : params.heads_q,
                  params.batch * params.num_splits);
  gqa_fwd_sm80_kernel<Traits><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
  GQA_CUDA_CHECK_LAUNCH();
}

}  // namespace gqa::kernels
