// Merging partial attention results over disjoint key sets (split-KV,
// cascade or shared-prefix decoding, context parallelism): with
// lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse) * out_i, in fp32,
// by the same merge the forward kernels use for their key splits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <limits>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/tile_ops.h"

namespace gqa::cpu {
namespace CPU_CAPABILITY {
namespace {

// Part i is a finished softmax state: its output normalized (row sum 1) at
// row max lse_i. That is merge_splits' state with m = lse_i and l = 1 (l = 0
// for a part that saw no key), and finish_row turns the merged state into
// the output and its lse.
template <typename scalar_t>
void merge_impl(const at::Tensor& outs, const at::Tensor& lses, at::Tensor& out, at::Tensor& lse) {
  const int64_t N = outs.size(0), M = outs.size(1), D = outs.size(2);
  const scalar_t* op = outs.const_data_ptr<scalar_t>();
  const float* lp = lses.const_data_ptr<float>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  float* lse_dst = lse.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    std::vector<float> parts(N * D), part_m(N), part_l(N), acc(D);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n = 0; n < N; ++n) {
        part_m[n] = lp[n * M + r];
        part_l[n] = part_m[n] == -std::numeric_limits<float>::infinity() ? 0.f : 1.f;
        if (part_l[n] != 0.f) at::vec::convert(op + (n * M + r) * D, parts.data() + n * D, D);
      }
      float m, l;
      merge_splits(N, parts.data(), D, part_m.data(), part_l.data(), 1, D, acc.data(), m, l);
      lse_dst[r] = finish_row(acc.data(), m, l, D, dst + r * D);
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
