#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/fwd_params.h"

namespace gqa::kernels {

// The most splits the combine kernel merges.
int fwd_combine_max_splits();

// Rows of lse, each with a partial per split: B * Hq * Sq, or Hq * Tq for
// packed sequences.
int64_t fwd_combine_rows(const FwdParams& params);

// out and lse from params.out_accum and params.lse_accum (num_splits > 1).
void run_fwd_combine(const FwdParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
