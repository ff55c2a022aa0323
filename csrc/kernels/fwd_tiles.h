// Tile shapes of the SM80 forward, per head-dim instantiation. Host planning
// code and the kernel traits both read them from here.
#pragma once

namespace gqa::kernels {

struct FwdTileSm80 {
  int block_m;  // rows: query positions, or (position, head) pairs when packed
  int block_n;  // keys per K/V tile
  int warps;    // warps split the rows, 16 per MMA atom
};

// 4 warps with two 16-row MMA fragments each (block_m 128) read each K/V
// fragment from shared memory once for 32 rows, which keeps ldmatrix traffic
// under the tensor cores' rate; head dim 256 halves block_m to fit registers.
constexpr FwdTileSm80 fwd_tile_sm80(int head_dim) {
  return head_dim <= 64 ? FwdTileSm80{128, 128, 8} : head_dim <= 128 ? FwdTileSm80{128, 64, 8} : FwdTileSm80{64, 16, 4};
}

// The instantiated head dims: the smallest one >= the actual head dim runs,
// with the columns beyond it zero-filled.
constexpr int fwd_round_head_dim(int head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

}  // namespace gqa::kernels
