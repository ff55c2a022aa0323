// One forward instantiation per file: see fwd_sm80.h.
#include "kernels/fwd_launch_sm80.cuh"

template struct gqa::kernels::FwdSm80<cutlass::bfloat16_t, 128>;
