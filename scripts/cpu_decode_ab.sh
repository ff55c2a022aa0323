#!/usr/bin/env bash
# Before/after timing of the CPU decode kernel: the working tree's
# csrc/cpu/attention_fwd_decode_cpu.cpp against the same file at REV, in one
# process (benchmarks/cpu_decode_ab.cpp says how). Needs torch and a C++20
# compiler; AVX2 only.
#   scripts/cpu_decode_ab.sh REV [HQ HKV L DTYPE [ROUNDS [THREADS]]] ...
# With no case after REV it runs llama3-8b and qwen2.5-7b at L 4096, fp32 and bf16.
# The head dim is 128, or HEAD_DIM from the environment; AB_REPEAT=4 keeps K/V in
# L2 (benchmarks/cpu_decode_ab.cpp says how). It compiles the kernel in its own
# translation unit, where GCC may inline and allocate registers otherwise than in
# the library: check a change to decode_impl's loops on the built library too,
#   gqa-ext bench --device cpu --mode decode --lengths 4096 --impl ours --out DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:?usage: $0 REV [HQ HKV L DTYPE [ROUNDS [THREADS]]]}
shift
if [ $# -gt 6 ] && [ $(($# % 6)) -ne 0 ]; then
  echo "$0: several cases take six fields each (HQ HKV L DTYPE ROUNDS THREADS)" >&2
  exit 2
fi
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" show "$rev:csrc/cpu/attention_fwd_decode_cpu.cpp" > "$work/old.cpp"
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
abi=$("$python" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')
"${CXX:-c++}" -std=gnu++20 -O3 -DNDEBUG -Wno-psabi -mavx2 -mfma -mf16c -fopenmp -DCPU_CAPABILITY_AVX2 \
  -D_GLIBCXX_USE_CXX11_ABI="$abi" -DGQA_OLD_SOURCE="\"$work/old.cpp\"" -I"$root/csrc" \
  -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include" \
  "$root/benchmarks/cpu_decode_ab.cpp" -o "$work/ab" \
  -L"$torch_dir/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib"
if [ $# -eq 0 ]; then
  set -- 32 8 4096 fp32 15 2 32 8 4096 bf16 15 2 28 4 4096 fp32 15 2 28 4 4096 bf16 15 2
fi
# One case of four to six fields, or several of six each.
if [ $# -le 6 ]; then
  "$work/ab" "$@"
else
  while [ $# -gt 0 ]; do
    "$work/ab" "$1" "$2" "$3" "$4" "$5" "$6"
    shift 6
  done
fi
