// Launch template of the SM80 backward. Included once per instantiation
// (bwd_sm80_<dtype>_hdim<D>.cu), so that each .cu compiles one kernel.
#pragma once

#include "kernels/bwd_kernel_sm80.cuh"
#include "kernels/bwd_sm80.h"
#include "kernels/cuda_check.h"

namespace gqa::kernels {

template <typename Element, int kHeadDim>
void BwdSm80<Element, kHeadDim>::run(const BwdParams& params, cudaStream_t stream) {
  using Traits = BwdTraitsSm80<Element, kHeadDim>;
  auto kernel = &gqa_bwd_sm80_kernel<Traits>;
  // Per device: the opt-in above 48 KB of shared memory.
  static bool smem_raised[64] = {};
  int device = 0;
  GQA_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64 || !smem_raised[device]) {
    GQA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
    if (device >= 0 && device < 64) smem_raised[device] = true;
  }
  const dim3 grid((params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, params.heads_kv, params.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
  GQA_CUDA_CHECK_LAUNCH();
}

}  // namespace gqa::kernels
