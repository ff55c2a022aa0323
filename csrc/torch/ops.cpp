// The op schemas: the contract every device implements.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY(gqa, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0) -> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float? softmax_scale=None, "
      "bool causal=False, int window_left=-1, int window_right=-1, float softcap=0.0, bool deterministic=False) "
      "-> (Tensor dq, Tensor dk, Tensor dv)",
      {at::Tag::pt2_compliant_tag});
  // Packed sequences: q (Tq, Hq, D), k and v (Tk, Hkv, D); sequence b is rows
  // cu_seqlens[b]:cu_seqlens[b + 1]. lse is (Hq, Tq).
  m.def(
      "forward_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float? softmax_scale=None, bool causal=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0) -> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "backward_varlen(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float? softmax_scale=None, bool causal=False, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, bool deterministic=False) "
      "-> (Tensor dq, Tensor dk, Tensor dv)",
      {at::Tag::pt2_compliant_tag});
  // Decoding from a KV cache, contiguous (B, Smax, Hkv, D) or paged
  // (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks). k_new
  // and v_new are written into the caches in place before attending.
  m.def(
      "forward_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new=None, "
      "Tensor? v_new=None, Tensor? cache_seqlens=None, Tensor? block_table=None, float? softmax_scale=None, "
      "bool causal=True, int window_left=-1, int window_right=-1, float softcap=0.0, int num_splits=0) "
      "-> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  // Partial results over disjoint key sets: outs (N, ..., H, D), lses
  // (N, ..., H) float32 -> out (..., H, D), lse (..., H).
  m.def("merge_states(Tensor outs, Tensor lses) -> (Tensor out, Tensor lse)", {at::Tag::pt2_compliant_tag});
}
