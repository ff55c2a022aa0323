#include <ATen/ops/full.h>
#include <torch/library.h>

#include "cpu/attention_cpu.h"
#include "torch/checks.h"

namespace gqa {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               std::optional<double> softmax_scale, bool causal,
                                               int64_t window_left, int64_t window_right, double softcap) {
  const AttnParams p =
      check_forward_args("gqa.forward", q, k, v, softmax_scale, causal, window_left, window_right, softcap);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) cpu::attention_fwd(q, k, v, p, out, lse);
  return {out, lse};
}

// `deterministic` is accepted for the contract: the CPU backward is always
// bitwise repeatable for a given thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool /*deterministic*/) {
  const AttnParams p = check_backward_args("gqa.backward", dout, q, k, v, out, lse, softmax_scale, causal,
                                           window_left, window_right, softcap);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  if (dq.numel() > 0 || dk.numel() > 0) cpu::attention_bwd(dout, q, k, v, out, lse, p, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> forward_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                      std::optional<double> softmax_scale, bool causal,
                                                      int64_t window_left, int64_t window_right, double softcap) {
  const AttnParams p = check_varlen_args("gqa.forward_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    cpu::attention_fwd_varlen(q, k, v, p, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, out,
                              lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool /*deterministic*/) {
  const AttnParams p =
      check_varlen_backward_args("gqa.backward_varlen", dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  cpu::attention_bwd_varlen(dout, q, k, v, out, lse, p, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), dq, dk,
                            dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> forward_kvcache_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& block_table, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, int64_t num_splits) {
  const KvcacheArgs a = check_kvcache_args("gqa.forward_kvcache", q, k_cache, v_cache, k_new, v_new, cache_seqlens,
                                           block_table, softmax_scale, causal, window_left, window_right, softcap,
                                           num_splits);
  // Without cache_seqlens every sequence fills its cache.
  const at::Tensor lens = cache_seqlens.has_value() ? cache_seqlens->contiguous()
                                                    : at::full({q.size(0)}, a.capacity, q.options().dtype(at::kInt));
  const cpu::KvCache cache{k_cache, v_cache, block_table.has_value() ? &*block_table : nullptr};
  if (k_new.has_value()) cpu::kvcache_append(cache, *k_new, *v_new, lens);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) cpu::attention_fwd_kvcache(q, cache, lens, a.num_new, a.params, num_splits, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& outs, const at::Tensor& lses) {
  check_merge_states_args("gqa.merge_states", outs, lses);
  const auto rows = lses.sizes().slice(1);
  at::Tensor out = new_output(outs.sizes().slice(1), outs.options());
  at::Tensor lse = new_output(rows, lses.options());
  const int64_t n = outs.size(0), d = outs.size(-1), m = lse.numel();
  if (out.numel() > 0) {
    at::Tensor out_2d = out.view({m, d}), lse_1d = lse.view({m});
    cpu::merge_states(outs.reshape({n, m, d}).contiguous(), lses.reshape({n, m}).contiguous(), out_2d, lse_1d);
  }
  return {out, lse};
}

}  // namespace
}  // namespace gqa

TORCH_LIBRARY_IMPL(gqa, CPU, m) {
  m.impl("forward", &gqa::forward_cpu);
  m.impl("backward", &gqa::backward_cpu);
  m.impl("forward_varlen", &gqa::forward_varlen_cpu);
  m.impl("backward_varlen", &gqa::backward_varlen_cpu);
  m.impl("forward_kvcache", &gqa::forward_kvcache_cpu);
  m.impl("merge_states", &gqa::merge_states_cpu);
}
