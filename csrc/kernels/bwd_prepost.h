// The backward's row-wise passes (bwd_prepost.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/bwd_params.h"

namespace gqa::kernels {

// dsum[row] = rowsum(dout * out), in fp32.
void run_bwd_dot_do_o(const BwdParams& params, cudaStream_t stream);

// dq = dq_accum * softmax_scale, in dq's dtype.
void run_bwd_convert_dq(const BwdParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
