// Test hooks that force the CUDA forward's heuristic choices, so that the
// tests can cover every path (split-KV counts, query-group packing on and
// off) on shapes of any size. gqa_ext._testing sets them from Python.
#pragma once

namespace gqa {

struct ForwardOverrides {
  int num_splits = 0;  // 0: the heuristic; n >= 1: exactly n (capped at the number of key blocks)
  int pack_gqa = -1;   // -1: the heuristic; 0: off; 1: on
};

// Process-wide; not meant to change while ops run on other threads.
ForwardOverrides& forward_overrides();

}  // namespace gqa
