// CUDA registrations: argument checks, layout fixes and workspace here; the
// kernels (csrc/kernels) see only a params struct and a stream.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/bwd_params.h"
#include "kernels/fwd_params.h"
#include "kernels/kv_cache_append.h"
#include "kernels/merge_states.h"
#include "torch/checks.h"
#include "torch/fwd_overrides.h"

namespace gqa {
namespace {

namespace kn = gqa::kernels;

// The kernels copy 16-byte chunks of rows: base pointers and the strides of
// every dim but the last must be multiples of 16 bytes.
bool rows_16b_aligned(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % elems != 0) return false;
  }
  return true;
}

// A fresh allocation is aligned; a .contiguous() view of a misaligned
// storage offset would not be.
at::Tensor aligned(const at::Tensor& t) { return rows_16b_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// Head dims that are not a multiple of 8 run zero-padded: zero columns
// change no score, and the output's extra columns are dropped.
int64_t padded_head_dim(int64_t head_dim) { return (head_dim + 7) / 8 * 8; }

at::Tensor prepare(const at::Tensor& t, int64_t padded_dim) {
  const int64_t head_dim = t.size(-1);
  return aligned(padded_dim == head_dim ? t : at::constant_pad_nd(t, {0, padded_dim - head_dim}));
}

void check_cuda_dtype_and_head_dim(const char* op, const at::Tensor& q) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                   ": the CUDA kernels take float16 and bfloat16, got ", q.scalar_type(),
                   "; cast q, k and v (e.g. .to(torch.bfloat16)) or run on the CPU");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_NOT_IMPLEMENTED(head_dim <= kn::kMaxHeadDim, op, ": the CUDA kernels take head dims up to ",
                              kn::kMaxHeadDim, ", got ", head_dim);
}

// The tensors' pointers and strides, for (B, S, H, D) tensors or packed
// (T, H, D) ones (whose batch strides stay 0).
kn::FwdParams tensor_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse) {
  kn::FwdParams p{};
  const int64_t r = q.dim() - 3;  // the row dim
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_row_stride = q.stride(r), p.q_head_stride = q.stride(r + 1);
  p.k_row_stride = k.stride(r), p.k_head_stride = k.stride(r + 1);
  p.v_row_stride = v.stride(r), p.v_head_stride = v.stride(r + 1);
  p.o_row_stride = out.stride(r), p.o_head_stride = out.stride(r + 1);
  if (r == 1) {
    p.q_batch_stride = q.stride(0), p.k_batch_stride = k.stride(0);
    p.v_batch_stride = v.stride(0), p.o_batch_stride = out.stride(0);
  }
  return p;
}

// The shape, options and dtype every forward shares; the lengths are the
// longest sequence's (or a cache's capacity). Windows are clamped to the
// longest key and query ranges, past which they change nothing, so that
// they fit an int.
void set_shape_and_options(kn::FwdParams& p, const AttnParams& ap, const at::Tensor& q, int64_t padded_dim,
                           int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads_q,
                           int64_t heads_kv) {
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(max_seqlen_q);
  p.seqlen_k = static_cast<int>(max_seqlen_k);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(padded_dim);
  p.dtype = q.scalar_type() == at::kHalf ? kn::DType::kFloat16 : kn::DType::kBFloat16;
  p.softmax_scale = static_cast<float>(ap.softmax_scale);
  p.softcap = static_cast<float>(ap.softcap);
  p.window_left = static_cast<int>(std::min<int64_t>(ap.window_left, max_seqlen_k + max_seqlen_q));
  p.window_right = static_cast<int>(std::min<int64_t>(ap.window_right, max_seqlen_k + max_seqlen_q));
}

// Tile rows, grid dims and packed rows are indexed in 32 bits.
void check_grid_sizes(const char* op, int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads_q,
                      int64_t heads_kv) {
  for (int64_t n : {batch, max_seqlen_q, max_seqlen_k, heads_q}) {
    TORCH_CHECK_VALUE(n < (int64_t(1) << 31), op, ": sizes must be below 2^31, got batch ", batch,
                      ", query length ", max_seqlen_q, ", key length ", max_seqlen_k, " and ", heads_q,
                      " query heads");
  }
  TORCH_CHECK_VALUE(heads_q <= 65535, op, ": the CUDA kernels take at most 65535 query heads, got ", heads_q);
  // Packed rows are (position, head of the group) pairs, indexed in 32 bits.
  TORCH_CHECK_VALUE(max_seqlen_q * (heads_q / heads_kv) < (int64_t(1) << 31), op,
                    ": the CUDA kernels need Sq * (Hq / Hkv) < 2^31, got Sq = ", max_seqlen_q, ", Hq = ", heads_q,
                    " and Hkv = ", heads_kv);
}

