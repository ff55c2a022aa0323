// CUDA registrations. The kernels are not in yet: the ops validate their
// arguments like every device does, then say so plainly.
#include <torch/library.h>

#include "torch/checks.h"

namespace gqa {
namespace {

[[noreturn]] void not_built(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op,
                              ": the CUDA kernels of gqa_ext are not built yet; "
                              "run on CPU tensors for now");
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                std::optional<double> softmax_scale, bool causal,
                                                int64_t window_left, int64_t window_right, double softcap) {
  check_forward_args("gqa.forward", q, k, v, softmax_scale, causal, window_left, window_right, softcap);
  not_built("gqa.forward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool /*deterministic*/) {
  check_backward_args("gqa.backward", dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
                      softcap);
  not_built("gqa.backward");
}

}  // namespace
}  // namespace gqa

TORCH_LIBRARY_IMPL(gqa, CUDA, m) {
  m.impl("forward", &gqa::forward_cuda);
  m.impl("backward", &gqa::backward_cuda);
}
