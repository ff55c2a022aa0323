// The Python module gqa_ext._C: loading it registers the ops (ops*.cpp);
// build_info() says what this build contains.
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

#include "cpu/attention_cpu.h"
#include "torch/fwd_overrides.h"
#ifdef GQA_EXT_WITH_CUDA
#include "kernels/build_info.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = GQA_EXT_VERSION;
  d["torch_version"] = GQA_TORCH_VERSION;
  d["cpu_kernels"] = gqa::cpu::capability_name();  // the instruction set in use
#ifdef GQA_EXT_WITH_CUDA
  const int v = gqa::kernels::built_cuda_version();
  d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  py::list archs;
  std::stringstream ss(gqa::kernels::built_cuda_archs());
  for (std::string a; std::getline(ss, a, ',');) {
    const int n = std::stoi(a);
    archs.append(std::to_string(n / 100) + "." + std::to_string(n % 100 / 10));
  }
  d["cuda_archs"] = archs;
  d["cutlass_version"] = gqa::kernels::built_cutlass_version();
#else
  d["cuda_version"] = py::none();
  d["cuda_archs"] = py::list();
  d["cutlass_version"] = py::none();
#endif
#ifdef GQA_EXT_WITH_CUDA
  d["cuda_kernels"] = true;
#else
  d["cuda_kernels"] = false;
#endif
  return d;
}

}  // namespace

namespace gqa {

ForwardOverrides& forward_overrides() {
  static ForwardOverrides overrides;
  return overrides;
}

}  // namespace gqa

PYBIND11_MODULE(_C, m) {
  m.doc() = "gqa_ext native ops (registered as torch.ops.gqa.*)";
  m.def("build_info", &build_info, "What this build of gqa_ext contains.");
  m.def(
      "_set_forward_overrides",
      [](int num_splits, int pack_gqa) {
        if (num_splits < 0) throw py::value_error("num_splits must be >= 0 (0 = heuristic)");
        if (pack_gqa < -1 || pack_gqa > 1) throw py::value_error("pack_gqa must be -1 (heuristic), 0 or 1");
        gqa::forward_overrides() = {num_splits, pack_gqa};
      },
      py::arg("num_splits"), py::arg("pack_gqa"), "Testing hook: see gqa_ext._testing.");
}
