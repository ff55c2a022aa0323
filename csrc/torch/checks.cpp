#include "torch/checks.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace gqa {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor ", dims, ", got a ", t.dim(),
                    "-D tensor of shape ", t.sizes());
  // Any other strides are fine: a (B, H, S, D) tensor's transpose(1, 2) is taken as is.
  TORCH_CHECK_VALUE(t.stride(rank - 1) == 1 || t.size(rank - 1) <= 1, op, ": ", name,
                    " must have a contiguous last dim (stride 1), got strides ", t.strides(),
                    "; call .contiguous() on it first");
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                   ", got ", t.scalar_type());
}


// q, k, v of any rank r with (..., H, D) last: dtypes, devices, equal k/v
// shapes, head counts and the head dim.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const char* k_name = "k", const char* v_name = "v") {
  TORCH_CHECK_TYPE(supported_dtype(q.scalar_type()), op,
                   ": q must be float32, bfloat16, float16 or float64, got ", q.scalar_type());
  check_same(op, k_name, k, q);
  check_same(op, v_name, v, q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": ", k_name, " and ", v_name, " must have the same shape, got ",
                    k_name, " ", k.sizes(), " and ", v_name, " ", v.sizes());
  const int64_t r = q.dim();
  TORCH_CHECK_VALUE(k.size(r - 1) == q.size(r - 1), op, ": ", k_name, " and ", v_name, " must have q's head dim ",
                    q.size(r - 1), ", got ", k.size(r - 1));
  TORCH_CHECK_VALUE(q.size(r - 1) > 0, op, ": the head dim D must be positive, got q of shape ", q.sizes());
  const int64_t Hq = q.size(r - 2), Hkv = k.size(r - 2);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq > 0, op, ": q and k need at least one head, got Hq = ", Hq, " and Hkv = ", Hkv);
  TORCH_CHECK_VALUE(Hq % Hkv == 0, op, ": the number of query heads Hq = ", Hq,
                    " must be a multiple of the number of KV heads Hkv = ", Hkv);
}

// The options every attention op takes, resolved: the default scale, causal
// folded into window_right = 0.
AttnParams resolve_options(const char* op, const at::Tensor& q, std::optional<double> softmax_scale, bool causal,
                           int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK_VALUE(window_left >= -1, op, ": window_left must be >= -1 (-1 = unbounded), got ", window_left);
  TORCH_CHECK_VALUE(window_right >= -1, op, ": window_right must be >= -1 (-1 = unbounded), got ", window_right);
  TORCH_CHECK_VALUE(!causal || window_right <= 0, op, ": causal=True means window_right = 0, got window_right = ",
                    window_right);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = off), got ",
                    softcap);
  const int64_t D = q.size(q.dim() - 1);
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": softmax_scale must be finite, got ", scale);
  return AttnParams{scale, softcap, window_left, causal ? 0 : window_right};
}

// An int32 index tensor on q's device with the given rank.
void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t rank, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                    t.device());
}

// cu_seqlens' values: 0, non-decreasing, `total` last, steps <= max_seqlen.
void check_cu_seqlens_values(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                             int64_t max_seqlen, const char* max_name) {
  const at::Tensor host = cu.cpu().contiguous();
  const int32_t* c = host.const_data_ptr<int32_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    TORCH_CHECK_VALUE(len >= 0, op, ": ", name, " must be non-decreasing, got ", name, "[", b, "] = ", c[b],
                      " > ", name, "[", b + 1, "] = ", c[b + 1]);
    TORCH_CHECK_VALUE(len <= max_seqlen, op, ": sequence ", b, " has ", len, " rows (", name, "[", b + 1, "] - ",
                      name, "[", b, "]), more than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, op, ": ", name, "[-1] must be the number of rows ", total, ", got ",
                    c[n - 1]);
}

}  // namespace

AttnParams check_forward_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              std::optional<double> softmax_scale, bool causal, int64_t window_left,
                              int64_t window_right, double softcap) {
  check_rank(op, "q", q, 4, "(B, Sq, Hq, D)");
  check_rank(op, "k", k, 4, "(B, Sk, Hkv, D)");
  check_rank(op, "v", v, 4, "(B, Sk, Hkv, D)");
  check_qkv(op, q, k, v);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": k and v must have q's batch size ", q.size(0), ", got ",
                    k.size(0));
  return resolve_options(op, q, softmax_scale, causal, window_left, window_right, softcap);
}

