// Before/after timing of the CPU decode kernel (csrc/cpu/attention_fwd_decode_cpu.cpp):
// the source at another commit (A, GQA_OLD_SOURCE, built into namespace AVX2) against the
// working tree's (B, namespace NEW), both AVX2, in one process. A decode step, as
// `gqa-ext bench --device cpu --mode decode` times it: one query per sequence over as
// many layers' caches as make 256 MB, so that K/V come from memory. A and B alternate
// (ABBA) round by round and the median of B/A is reported, because this machine's
// speed drifts by more than the changes measured. With AB_REPEAT=n in the
// environment, each layer's cache is instead read as a paged cache whose block
// table cycles over n blocks of 16 keys, so that K/V stay in L2 (n = 4: 256 KB
// for llama3-8b bf16): the kernel's compute alone, with the same prefetch
// instructions. Built and run by scripts/cpu_decode_ab.sh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CPU_CAPABILITY AVX2
#include GQA_OLD_SOURCE
#undef CPU_CAPABILITY
#define CPU_CAPABILITY NEW
// tile_ops.h was included once, into AVX2; B finds its helpers there.
namespace gqa::cpu::NEW {
using AVX2::exp_shift_sum;
using AVX2::fill;
using AVX2::finish_row;
using AVX2::merge_splits;
using AVX2::move_row_max;
using AVX2::scale_inplace;
using AVX2::transform_scores;
}  // namespace gqa::cpu::NEW
#include "cpu/attention_fwd_decode_cpu.cpp"

namespace {
using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }
double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s HQ HKV L fp32|bf16 [ROUNDS] [THREADS]\n", argv[0]);
    return 2;
  }
  const int64_t hq = std::stoll(argv[1]), hkv = std::stoll(argv[2]), len = std::stoll(argv[3]);
  const char* head_dim = std::getenv("HEAD_DIM");  // 128 by default
  const int64_t d = head_dim ? std::stoll(head_dim) : 128;
  const std::string dtype_name = argv[4];
  const auto dtype = dtype_name == "bf16" ? at::kBFloat16 : at::kFloat;
  const int rounds = argc > 5 ? std::stoi(argv[5]) : 15;
  at::set_num_threads(argc > 6 ? std::stoi(argv[6]) : 2);

  const int64_t kv_bytes = 2 * len * hkv * d * at::elementSize(dtype);
  const int64_t layers = std::max<int64_t>(1, (int64_t(256) << 20) / kv_bytes);
  std::vector<at::Tensor> ks, vs;
  for (int64_t i = 0; i < layers; ++i) {
    ks.push_back(at::randn({1, len, hkv, d}).to(dtype));
    vs.push_back(at::randn({1, len, hkv, d}).to(dtype));
  }
  const at::Tensor q = at::randn({1, 1, hq, d}).to(dtype);
  at::Tensor out_a = at::empty_like(q), out_b = at::empty_like(q);
  at::Tensor lse_a = at::empty({1, hq, 1}, q.options().dtype(at::kFloat)), lse_b = at::empty_like(lse_a);
  const gqa::cpu::AttnParams params{1.0 / std::sqrt(double(d)), 0.0, -1, 0};
  const char* repeat = std::getenv("AB_REPEAT");
  gqa::cpu::SeqLayout seqs{};
  at::Tensor table, used;  // seqs points into these
  if (repeat) {
    if (len % 16 != 0) {
      std::fprintf(stderr, "AB_REPEAT needs L a multiple of 16\n");
      return 2;
    }
    const int64_t n = std::stoll(repeat), nb = len / 16;
    for (int64_t i = 0; i < layers; ++i) {
      ks[i] = ks[i].view({nb, 16, hkv, d});
      vs[i] = vs[i].view({nb, 16, hkv, d});
    }
    table = at::arange(nb, at::kInt).remainder(n).view({1, nb}).contiguous();
    used = at::full({1}, len, at::kInt);
    seqs.block_table = table.data_ptr<int32_t>();
    seqs.block_table_stride = nb;
    seqs.block_size = 16;
    seqs.seqused_k = used.data_ptr<int32_t>();
  }
  const auto step = [&](bool b) {
    const auto t = Clock::now();
    for (int64_t i = 0; i < layers; ++i) {
      if (b) {
        gqa::cpu::NEW::attention_fwd_decode(q, ks[i], vs[i], params, seqs, 1, out_b, lse_b);
      } else {
        gqa::cpu::AVX2::attention_fwd_decode(q, ks[i], vs[i], params, seqs, 1, out_a, lse_a);
      }
    }
    return ms_since(t) / layers;
  };
  // The read-bandwidth ceiling as the bench measures it: a sum over 512 MB.
  const at::Tensor big = at::ones({int64_t(128) << 20}, at::kFloat);
  std::vector<double> ta, tb, ratio, read_gbps;
  step(false), step(true);
  for (int r = 0; r < rounds; ++r) {
    double a, b;
    if (r % 2) {
      a = step(false), b = step(true);
    } else {
      b = step(true), a = step(false);
    }
    ta.push_back(a), tb.push_back(b), ratio.push_back(b / a);
    const auto t = Clock::now();
    big.sum().item<float>();
    read_gbps.push_back(double(big.nbytes()) / ms_since(t) / 1e6);
  }
  const double diff = (out_a.to(at::kFloat) - out_b.to(at::kFloat)).abs().max().item<float>();
  const double read = *std::max_element(read_gbps.begin(), read_gbps.end());
  const auto pct = [&](double ms) { return kv_bytes / ms / 1e6 / read * 100; };
  std::printf("%ld/%ld D%ld L%ld %s: A %.3f ms (%.0f%% of read) B %.3f ms (%.0f%%), read %.1f GB/s; B/A median %.3f; "
              "max|A-B| %.2g\n",
              long(hq), long(hkv), long(d), long(len), dtype_name.c_str(), median(ta), pct(median(ta)), median(tb),
              pct(median(tb)), read, median(ratio), diff);
  return 0;
}
