// The CUDA forward's interface to the op layer: a plain params struct and a
// stream, no torch types. The op layer validates and allocates; plan_fwd
// decides the launch shape (tiles, query-group packing, split-KV) for the
// GPU at hand; run_fwd launches. Which kernel family runs (SM80 mma.sync
// today, a Hopper path later) is decided here, not in the op layer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gqa::kernels {

enum class DType : int { kFloat16, kBFloat16, kFloat32 };  // the forward takes the first two

struct FwdParams {
  // q (B, Sq, Hq, D); k and v (B, Sk, Hkv, D). Strides in elements; the last
  // dim is contiguous, and base pointers and strides are 16-byte aligned.
  // The optional fields below change how a sequence's rows are found; the
  // batch strides are then unused where they say so.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  // out (B, Sq, Hq, D) with its strides (same alignment); lse (B, Hq, Sq)
  // contiguous float32. Packed sequences (cu_seqlens_q): out (Tq, Hq, D)
  // and lse (Hq, Tq).
  void* out;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;

  // Split-KV partials, contiguous float32 (num_splits, R, D) and
  // (num_splits, R), R indexed like lse (R = B * Hq * Sq, or Hq * Tq for
  // packed sequences); used only when num_splits > 1.
  float* out_accum;
  float* lse_accum;

  // Packed sequences (null: off), int32 (B + 1) on the device: sequence b's
  // query rows are cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and out
  // (their batch strides unused), its keys likewise from cu_seqlens_k.
  // seqlen_q and seqlen_k are then the longest sequence's, which size the
  // grid; total_q is Tq.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int total_q;

  // Keys per sequence known only on the device (null: seqlen_k, or from
  // cu_seqlens_k): sequence b has seqused_k[b] + seqused_k_add keys, e.g. a
  // KV cache's length plus the keys appended to it by this call. seqlen_k is
  // then the most any sequence can hold (the cache's capacity), which sizes
  // the splits.
  const int* seqused_k;
  int seqused_k_add;

  // Paged K/V (null: off): k and v are (num_blocks, page_block_size, Hkv,
  // D), their batch strides being the stride between blocks, and key j of
  // sequence b is row j % page_block_size of block
  // block_table[b * block_table_batch_stride + j / page_block_size].
  const int* block_table;
  int64_t block_table_batch_stride;
  int page_block_size;

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

  // Set by run_fwd from page_block_size: j / page_block_size is
  // umulhi(j, page_div_mul) >> page_div_shift (page_div_mul 0: j), which
  // costs the key loop a multiply instead of an integer division per row.
  uint32_t page_div_mul;
  int page_div_shift;
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
// Index values (cu_seqlens, seqused_k, block_table) are trusted: the op layer
// checks them when it is asked to.
void run_fwd(const FwdParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
