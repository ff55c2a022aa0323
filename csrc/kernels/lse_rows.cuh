// Query rows numbered as lse numbers them, for the kernels that walk them one
// row at a time (split-KV combine, the backward's pre- and postprocessing),
// and the packed 4-element stores they share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/fwd_params.h"

namespace gqa::kernels {

// Rows (b * Hq + h) * Sq + pos, or h * Tq + t for packed sequences.
__host__ __device__ inline int64_t lse_rows(const FwdParams& p) {
  return p.cu_seqlens_q != nullptr ? int64_t(p.heads_q) * p.total_q : int64_t(p.batch) * p.heads_q * p.seqlen_q;
}

// Element offset of lse row `row` in a (B, Sq, Hq, D) tensor with these
// strides, or a (Tq, Hq, D) one for packed sequences.
__device__ inline int64_t lse_row_offset(const FwdParams& p, int64_t row, int64_t batch_stride, int64_t row_stride,
                                         int64_t head_stride) {
  if (p.cu_seqlens_q != nullptr) return row % p.total_q * row_stride + row / p.total_q * head_stride;
  const int64_t bh = row / p.seqlen_q;
  return bh / p.heads_q * batch_stride + row % p.seqlen_q * row_stride + bh % p.heads_q * head_stride;
}

__device__ __forceinline__ void store4(__half* dst, float4 v) {
  reinterpret_cast<__half2*>(dst)[0] = __floats2half2_rn(v.x, v.y);
  reinterpret_cast<__half2*>(dst)[1] = __floats2half2_rn(v.z, v.w);
}

__device__ __forceinline__ void store4(__nv_bfloat16* dst, float4 v) {
  reinterpret_cast<__nv_bfloat162*>(dst)[0] = __floats2bfloat162_rn(v.x, v.y);
  reinterpret_cast<__nv_bfloat162*>(dst)[1] = __floats2bfloat162_rn(v.z, v.w);
}

}  // namespace gqa::kernels
