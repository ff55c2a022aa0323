# A CPU-only build against a CUDA build of torch. Torch's CMake config for a
# CUDA build fails unless it finds a CUDA toolkit, which a CPU-only extension
# neither needs nor may have (pip's default torch is a CUDA build), so this
# describes the CPU libraries it needs directly.
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
          "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _gqa_out OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
string(REPLACE "\n" ";" _gqa_out "${_gqa_out}")
list(GET _gqa_out 0 TORCH_INSTALL_PREFIX)
list(GET _gqa_out 1 _gqa_abi)

add_library(gqa_torch_cpu INTERFACE)
target_include_directories(gqa_torch_cpu SYSTEM INTERFACE
  "${TORCH_INSTALL_PREFIX}/include" "${TORCH_INSTALL_PREFIX}/include/torch/csrc/api/include")
target_compile_definitions(gqa_torch_cpu INTERFACE _GLIBCXX_USE_CXX11_ABI=${_gqa_abi})
foreach(lib c10 torch_cpu torch)
  find_library(GQA_TORCH_LIB_${lib} ${lib} PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(gqa_torch_cpu INTERFACE "${GQA_TORCH_LIB_${lib}}")
endforeach()
set(GQA_TORCH_TARGET gqa_torch_cpu)
