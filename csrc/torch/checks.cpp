#include "torch/checks.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace gqa {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_4d(const char* op, const char* name, const at::Tensor& t, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be a 4-D tensor ", dims, ", got a ", t.dim(),
                    "-D tensor of shape ", t.sizes());
  // Any other strides are fine: a (B, H, S, D) tensor's transpose(1, 2) is taken as is.
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) <= 1, op, ": ", name,
                    " must have a contiguous last dim (stride 1), got strides ", t.strides(),
                    "; call .contiguous() on it first");
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                   ", got ", t.scalar_type());
}

}  // namespace

AttnParams check_forward_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              std::optional<double> softmax_scale, bool causal, int64_t window_left,
                              int64_t window_right, double softcap) {
  check_4d(op, "q", q, "(B, Sq, Hq, D)");
  check_4d(op, "k", k, "(B, Sk, Hkv, D)");
  check_4d(op, "v", v, "(B, Sk, Hkv, D)");
  TORCH_CHECK_TYPE(supported_dtype(q.scalar_type()), op,
                   ": q must be float32, bfloat16, float16 or float64, got ", q.scalar_type());
  check_same(op, "k", k, q);
  check_same(op, "v", v, q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ", k.sizes(),
                    " and v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": k and v must have q's batch size ", q.size(0), ", got ",
                    k.size(0));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": k and v must have q's head dim ", q.size(3), ", got ",
                    k.size(3));
  TORCH_CHECK_VALUE(q.size(3) > 0, op, ": the head dim D must be positive, got q of shape ", q.sizes());
  const int64_t Hq = q.size(2), Hkv = k.size(2);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq > 0, op, ": q and k need at least one head, got Hq = ", Hq, " and Hkv = ", Hkv);
  TORCH_CHECK_VALUE(Hq % Hkv == 0, op, ": the number of query heads Hq = ", Hq,
                    " must be a multiple of the number of KV heads Hkv = ", Hkv);
  TORCH_CHECK_VALUE(window_left >= -1, op, ": window_left must be >= -1 (-1 = unbounded), got ", window_left);
  TORCH_CHECK_VALUE(window_right >= -1, op, ": window_right must be >= -1 (-1 = unbounded), got ", window_right);
  TORCH_CHECK_VALUE(!causal || window_right <= 0, op, ": causal=True means window_right = 0, got window_right = ",
                    window_right);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = off), got ",
                    softcap);
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": softmax_scale must be finite, got ", scale);
  return AttnParams{scale, softcap, window_left, causal ? 0 : window_right};
}

AttnParams check_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               std::optional<double> softmax_scale, bool causal, int64_t window_left,
                               int64_t window_right, double softcap) {
  AttnParams p = check_forward_args(op, q, k, v, softmax_scale, causal, window_left, window_right, softcap);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    check_4d(op, name, t, "(B, Sq, Hq, D)");
    check_same(op, name, t, q);
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
                      t.sizes());
  }
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(), ", got ",
                    lse.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  const std::array<int64_t, 3> lse_shape{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), op, ": lse must have shape (B, Hq, Sq) = ",
                    at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  return p;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* env = std::getenv("GQA_EXT_POISON_OUTPUTS");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  at::Tensor t = at::empty(sizes, options);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace gqa
