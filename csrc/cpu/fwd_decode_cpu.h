// The CPU forward for decode-shaped problems: few query rows per KV head.
// Included only by the per-instruction-set kernel sources.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu/attention_cpu.h"

#ifndef CPU_CAPABILITY
#error "fwd_decode_cpu.h is for the per-instruction-set kernel sources"
#endif

namespace gqa::cpu {
namespace CPU_CAPABILITY {

// Whether attention_fwd_decode should run this problem: float32, bfloat16 or
// float16, with at most a handful of (query position, group head) rows per KV
// head, where tile GEMMs would spend more time packing than multiplying.
bool use_decode_kernel(const at::Tensor& q, const at::Tensor& k);

// Same contract as attention_fwd.
void attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                          at::Tensor& out, at::Tensor& lse);

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
