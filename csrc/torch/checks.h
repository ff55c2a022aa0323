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

// at::empty, or filled with NaN when GQA_EXT_POISON_OUTPUTS=1 (the tests set
// it) so that an element a kernel fails to write shows instead of whatever
// the allocator left there, possibly a previous call's right answer.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace gqa
