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

}  // namespace
}  // namespace gqa

TORCH_LIBRARY_IMPL(gqa, CPU, m) {
  m.impl("forward", &gqa::forward_cpu);
  m.impl("backward", &gqa::backward_cpu);
}
