// run_bwd: the backward's passes, in order.
#include "kernels/bwd_params.h"
#include "kernels/bwd_prepost.h"
#include "kernels/bwd_sm80.h"
#include "kernels/bwd_tiles.h"
#include "kernels/dispatch_sm80.h"

namespace gqa::kernels {

int64_t bwd_semaphore_count(const BwdParams& params) {
  const int block_m = bwd_tile_sm80(fwd_round_head_dim(params.head_dim)).block_m;
  return int64_t(params.batch) * params.heads_q * ((params.seqlen_q + block_m - 1) / block_m);
}

void run_bwd(const BwdParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.seqlen_q == 0 || params.seqlen_k == 0 || params.heads_q == 0) return;
  run_bwd_dot_do_o(params, stream);
  dispatch_sm80(params, [&]<class Element, int kHeadDim>() { BwdSm80<Element, kHeadDim>::run(params, stream); });
  run_bwd_convert_dq(params, stream);
}

}  // namespace gqa::kernels
