// One backward instantiation per file: see bwd_sm80.h.
#include "kernels/bwd_launch_sm80.cuh"

template struct gqa::kernels::BwdSm80<cutlass::half_t, 256>;
