// plan_fwd and run_fwd: the forward's launch decisions and dispatch.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/dispatch_sm80.h"
#include "kernels/fwd_combine.h"
#include "kernels/fwd_params.h"
#include "kernels/fwd_sm80.h"
#include "kernels/fwd_tiles.h"

namespace gqa::kernels {
namespace {

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Splits of the key range so that the grid fills the GPU: the fewest splits
// whose last wave is nearly as full as the best choice's. One split when the
// grid already covers most of the resident slots.
int num_splits_heuristic(int64_t tasks, int slots, int n_blocks, int max_splits) {
  if (tasks >= slots * 4 / 5 || n_blocks <= 1) return 1;
  max_splits = std::min({max_splits, n_blocks, 128});
  auto efficiency = [&](int s) {
    const int64_t ctas = tasks * s;
    const int64_t waves = (ctas + slots - 1) / slots;
    return double(ctas) / double(waves * slots);
  };
  double best = 0;
  for (int s = 1; s <= max_splits; ++s) best = std::max(best, efficiency(s));
  for (int s = 1; s <= max_splits; ++s) {
    // A split of a single key block barely pays for its Q load and partials.
    if (efficiency(s) >= 0.85 * best) return s;
  }
  return 1;
}

// j / d as umulhi(j, mul) >> shift for 0 <= j < 2^31 (the round-up
// reciprocal of CUTLASS's FastDivmod): shift = ceil(log2 d) - 1 and
// mul = ceil(2^(32 + shift) / d), which fits 32 bits; d = 1 gets mul = 0.
void set_page_divisor(FwdParams& p) {
  const uint32_t d = static_cast<uint32_t>(p.page_block_size);
  if (d == 1) {
    p.page_div_mul = 0;
    p.page_div_shift = 0;
    return;
  }
  int log2_ceil = 0;
  while ((uint64_t(1) << log2_ceil) < d) ++log2_ceil;
  const int shift = log2_ceil - 1;
  p.page_div_mul = static_cast<uint32_t>(((uint64_t(1) << (32 + shift)) + d - 1) / d);
  p.page_div_shift = shift;
}

}  // namespace

FwdPlan plan_fwd(const FwdParams& params, int device, int force_splits, int force_pack) {
  const FwdTileSm80 tile = fwd_tile_sm80(fwd_round_head_dim(params.head_dim));
  const int group = params.heads_q / params.heads_kv;

  // Packing folds the G query heads of a group into the rows of a tile. It
  // never costs compute (the same rows get computed either way), shares each
  // K/V tile load among the group, and fills decode tiles; it is skipped
  // only where it cannot help: groups of 1, or when Sq alone already fills
  // the row blocks at least as well.
  bool pack = force_pack == 1;
  if (force_pack < 0 && group > 1) {
    const int64_t packed_rows = int64_t(params.seqlen_q) * group;
    const double fill_packed = double(packed_rows) / (ceil_div(packed_rows, tile.block_m) * int64_t(tile.block_m));
    const double fill_plain = double(params.seqlen_q) / (ceil_div(params.seqlen_q, tile.block_m) * int64_t(tile.block_m));
    pack = fill_packed >= fill_plain;
  }

  const int64_t rows = int64_t(params.seqlen_q) * (pack ? group : 1);
  const int64_t tasks = int64_t(params.batch) * (pack ? params.heads_kv : params.heads_q) * ceil_div(rows, tile.block_m);
  const int n_blocks = ceil_div(params.seqlen_k, tile.block_n);
  int splits = 1;
  if (force_splits > 0) {
    splits = std::min({force_splits, std::max(n_blocks, 1), fwd_combine_max_splits()});
  } else if (tasks > 0 && n_blocks > 1) {
    int num_sms = 0;
    GQA_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
    const int ctas = dispatch_sm80(params, [&]<class Element, int kHeadDim>() {
      return FwdSm80<Element, kHeadDim>::ctas_per_sm(device);
    });
    splits = num_splits_heuristic(tasks, num_sms * ctas, n_blocks, fwd_combine_max_splits());
  }
  const int64_t row_count = fwd_combine_rows(params);
  return FwdPlan{splits, pack, splits > 1 ? splits * row_count * params.head_dim : 0,
                 splits > 1 ? splits * row_count : 0};
}

void run_fwd(const FwdParams& params_in, cudaStream_t stream) {
  if (params_in.batch == 0 || params_in.seqlen_q == 0 || params_in.heads_q == 0) return;
  FwdParams params = params_in;
  if (params.block_table != nullptr) {
    if (params.page_block_size <= 0) {
      throw std::invalid_argument("gqa_ext: paged K/V needs page_block_size > 0, got " +
                                  std::to_string(params.page_block_size));
    }
    set_page_divisor(params);
  }
  dispatch_sm80(params, [&]<class Element, int kHeadDim>() { FwdSm80<Element, kHeadDim>::run(params, stream); });
  if (params.num_splits > 1) run_fwd_combine(params, stream);
}

}  // namespace gqa::kernels
