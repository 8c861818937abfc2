# Torch is found through the Python package (TORCH_PY_DIR), not through TorchConfig.cmake: the
# library is loaded with torch.ops.load_library and needs no pybind11, and skipping Caffe2's CMake
# keeps configuration fast and independent of the CUDA toolkit that torch was built with.
if(NOT TORCH_PY_DIR)
  execute_process(COMMAND python3 -c "import torch, os; print(os.path.dirname(torch.__file__))"
                  OUTPUT_VARIABLE TORCH_PY_DIR OUTPUT_STRIP_TRAILING_WHITESPACE)
endif()
if(NOT EXISTS "${TORCH_PY_DIR}/include/torch/library.h")
  message(FATAL_ERROR "TORCH_PY_DIR='${TORCH_PY_DIR}' is not a torch installation")
endif()
if(NOT DEFINED TORCH_CXX11_ABI)
  set(TORCH_CXX11_ABI 1)
endif()
set(DMAX_TORCH_LIB_DIR "${TORCH_PY_DIR}/lib")
find_library(DMAX_TORCH_CPU torch_cpu PATHS "${DMAX_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(DMAX_TORCH torch PATHS "${DMAX_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(DMAX_C10 c10 PATHS "${DMAX_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(DMAX_C10_CUDA c10_cuda PATHS "${DMAX_TORCH_LIB_DIR}" NO_DEFAULT_PATH)
find_library(DMAX_TORCH_CUDA torch_cuda PATHS "${DMAX_TORCH_LIB_DIR}" NO_DEFAULT_PATH)
set(DMAX_TORCH_CUDA_LIBRARIES ${DMAX_C10_CUDA} ${DMAX_TORCH_CUDA})

function(dmax_link_torch target)
  target_include_directories(${target} SYSTEM PRIVATE
    "${TORCH_PY_DIR}/include" "${TORCH_PY_DIR}/include/torch/csrc/api/include")
  target_compile_definitions(${target} PRIVATE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})
  target_link_libraries(${target} PRIVATE ${DMAX_TORCH} ${DMAX_TORCH_CPU} ${DMAX_C10})
  set_target_properties(${target} PROPERTIES BUILD_RPATH "${DMAX_TORCH_LIB_DIR}"
                        INSTALL_RPATH "${DMAX_TORCH_LIB_DIR}")
endfunction()
