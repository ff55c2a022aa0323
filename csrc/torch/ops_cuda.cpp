// CUDA registrations: argument checks, layout fixes and workspace here; the
// kernels (csrc/kernels) see only a params struct and a stream.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/fwd_params.h"
#include "torch/checks.h"
#include "torch/fwd_overrides.h"

namespace gqa {
namespace {

namespace kn = gqa::kernels;

// The kernels copy 16-byte chunks of rows: base pointers and the strides of
// the batch, sequence and head dims must be multiples of 16 bytes.
bool rows_16b_aligned(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % elems != 0) return false;
  }
  return true;
}

// A fresh allocation is aligned; a .contiguous() view of a misaligned
// storage offset would not be.
at::Tensor aligned(const at::Tensor& t) { return rows_16b_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                std::optional<double> softmax_scale, bool causal,
                                                int64_t window_left, int64_t window_right, double softcap) {
  const char* op = "gqa.forward";
  const AttnParams ap =
      check_forward_args(op, q_in, k_in, v_in, softmax_scale, causal, window_left, window_right, softcap);
  TORCH_CHECK_TYPE(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16, op,
                   ": the CUDA kernels take float16 and bfloat16, got ", q_in.scalar_type(),
                   "; cast q, k and v (e.g. .to(torch.bfloat16)) or run on the CPU");
  const int64_t head_dim = q_in.size(3);
  TORCH_CHECK_NOT_IMPLEMENTED(head_dim <= kn::kMaxHeadDim, op, ": the CUDA kernels take head dims up to ",
                              kn::kMaxHeadDim, ", got ", head_dim);
  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), heads_q = q_in.size(2);
  const int64_t seqlen_k = k_in.size(1), heads_kv = k_in.size(2);
  for (int64_t n : {batch, seqlen_q, seqlen_k, heads_q}) {
    TORCH_CHECK_VALUE(n < (int64_t(1) << 31), op, ": sizes must be below 2^31, got q ", q_in.sizes(), " and k ",
                      k_in.sizes());
  }
  TORCH_CHECK_VALUE(heads_q <= 65535, op, ": the CUDA kernels take at most 65535 query heads, got ", heads_q);
  // Packed rows are (position, head of the group) pairs, indexed in 32 bits.
  TORCH_CHECK_VALUE(seqlen_q * (heads_q / heads_kv) < (int64_t(1) << 31), op,
                    ": the CUDA kernels need Sq * (Hq / Hkv) < 2^31, got q ", q_in.sizes(), " and k ", k_in.sizes());

  c10::cuda::CUDAGuard guard(q_in.device());
  // Head dims that are not a multiple of 8 run zero-padded: zero columns
  // change no score, and the output's extra columns are dropped.
  const int64_t padded_dim = (head_dim + 7) / 8 * 8;
  auto prepare = [&](const at::Tensor& t) {
    return aligned(padded_dim == head_dim ? t : at::constant_pad_nd(t, {0, padded_dim - head_dim}));
  };
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);

  at::Tensor out = new_output({batch, seqlen_q, heads_q, padded_dim}, q_in.options());
  at::Tensor lse = new_output({batch, heads_q, seqlen_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  kn::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(padded_dim);
  p.dtype = q.scalar_type() == at::kHalf ? kn::DType::kFloat16 : kn::DType::kBFloat16;
  p.softmax_scale = static_cast<float>(ap.softmax_scale);
  p.softcap = static_cast<float>(ap.softcap);
  p.window_left = static_cast<int>(std::min<int64_t>(ap.window_left, seqlen_k + seqlen_q));
  p.window_right = static_cast<int>(std::min<int64_t>(ap.window_right, seqlen_k + seqlen_q));

  // The kernels index K/V rows within one (batch, head) in 32 bits.
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK_NOT_IMPLEMENTED(t->size(1) * t->stride(1) < (int64_t(1) << 31), op,
                                ": the CUDA kernels need sequence length * row stride < 2^31 elements, got a tensor "
                                "of shape ", t->sizes(), " and strides ", t->strides());
  }

  const ForwardOverrides& force = forward_overrides();
  const kn::FwdPlan plan = kn::plan_fwd(p, q.get_device(), force.num_splits, force.pack_gqa);
  p.num_splits = plan.num_splits;
  p.pack_gqa = plan.pack_gqa;
  TORCH_CHECK_VALUE(batch * plan.num_splits <= 65535, op, ": the CUDA kernels take batch * splits <= 65535, got batch ",
                    batch, " with ", plan.num_splits, " splits");
  at::Tensor out_accum, lse_accum;
  if (plan.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({plan.out_accum_numel}, f32);
    lse_accum = at::empty({plan.lse_accum_numel}, f32);
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  try {
    kn::run_fwd(p, at::cuda::getCurrentCUDAStream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  if (padded_dim != head_dim) out = out.narrow(3, 0, head_dim).contiguous();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool /*deterministic*/) {
  check_backward_args("gqa.backward", dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
                      softcap);
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "gqa.backward: the CUDA backward kernel of gqa_ext is not built yet; "
                              "run the backward on CPU tensors for now");
}

}  // namespace
}  // namespace gqa

TORCH_LIBRARY_IMPL(gqa, CUDA, m) {
  m.impl("forward", &gqa::forward_cuda);
  m.impl("backward", &gqa::backward_cuda);
}