AttnParams check_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               std::optional<double> softmax_scale, bool causal, int64_t window_left,
                               int64_t window_right, double softcap) {
  AttnParams p = check_forward_args(op, q, k, v, softmax_scale, causal, window_left, window_right, softcap);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    check_rank(op, name, t, 4, "(B, Sq, Hq, D)");
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

AttnParams check_varlen_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal,
                             int64_t window_left, int64_t window_right, double softcap) {
  check_rank(op, "q", q, 3, "(Tq, Hq, D)");
  check_rank(op, "k", k, 3, "(Tk, Hkv, D)");
  check_rank(op, "v", v, 3, "(Tk, Hkv, D)");
  check_qkv(op, q, k, v);
  check_index_tensor(op, "cu_seqlens_q", cu_seqlens_q, 1, q);
  check_index_tensor(op, "cu_seqlens_k", cu_seqlens_k, 1, q);
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() >= 1 && cu_seqlens_q.numel() == cu_seqlens_k.numel(), op,
                    ": cu_seqlens_q and cu_seqlens_k must both hold B + 1 >= 1 offsets, got ", cu_seqlens_q.numel(),
                    " and ", cu_seqlens_k.numel());
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  TORCH_CHECK_VALUE(q.size(0) < (int64_t(1) << 31) && k.size(0) < (int64_t(1) << 31), op,
                    ": the int32 cu_seqlens index at most 2^31 - 1 rows, got q ", q.sizes(), " and k ", k.sizes());
  if (index_checks_on(q)) {
    check_cu_seqlens_values(op, "cu_seqlens_q", cu_seqlens_q, q.size(0), max_seqlen_q, "max_seqlen_q");
    check_cu_seqlens_values(op, "cu_seqlens_k", cu_seqlens_k, k.size(0), max_seqlen_k, "max_seqlen_k");
  }
  return resolve_options(op, q, softmax_scale, causal, window_left, window_right, softcap);
}

AttnParams check_varlen_backward_args(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                      const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                      std::optional<double> softmax_scale, bool causal, int64_t window_left,
                                      int64_t window_right, double softcap) {
  AttnParams p = check_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   softmax_scale, causal, window_left, window_right, softcap);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    check_rank(op, name, t, 3, "(Tq, Hq, D)");
    check_same(op, name, t, q);
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
                      t.sizes());
  }
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(), ", got ",
                    lse.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  const std::array<int64_t, 2> lse_shape{q.size(1), q.size(0)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), op, ": lse must have shape (Hq, Tq) = ",
                    at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  return p;
}

