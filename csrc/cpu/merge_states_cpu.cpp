// Merging partial attention results over disjoint key sets (split-KV,
// cascade or shared-prefix decoding, context parallelism): with
// lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse) * out_i, in fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/tile_ops.h"

namespace gqa::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void merge_impl(const at::Tensor& outs, const at::Tensor& lses, at::Tensor& out, at::Tensor& lse) {
  const int64_t N = outs.size(0), M = outs.size(1), D = outs.size(2);
  const scalar_t* op = outs.const_data_ptr<scalar_t>();
  const float* lp = lses.const_data_ptr<float>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  float* lse_dst = lse.data_ptr<float>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D), row(D);
    for (int64_t r = begin; r < end; ++r) {
      float mx = kNegInf;
      for (int64_t n = 0; n < N; ++n) mx = std::max(mx, lp[n * M + r]);
      if (mx == kNegInf) {  // no part saw a key (also the only way to get NaN weights below)
        fill(dst + r * D, D, scalar_t(0));
        lse_dst[r] = kNegInf;
        continue;
      }
      fill(acc.data(), D, 0.f);
      float sum = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float w = std::exp(lp[n * M + r] - mx);  // 0 for a part that is -inf
        if (w == 0.f) continue;
        sum += w;
        at::vec::convert(op + (n * M + r) * D, row.data(), D);
        at::vec::map2([w](auto a, auto x) { return a + x * decltype(x)(w); }, acc.data(), acc.data(), row.data(), D);
      }
      copy_scaled(acc.data(), dst + r * D, D, 1.f / sum);
      lse_dst[r] = mx + std::log(sum);
    }
  });
}

}  // namespace

void merge_states(const at::Tensor& outs, const at::Tensor& lses, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, outs.scalar_type(), "gqa_merge_states_cpu", [&] {
    merge_impl<scalar_t>(outs, lses, out, lse);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
