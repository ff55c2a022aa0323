# CUDA setup for torch's CMake config, which needs, before find_package(Torch):
#  - the CUDA toolkit of GQA_NVCC (found from CUDA_HOME/CUDA_PATH or PATH);
#  - TORCH_CUDA_ARCH_LIST, or it asks nvcc for archs that CUDA 13 rejects;
#  - nvrtc and the cuBLAS/cuSPARSE headers, which a minimal toolkit lacks but
#    the nvidia-* wheels that a CUDA build of torch depends on carry.

set(CMAKE_CUDA_COMPILER "${GQA_NVCC}")

if("$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
# Torch turns TORCH_CUDA_ARCH_LIST into -gencode flags itself and ignores
# (with a warning) CMake's own architecture setting, so that stays off.
set(CMAKE_CUDA_ARCHITECTURES OFF)
set(CMAKE_CUDA_STANDARD 20)
enable_language(CUDA)
# nvcc may be a wrapper script; CMake asks it where its toolkit really is.
set(_gqa_cuda_root "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
set(CUDAToolkit_ROOT "${_gqa_cuda_root}")
set(CUDA_TOOLKIT_ROOT_DIR "${_gqa_cuda_root}")

# The nvidia wheels beside torch: nvidia/cu13/{lib,include} (CUDA 13) or
# nvidia/<lib>/{lib,include} (CUDA 12).
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
          "import importlib.util as u, os; s = u.find_spec('nvidia'); print(';'.join(s.submodule_search_locations) if s else '')"
  OUTPUT_VARIABLE _gqa_nvidia_dirs OUTPUT_STRIP_TRAILING_WHITESPACE)
set(_gqa_wheel_lib_dirs)
set(_gqa_wheel_inc_dirs)
foreach(d IN LISTS _gqa_nvidia_dirs)
  file(GLOB _subs LIST_DIRECTORIES true "${d}/*")
  foreach(s IN LISTS _subs)
    if(IS_DIRECTORY "${s}/lib")
      list(APPEND _gqa_wheel_lib_dirs "${s}/lib")
    endif()
    if(IS_DIRECTORY "${s}/include")
      list(APPEND _gqa_wheel_inc_dirs "${s}/include")
    endif()
  endforeach()
endforeach()

find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
             HINTS "${_gqa_cuda_root}/lib64" "${_gqa_cuda_root}/lib" ${_gqa_wheel_lib_dirs})
find_path(GQA_CUBLAS_INCLUDE_DIR cublas_v2.h
          HINTS "${_gqa_cuda_root}/include" ${_gqa_wheel_inc_dirs})
find_path(GQA_CUSPARSE_INCLUDE_DIR cusparse.h
          HINTS "${_gqa_cuda_root}/include" ${_gqa_wheel_inc_dirs})
foreach(v CUDA_nvrtc_LIBRARY GQA_CUBLAS_INCLUDE_DIR GQA_CUSPARSE_INCLUDE_DIR)
  if(NOT ${v})
    message(FATAL_ERROR "gqa_ext: ${v} not found in the CUDA toolkit at ${_gqa_cuda_root} "
                        "nor in the nvidia wheels beside torch (${_gqa_nvidia_dirs}).")
  endif()
endforeach()
include_directories(SYSTEM ${GQA_CUBLAS_INCLUDE_DIR} ${GQA_CUSPARSE_INCLUDE_DIR})

if(NOT CUTLASS_INCLUDE_DIR)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
            "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
    OUTPUT_VARIABLE CUTLASS_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
if(NOT EXISTS "${CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  message(FATAL_ERROR "gqa_ext: CuTe headers not found (CUTLASS_INCLUDE_DIR='${CUTLASS_INCLUDE_DIR}'); "
                      "pip install nvidia-cutlass or set CUTLASS_INCLUDE_DIR.")
endif()
message(STATUS "gqa_ext: CUDA ${_gqa_cuda_root}, archs $ENV{TORCH_CUDA_ARCH_LIST}, CUTLASS ${CUTLASS_INCLUDE_DIR}")
