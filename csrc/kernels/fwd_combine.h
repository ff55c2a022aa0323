#pragma once

#include <cuda_runtime_api.h>

#include "kernels/fwd_params.h"

namespace gqa::kernels {

// The most splits the combine kernel merges.
int fwd_combine_max_splits();

// out and lse from params.out_accum and params.lse_accum (num_splits > 1).
void run_fwd_combine(const FwdParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
