// The CUDA backward's interface to the op layer: the forward's params plus
// the gradients and the workspace, and a stream; no torch types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/fwd_params.h"

namespace gqa::kernels {

// The FwdParams part describes q, k, v, out and lse as the forward saw them
// (dense or packed, same shapes and options); split-KV, seqused_k and paged
// K/V are not used. dout, dq (like q and out), dk and dv (like k and v) have
// the same alignment rules.
struct BwdParams : FwdParams {
  const void* dout;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  void* dq;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  void* dk;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  void* dv;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  // Workspace, float32, with rows indexed like lse (R = B * Hq * Sq rows, or
  // Hq * Tq for packed sequences): dq_accum (R, head_dim), zeroed by the
  // caller, collects dQ; dsum (R) receives rowsum(dout * out).
  float* dq_accum;
  float* dsum;

  // deterministic: the thread blocks add their parts of dQ in a fixed order,
  // ordered by dq_semaphore (bwd_semaphore_count ints, zeroed by the caller).
  bool deterministic;
  int* dq_semaphore;
};

// Ints the caller allocates (zeroed) for dq_semaphore when deterministic.
int64_t bwd_semaphore_count(const BwdParams& params);

// Runs the backward on `stream`: rowsum(dout * out), then the dK/dV kernel
// (which also accumulates dQ into dq_accum), then dQ's conversion into dq.
// Throws std::runtime_error on a CUDA error. cu_seqlens values are trusted.
void run_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
