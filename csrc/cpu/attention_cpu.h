// CPU attention kernels. Each kernel source is compiled once per instruction
// set (DEFAULT, AVX2, AVX512; see CMakeLists.txt) into its own namespace, and
// dispatch_cpu.cpp picks one at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace gqa::cpu {

// Arguments already validated by the op layer. q is (B, Sq, Hq, D), k and v
// are (B, Sk, Hkv, D), each with a contiguous last dim and any other strides.
// The window is resolved (causal already folded into window_right = 0).
struct AttnParams {
  double softmax_scale;
  double softcap;  // 0 disables
  int64_t window_left;   // -1: unbounded
  int64_t window_right;  // -1: unbounded
};

// Keys visible to query i: [lo, hi], aligned to the bottom-right corner.
// Empty when lo > hi.
struct KeyRange {
  int64_t lo, hi;
};

inline KeyRange visible_keys(int64_t i, int64_t Sq, int64_t Sk, const AttnParams& p) {
  const int64_t diag = i + Sk - Sq;
  const int64_t lo = p.window_left >= 0 ? std::max<int64_t>(0, diag - p.window_left) : 0;
  const int64_t hi = p.window_right >= 0 ? std::min<int64_t>(Sk - 1, diag + p.window_right) : Sk - 1;
  return {lo, hi};
}

// The instruction set the kernels run with: "DEFAULT", "AVX2" or "AVX512".
const char* capability_name();

// out (B, Sq, Hq, D) and lse (B, Hq, Sq) are contiguous and written whole.
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const AttnParams& p, at::Tensor& out, at::Tensor& lse);

// dq, dk, dv are contiguous with q's and k's shapes and written whole.
// Bitwise repeatable for a given thread count (see attention_bwd_cpu.cpp).
void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const AttnParams& p, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

#define GQA_DECLARE_CPU_KERNELS(cap)                                                            \
  namespace cap {                                                                               \
  void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,            \
                     const AttnParams& p, at::Tensor& out, at::Tensor& lse);                    \
  void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,         \
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,         \
                     const AttnParams& p, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);      \
  }
GQA_DECLARE_CPU_KERNELS(DEFAULT)
GQA_DECLARE_CPU_KERNELS(AVX2)
GQA_DECLARE_CPU_KERNELS(AVX512)
#undef GQA_DECLARE_CPU_KERNELS

}  // namespace gqa::cpu
