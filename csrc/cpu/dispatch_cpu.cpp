#include "cpu/attention_cpu.h"

#include <ATen/Version.h>

namespace gqa::cpu {

namespace {
enum class Isa { DEFAULT, AVX2, AVX512 };

// ATen's own choice (the best the CPU supports, lowered by
// ATEN_CPU_CAPABILITY), through the one form of it that torch exports.
Isa capability() {
  static const Isa isa = [] {
    const std::string c = at::get_cpu_capability();
    return c == "AVX512" ? Isa::AVX512 : c == "AVX2" ? Isa::AVX2 : Isa::DEFAULT;
  }();
  return isa;
}
}  // namespace

const char* capability_name() {
  switch (capability()) {
    case Isa::AVX512: return "AVX512";
    case Isa::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const AttnParams& p, at::Tensor& out, at::Tensor& lse) {
  switch (capability()) {
    case Isa::AVX512: return AVX512::attention_fwd(q, k, v, p, out, lse);
    case Isa::AVX2: return AVX2::attention_fwd(q, k, v, p, out, lse);
    default: return DEFAULT::attention_fwd(q, k, v, p, out, lse);
  }
}

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const AttnParams& p, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  switch (capability()) {
    case Isa::AVX512:
      return AVX512::attention_bwd(dout, q, k, v, out, lse, p, dq, dk, dv);
    case Isa::AVX2:
      return AVX2::attention_bwd(dout, q, k, v, out, lse, p, dq, dk, dv);
    default: return DEFAULT::attention_bwd(dout, q, k, v, out, lse, p, dq, dk, dv);
  }
}

void attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                          const SeqLayout& seqs, int64_t max_seqlen_q, at::Tensor& out, at::Tensor& lse) {
  switch (capability()) {
    case Isa::AVX512: return AVX512::attention_fwd_decode(q, k, v, p, seqs, max_seqlen_q, out, lse);
    case Isa::AVX2: return AVX2::attention_fwd_decode(q, k, v, p, seqs, max_seqlen_q, out, lse);
    default: return DEFAULT::attention_fwd_decode(q, k, v, p, seqs, max_seqlen_q, out, lse);
  }
}

void merge_states(const at::Tensor& outs, const at::Tensor& lses, at::Tensor& out, at::Tensor& lse) {
  switch (capability()) {
    case Isa::AVX512: return AVX512::merge_states(outs, lses, out, lse);
    case Isa::AVX2: return AVX2::merge_states(outs, lses, out, lse);
    default: return DEFAULT::merge_states(outs, lses, out, lse);
  }
}

}  // namespace gqa::cpu
