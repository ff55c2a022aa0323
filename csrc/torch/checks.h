// Argument checks and output allocation shared by every device's
// implementation of the ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "cpu/attention_cpu.h"

namespace gqa {

using cpu::AttnParams;

// Validates q, k, v and the options; returns them resolved (default scale,
// causal folded into window_right = 0). `op` prefixes every message.
AttnParams check_forward_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              std::optional<double> softmax_scale, bool causal, int64_t window_left,
                              int64_t window_right, double softcap);

// The forward checks plus dout, out and lse against q.
AttnParams check_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               std::optional<double> softmax_scale, bool causal, int64_t window_left,
                               int64_t window_right, double softcap);

// The variable-length forward's checks: q (Tq, Hq, D), k and v (Tk, Hkv, D),
// cu_seqlens_q and cu_seqlens_k int32 (B + 1) on q's device. Their values are
// checked too (index_checks_on): starting at 0, non-decreasing, ending at Tq
// and Tk, no sequence longer than its max_seqlen.
AttnParams check_varlen_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal,
                             int64_t window_left, int64_t window_right, double softcap);

// The varlen forward checks plus dout and out (q's shape) and lse (Hq, Tq).
AttnParams check_varlen_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                      const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                      std::optional<double> softmax_scale, bool causal, int64_t window_left,
                                      int64_t window_right, double softcap);

// forward_kvcache's arguments, resolved.
struct KvcacheArgs {
  AttnParams params;
  bool paged;
  int64_t block_size;  // paged: rows per block; contiguous: Smax
  int64_t capacity;    // positions a sequence can hold: Smax, or max_blocks * block_size
  int64_t num_new;     // positions appended per sequence: Sq with k_new, else 0
};

// q (B, Sq, Hq, D); caches (B, Smax, Hkv, D), or (num_blocks, block_size, Hkv,
// D) with block_table (B, max_blocks) int32; k_new/v_new (B, Sq, Hkv, D);
// cache_seqlens (B,) int32. Values are checked too (index_checks_on): every
// sequence's cache_seqlens + num_new within the capacity, and the blocks it
// uses in [0, num_blocks).
KvcacheArgs check_kvcache_args(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                               const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& cache_seqlens,
                               const std::optional<at::Tensor>& block_table, std::optional<double> softmax_scale,
                               bool causal, int64_t window_left, int64_t window_right, double softcap,
                               int64_t num_splits);

// outs (N, ..., H, D) of float32, bfloat16 or float16 and lses (N, ..., H)
// float32, N >= 1, on one device.
void check_merge_states_args(const char* op, const at::Tensor& outs, const at::Tensor& lses);

// Whether index values (cu_seqlens, cache_seqlens, block tables) are checked:
// always for CPU tensors; for CUDA tensors only with GQA_EXT_CHECK_INDICES=1,
// because reading them costs a device synchronization per call (and is not
// allowed while a CUDA graph is captured). The kernels assume valid values.
bool index_checks_on(const at::Tensor& t);

// at::empty, or filled with NaN when GQA_EXT_POISON_OUTPUTS=1 (the tests set
// it) so that an element a kernel fails to write shows instead of whatever
// the allocator left there, possibly a previous call's right answer.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace gqa
