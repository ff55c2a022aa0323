// The CUDA forward's interface to the op layer: a plain params struct and a
// stream, no torch types. The op layer validates and allocates; plan_fwd
// decides the launch shape (tiles, query-group packing, split-KV) for the
// GPU at hand; run_fwd launches. Which kernel family runs (SM80 mma.sync
// today, a Hopper path later) is decided here, not in the op layer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gqa::kernels {

enum class DType : int { kFloat16, kBFloat16 };

struct FwdParams {
  // q (B, Sq, Hq, D); k and v (B, Sk, Hkv, D). Strides in elements; the last
  // dim is contiguous, and base pointers and strides are 16-byte aligned.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  // out (B, Sq, Hq, D) with its strides (same alignment); lse (B, Hq, Sq)
  // contiguous float32.
  void* out;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;

  // Split-KV partials, contiguous float32 (num_splits, B, Hq, Sq, D) and
  // (num_splits, B, Hq, Sq); used only when num_splits > 1.
  float* out_accum;
  float* lse_accum;

  int batch, seqlen_q, seqlen_k, heads_q, heads_kv;
  int head_dim;  // a multiple of 8, at most kMaxHeadDim
  DType dtype;

  float softmax_scale;
  float softcap;     // 0: off
  int window_left;   // -1: unbounded
  int window_right;  // -1: unbounded; causal is window_right = 0

  // Set by plan_fwd.
  bool pack_gqa;   // rows of a tile are (query position, head of the group) pairs
  int num_splits;  // >= 1
};

constexpr int kMaxHeadDim = 256;

struct FwdPlan {
  int num_splits;
  bool pack_gqa;
  int64_t out_accum_numel;  // floats the caller allocates for out_accum (0 when num_splits == 1)
  int64_t lse_accum_numel;
};

// force_splits: 0 lets the heuristic choose, n >= 1 forces n (capped at the
// number of key blocks). force_pack: -1 heuristic, 0 off, 1 on.
FwdPlan plan_fwd(const FwdParams& params, int device, int force_splits, int force_pack);

// Runs the forward (and the split-KV combine) on `stream`, with the plan's
// choices already stored in params. Throws std::runtime_error on a CUDA error.
void run_fwd(const FwdParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