// The kernels index K/V rows within one sequence (or one cache block) and
// head in 32 bits: `rows` rows of t from any starting row.
void check_row_offsets(const char* op, const at::Tensor& t, int64_t rows, int64_t row_dim) {
  TORCH_CHECK_NOT_IMPLEMENTED(rows * t.stride(row_dim) < (int64_t(1) << 31), op,
                              ": the CUDA kernels need sequence length * row stride < 2^31 elements, got ", rows,
                              " rows of a tensor of shape ", t.sizes(), " and strides ", t.strides());
}

// Plans the launch (key splits, query-group packing), allocates the split-KV
// workspace and runs. force_splits: 0 lets the heuristic choose.
void plan_and_run(const char* op, kn::FwdParams& p, const at::Tensor& q, int force_splits) {
  const ForwardOverrides& force = forward_overrides();
  const kn::FwdPlan plan = kn::plan_fwd(p, q.get_device(), force_splits, force.pack_gqa);
  p.num_splits = plan.num_splits;
  p.pack_gqa = plan.pack_gqa;
  TORCH_CHECK_VALUE(int64_t(p.batch) * plan.num_splits <= 65535, op,
                    ": the CUDA kernels take batch * splits <= 65535, got batch ", p.batch, " with ",
                    plan.num_splits, " splits");
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
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                std::optional<double> softmax_scale, bool causal,
                                                int64_t window_left, int64_t window_right, double softcap) {
  const char* op = "gqa.forward";
  const AttnParams ap =
      check_forward_args(op, q_in, k_in, v_in, softmax_scale, causal, window_left, window_right, softcap);
  check_cuda_dtype_and_head_dim(op, q_in);
  const int64_t head_dim = q_in.size(3);
  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), heads_q = q_in.size(2);
  const int64_t seqlen_k = k_in.size(1), heads_kv = k_in.size(2);
  check_grid_sizes(op, batch, seqlen_q, seqlen_k, heads_q, heads_kv);

  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t padded_dim = padded_head_dim(head_dim);
  const at::Tensor q = prepare(q_in, padded_dim), k = prepare(k_in, padded_dim), v = prepare(v_in, padded_dim);

  at::Tensor out = new_output({batch, seqlen_q, heads_q, padded_dim}, q_in.options());
  at::Tensor lse = new_output({batch, heads_q, seqlen_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  kn::FwdParams p = tensor_params(q, k, v, out, lse);
  set_shape_and_options(p, ap, q, padded_dim, batch, seqlen_q, seqlen_k, heads_q, heads_kv);
  check_row_offsets(op, k, seqlen_k, 1);
  check_row_offsets(op, v, seqlen_k, 1);

  plan_and_run(op, p, q, forward_overrides().num_splits);
  if (padded_dim != head_dim) out = out.narrow(3, 0, head_dim).contiguous();
  return {out, lse};
}

// The gradients' pointers and strides, laid out like tensor_params'.
void set_grad_params(kn::BwdParams& p, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv) {
  const int64_t r = dq.dim() - 3;  // the row dim
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.do_row_stride = dout.stride(r), p.do_head_stride = dout.stride(r + 1);
  p.dq_row_stride = dq.stride(r), p.dq_head_stride = dq.stride(r + 1);
  p.dk_row_stride = dk.stride(r), p.dk_head_stride = dk.stride(r + 1);
  p.dv_row_stride = dv.stride(r), p.dv_head_stride = dv.stride(r + 1);
  if (r == 1) {
    p.do_batch_stride = dout.stride(0), p.dq_batch_stride = dq.stride(0);
    p.dk_batch_stride = dk.stride(0), p.dv_batch_stride = dv.stride(0);
  }
}

// Allocates the backward's workspace and runs it. rows: lse's numel.
void run_backward(const char* op, kn::BwdParams& p, const at::Tensor& q, int64_t rows, bool deterministic) {
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor dq_accum = at::zeros({rows, p.head_dim}, f32);
  const at::Tensor dsum = at::empty({rows}, f32);
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  p.deterministic = deterministic;
  at::Tensor semaphore;
  if (deterministic) {
    semaphore = at::zeros({kn::bwd_semaphore_count(p)}, q.options().dtype(at::kInt));
    p.dq_semaphore = semaphore.data_ptr<int>();
  }
  try {
    kn::run_bwd(p, at::cuda::getCurrentCUDAStream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// The gradients of the unpadded head dim; zeros where there is nothing to
// differentiate (no query or no key), as the poisoned outputs must not leak.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_grads(at::Tensor dq, at::Tensor dk, at::Tensor dv,
                                                             int64_t head_dim, bool empty) {
  if (empty) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  if (dq.size(-1) != head_dim) {
    dq = dq.narrow(-1, 0, head_dim).contiguous();
    dk = dk.narrow(-1, 0, head_dim).contiguous();
    dv = dv.narrow(-1, 0, head_dim).contiguous();
  }
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, bool deterministic) {
  const char* op = "gqa.backward";
  const AttnParams ap = check_backward_args(op, dout_in, q_in, k_in, v_in, out_in, lse_in, softmax_scale, causal,
                                            window_left, window_right, softcap);
  check_cuda_dtype_and_head_dim(op, q_in);
  const int64_t head_dim = q_in.size(3);
  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), heads_q = q_in.size(2);
  const int64_t seqlen_k = k_in.size(1), heads_kv = k_in.size(2);
  check_grid_sizes(op, batch, seqlen_q, seqlen_k, heads_q, heads_kv);

  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t padded_dim = padded_head_dim(head_dim);
  at::Tensor dq = new_output({batch, seqlen_q, heads_q, padded_dim}, q_in.options());
  at::Tensor dk = new_output({batch, seqlen_k, heads_kv, padded_dim}, q_in.options());
  at::Tensor dv = new_output({batch, seqlen_k, heads_kv, padded_dim}, q_in.options());
  const bool empty = batch == 0 || seqlen_q == 0 || seqlen_k == 0;
  if (empty) return finish_grads(dq, dk, dv, head_dim, true);

  const at::Tensor q = prepare(q_in, padded_dim), k = prepare(k_in, padded_dim), v = prepare(v_in, padded_dim);
  const at::Tensor out = prepare(out_in, padded_dim), dout = prepare(dout_in, padded_dim);
  const at::Tensor lse = lse_in.contiguous();
  kn::BwdParams p{};
  static_cast<kn::FwdParams&>(p) = tensor_params(q, k, v, out, lse);
  set_shape_and_options(p, ap, q, padded_dim, batch, seqlen_q, seqlen_k, heads_q, heads_kv);
  set_grad_params(p, dout, dq, dk, dv);
  run_backward(op, p, q, lse.numel(), deterministic);
  return finish_grads(dq, dk, dv, head_dim, false);
}

// Packed sequences: the dense forward's kernel, with each block finding its
// sequence's rows and lengths from cu_seqlens on the device. The grid is
// sized by max_seqlen_q and max_seqlen_k.
std::tuple<at::Tensor, at::Tensor> forward_varlen_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                       const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                       int64_t max_seqlen_k, std::optional<double> softmax_scale,
                                                       bool causal, int64_t window_left, int64_t window_right,
                                                       double softcap) {
  const char* op = "gqa.forward_varlen";
  const AttnParams ap = check_varlen_args(op, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap);
  check_cuda_dtype_and_head_dim(op, q_in);
  const int64_t head_dim = q_in.size(2);
  const int64_t total_q = q_in.size(0), heads_q = q_in.size(1), heads_kv = k_in.size(1);
  const int64_t batch = cu_seqlens_q.numel() - 1;
  check_grid_sizes(op, batch, max_seqlen_q, max_seqlen_k, heads_q, heads_kv);

  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t padded_dim = padded_head_dim(head_dim);
  const at::Tensor q = prepare(q_in, padded_dim), k = prepare(k_in, padded_dim), v = prepare(v_in, padded_dim);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();

  at::Tensor out = new_output({total_q, heads_q, padded_dim}, q_in.options());
  at::Tensor lse = new_output({heads_q, total_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0 || batch == 0) return {out, lse};

  kn::FwdParams p = tensor_params(q, k, v, out, lse);
  p.cu_seqlens_q = cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.const_data_ptr<int32_t>();
  p.total_q = static_cast<int>(total_q);
  set_shape_and_options(p, ap, q, padded_dim, batch, max_seqlen_q, max_seqlen_k, heads_q, heads_kv);
  check_row_offsets(op, k, max_seqlen_k, 0);
  check_row_offsets(op, v, max_seqlen_k, 0);

  plan_and_run(op, p, q, forward_overrides().num_splits);
  if (padded_dim != head_dim) out = out.narrow(2, 0, head_dim).contiguous();
  return {out, lse};
}

// Packed sequences: the dense backward's kernels, with each block finding
// its sequence's rows and lengths from cu_seqlens on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap, bool deterministic) {
  const char* op = "gqa.backward_varlen";
  const AttnParams ap =
      check_varlen_backward_args(op, dout_in, q_in, k_in, v_in, out_in, lse_in, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap);
  check_cuda_dtype_and_head_dim(op, q_in);
  const int64_t head_dim = q_in.size(2);
  const int64_t total_q = q_in.size(0), heads_q = q_in.size(1);
  const int64_t total_k = k_in.size(0), heads_kv = k_in.size(1);
  const int64_t batch = cu_seqlens_q.numel() - 1;
  check_grid_sizes(op, batch, max_seqlen_q, max_seqlen_k, heads_q, heads_kv);

  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t padded_dim = padded_head_dim(head_dim);
  at::Tensor dq = new_output({total_q, heads_q, padded_dim}, q_in.options());
  at::Tensor dk = new_output({total_k, heads_kv, padded_dim}, q_in.options());
  at::Tensor dv = new_output({total_k, heads_kv, padded_dim}, q_in.options());
  const bool empty = batch == 0 || total_q == 0 || total_k == 0 || max_seqlen_q == 0 || max_seqlen_k == 0;
  if (empty) return finish_grads(dq, dk, dv, head_dim, true);

  const at::Tensor q = prepare(q_in, padded_dim), k = prepare(k_in, padded_dim), v = prepare(v_in, padded_dim);
  const at::Tensor out = prepare(out_in, padded_dim), dout = prepare(dout_in, padded_dim);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  kn::BwdParams p{};
  static_cast<kn::FwdParams&>(p) = tensor_params(q, k, v, out, lse);
  p.cu_seqlens_q = cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.const_data_ptr<int32_t>();
  p.total_q = static_cast<int>(total_q);
  set_shape_and_options(p, ap, q, padded_dim, batch, max_seqlen_q, max_seqlen_k, heads_q, heads_kv);
  set_grad_params(p, dout, dq, dk, dv);
  run_backward(op, p, q, lse.numel(), deterministic);
  return finish_grads(dq, dk, dv, head_dim, false);
}

// Decoding from a KV cache: new keys are appended in place first, then the
// dense forward's kernel attends, reading each sequence's length from
// cache_seqlens and, for a paged cache, each key row's block from
// block_table. The grid is sized by the capacity, since the lengths are
// only known on the device.
std::tuple<at::Tensor, at::Tensor> forward_kvcache_cuda(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
    const std::optional<at::Tensor>& cache_seqlens, const std::optional<at::Tensor>& block_table,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    int64_t num_splits) {
  const char* op = "gqa.forward_kvcache";
  const KvcacheArgs a = check_kvcache_args(op, q_in, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                           softmax_scale, causal, window_left, window_right, softcap, num_splits);
  check_cuda_dtype_and_head_dim(op, q_in);
  const int64_t head_dim = q_in.size(3);
  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), heads_q = q_in.size(2);
  const int64_t heads_kv = k_cache.size(2);
  check_grid_sizes(op, batch, seqlen_q, a.capacity, heads_q, heads_kv);
  // Rows are indexed in 32 bits within one block of a paged cache (blocks
  // themselves in 64), within one sequence of a contiguous one. Checked
  // before the caches are written, and again below on any copy of them.
  check_row_offsets(op, k_cache, a.block_size, 1);
  check_row_offsets(op, v_cache, a.block_size, 1);

  c10::cuda::CUDAGuard guard(q_in.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor lens = cache_seqlens.has_value() ? cache_seqlens->contiguous() : at::Tensor();
  if (k_new.has_value() && batch * seqlen_q > 0) {
    // Into the caller's caches, before any copy below is taken.
    kn::KvCacheAppendParams ap{};
    ap.k_new = k_new->data_ptr();
    ap.v_new = v_new->data_ptr();
    ap.kn_batch_stride = k_new->stride(0), ap.kn_row_stride = k_new->stride(1), ap.kn_head_stride = k_new->stride(2);
    ap.vn_batch_stride = v_new->stride(0), ap.vn_row_stride = v_new->stride(1), ap.vn_head_stride = v_new->stride(2);
    ap.k_cache = k_cache.data_ptr();
    ap.v_cache = v_cache.data_ptr();
    ap.kc_batch_stride = k_cache.stride(0), ap.kc_row_stride = k_cache.stride(1);
    ap.kc_head_stride = k_cache.stride(2);
    ap.vc_batch_stride = v_cache.stride(0), ap.vc_row_stride = v_cache.stride(1);
    ap.vc_head_stride = v_cache.stride(2);
    if (a.paged) {
      ap.block_table = block_table->const_data_ptr<int32_t>();
      ap.block_table_batch_stride = block_table->stride(0);
      ap.page_block_size = static_cast<int>(a.block_size);
    }
    ap.cache_seqlens = lens.const_data_ptr<int32_t>();
    ap.batch = static_cast<int>(batch);
    ap.seqlen_new = static_cast<int>(seqlen_q);
    ap.heads_kv = static_cast<int>(heads_kv);
    ap.head_dim = static_cast<int>(head_dim);
    try {
      kn::run_kv_cache_append(ap, stream);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, op, ": ", e.what());
    }
  }

  // The caches are read in place; only a head dim that is not a multiple of
  // 8, or misaligned rows, cost a padded copy of them.
  const int64_t padded_dim = padded_head_dim(head_dim);
  const at::Tensor q = prepare(q_in, padded_dim), k = prepare(k_cache, padded_dim), v = prepare(v_cache, padded_dim);

  at::Tensor out = new_output({batch, seqlen_q, heads_q, padded_dim}, q_in.options());
  at::Tensor lse = new_output({batch, heads_q, seqlen_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  kn::FwdParams p = tensor_params(q, k, v, out, lse);
  if (lens.defined()) {
    p.seqused_k = lens.const_data_ptr<int32_t>();
    p.seqused_k_add = static_cast<int>(a.num_new);
  }
  if (a.paged) {
    p.block_table = block_table->const_data_ptr<int32_t>();
    p.block_table_batch_stride = block_table->stride(0);
    p.page_block_size = static_cast<int>(a.block_size);
  }
  set_shape_and_options(p, a.params, q, padded_dim, batch, seqlen_q, a.capacity, heads_q, heads_kv);
  check_row_offsets(op, k, a.block_size, 1);
  check_row_offsets(op, v, a.block_size, 1);

  plan_and_run(op, p, q, num_splits > 0 ? static_cast<int>(std::min<int64_t>(num_splits, 1 << 30))
                                         : forward_overrides().num_splits);
  if (padded_dim != head_dim) out = out.narrow(3, 0, head_dim).contiguous();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states_cuda(const at::Tensor& outs_in, const at::Tensor& lses_in) {
  const char* op = "gqa.merge_states";
  check_merge_states_args(op, outs_in, lses_in);
  c10::cuda::CUDAGuard guard(outs_in.device());
  const at::Tensor outs = outs_in.contiguous(), lses = lses_in.contiguous();
  at::Tensor out = new_output(outs.sizes().slice(1), outs.options());
  at::Tensor lse = new_output(lses.sizes().slice(1), lses.options());
  if (lse.numel() == 0) return {out, lse};

  kn::MergeStatesParams p{};
  p.outs = outs.const_data_ptr();
  p.lses = lses.const_data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.num_parts = outs.size(0);
  p.rows = lse.numel();
  p.head_dim = outs.size(-1);
  p.dtype = outs.scalar_type() == at::kFloat  ? kn::DType::kFloat32
            : outs.scalar_type() == at::kHalf ? kn::DType::kFloat16
                                              : kn::DType::kBFloat16;
  try {
    kn::run_merge_states(p, at::cuda::getCurrentCUDAStream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  return {out, lse};
}

}  // namespace
}  // namespace gqa

TORCH_LIBRARY_IMPL(gqa, CUDA, m) {
  m.impl("forward", &gqa::forward_cuda);
  m.impl("backward", &gqa::backward_cuda);
  m.impl("forward_varlen", &gqa::forward_varlen_cuda);
  m.impl("backward_varlen", &gqa::backward_varlen_cuda);
  m.impl("forward_kvcache", &gqa::forward_kvcache_cuda);
  m.impl("merge_states", &gqa::merge_states_cuda);
}
