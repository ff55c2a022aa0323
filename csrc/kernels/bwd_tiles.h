// Tile shapes of the SM80 backward, per head-dim instantiation (the head dims
// are the forward's: fwd_round_head_dim). Host code and the kernel traits
// both read them from here.
#pragma once

namespace gqa::kernels {

struct BwdTileSm80 {
  int block_m;     // query rows per step of a thread block's loop
  int block_n;     // keys a thread block owns
  int warps;
  int atom_m_sdp;  // warps along the rows of S = Q K^T and dP = dO V^T (the rest along the keys)
  int atom_n_dkv;  // warps along the keys of dK and dV (the rest along the head dim)
  int atom_m_dq;   // warps along the rows of dQ (the rest along the head dim)
};

// dK and dV (block_n x head dim each) stay in fp32 registers for the whole
// loop: 128 keys for head dims up to 128, 64 for 256 (128 registers a thread
// for both). 64 query rows a step keep S and dP at 32 registers each; head
// dim 256 takes 32, as dQ's (rows x 256) accumulator would spill at 64.
constexpr BwdTileSm80 bwd_tile_sm80(int head_dim) {
  return head_dim <= 128 ? BwdTileSm80{64, 128, 8, 2, 4, 2} : BwdTileSm80{32, 64, 8, 2, 2, 2};
}

}  // namespace gqa::kernels