KvcacheArgs check_kvcache_args(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                               const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& cache_seqlens,
                               const std::optional<at::Tensor>& block_table, std::optional<double> softmax_scale,
                               bool causal, int64_t window_left, int64_t window_right, double softcap,
                               int64_t num_splits) {
  const bool paged = block_table.has_value();
  check_rank(op, "q", q, 4, "(B, Sq, Hq, D)");
  const char* cache_dims = paged ? "(num_blocks, block_size, Hkv, D)" : "(B, Smax, Hkv, D)";
  check_rank(op, "k_cache", k_cache, 4, cache_dims);
  check_rank(op, "v_cache", v_cache, 4, cache_dims);
  check_qkv(op, q, k_cache, v_cache, "k_cache", "v_cache");
  const int64_t B = q.size(0), Sq = q.size(1);
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), op, ": k_new and v_new must be given together");
  if (k_new.has_value()) {
    check_rank(op, "k_new", *k_new, 4, "(B, Sq, Hkv, D)");
    check_rank(op, "v_new", *v_new, 4, "(B, Sq, Hkv, D)");
    check_same(op, "k_new", *k_new, q);
    check_same(op, "v_new", *v_new, q);
    const std::array<int64_t, 4> shape{B, Sq, k_cache.size(2), k_cache.size(3)};
    for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"k_new", *k_new}, {"v_new", *v_new}}) {
      TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape (B, Sq, Hkv, D) = ",
                        at::IntArrayRef(shape), ", got ", t.sizes());
    }
    TORCH_CHECK_VALUE(cache_seqlens.has_value(), op,
                      ": appending k_new and v_new needs cache_seqlens, the positions to write them at");
  }
  if (cache_seqlens.has_value()) {
    check_index_tensor(op, "cache_seqlens", *cache_seqlens, 1, q);
    TORCH_CHECK_VALUE(cache_seqlens->size(0) == B, op, ": cache_seqlens must have q's batch size ", B, ", got ",
                      cache_seqlens->size(0));
  }
  int64_t block_size = k_cache.size(1), capacity = k_cache.size(1);
  if (paged) {
    check_index_tensor(op, "block_table", *block_table, 2, q);
    TORCH_CHECK_VALUE(block_table->size(0) == B, op, ": block_table must have q's batch size ", B,
                      " rows, got shape ", block_table->sizes());
    TORCH_CHECK_VALUE(block_table->stride(1) == 1 || block_table->size(1) <= 1, op,
                      ": block_table must have a contiguous last dim, got strides ", block_table->strides());
    TORCH_CHECK_VALUE(block_size > 0, op, ": the paged caches' block_size (dim 1) must be positive, got ",
                      k_cache.sizes());
    capacity = block_table->size(1) * block_size;
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, op, ": k_cache and v_cache must have q's batch size ", B,
                      " (or pass block_table for a paged cache), got ", k_cache.sizes());
  }
  TORCH_CHECK_VALUE(num_splits >= 0, op, ": num_splits must be >= 0 (0 = heuristic), got ", num_splits);
  const int64_t num_new = k_new.has_value() ? Sq : 0;
  if (cache_seqlens.has_value() && index_checks_on(q)) {
    const at::Tensor lens = cache_seqlens->cpu().contiguous();
    const at::Tensor table = paged ? block_table->cpu().contiguous() : at::Tensor();
    const int32_t* len = lens.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(len[b] >= 0, op, ": cache_seqlens[", b, "] must be >= 0, got ", len[b]);
      TORCH_CHECK_INDEX(len[b] + num_new <= capacity, op, ": sequence ", b, " would hold ", len[b] + num_new,
                        " positions (cache_seqlens[", b, "] = ", len[b], num_new ? " plus the new keys" : "",
                        "), past the cache's ", capacity, paged ? " (block_table columns * block_size)" : " (Smax)");
      if (!paged) continue;
      const int64_t used = (len[b] + num_new + block_size - 1) / block_size;
      const int32_t* blocks = table.const_data_ptr<int32_t>() + b * table.size(1);
      for (int64_t j = 0; j < used; ++j) {
        const int64_t blk = blocks[j];
        TORCH_CHECK_INDEX(blk >= 0 && blk < k_cache.size(0), op, ": block_table[", b, ", ", j, "] = ", blk,
                          " is not a block of the cache (num_blocks = ", k_cache.size(0), ")");
      }
    }
  }
  const AttnParams p = resolve_options(op, q, softmax_scale, causal, window_left, window_right, softcap);
  return KvcacheArgs{p, paged, block_size, capacity, num_new};
}

void check_merge_states_args(const char* op, const at::Tensor& outs, const at::Tensor& lses) {
  TORCH_CHECK_VALUE(outs.dim() >= 3, op, ": outs must be (N, ..., H, D) with at least 3 dims, got shape ",
                    outs.sizes());
  TORCH_CHECK_TYPE(outs.scalar_type() == at::kFloat || outs.scalar_type() == at::kBFloat16 ||
                       outs.scalar_type() == at::kHalf,
                   op, ": outs must be float32, bfloat16 or float16, got ", outs.scalar_type());
  TORCH_CHECK_TYPE(lses.scalar_type() == at::kFloat, op, ": lses must be float32, got ", lses.scalar_type());
  TORCH_CHECK_VALUE(lses.device() == outs.device(), op, ": lses must be on outs' device ", outs.device(), ", got ",
                    lses.device());
  const auto expected = outs.sizes().slice(0, outs.dim() - 1);
  TORCH_CHECK_VALUE(lses.sizes() == expected, op, ": lses must have outs' shape without its last dim, ", expected,
                    ", got ", lses.sizes());
  TORCH_CHECK_VALUE(outs.size(-1) > 0, op, ": the head dim D (outs' last dim) must be positive, got outs of shape ",
                    outs.sizes());
  TORCH_CHECK_VALUE(outs.size(0) >= 1, op, ": there must be at least one part to merge (N >= 1), got outs of shape ",
                    outs.sizes());
}

bool index_checks_on(const at::Tensor& t) {
  static const bool on_cuda = [] {
    const char* env = std::getenv("GQA_EXT_CHECK_INDICES");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  return t.is_cpu() || on_cuda;
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
