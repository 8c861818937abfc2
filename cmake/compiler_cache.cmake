# ccache makes the second build (and CI with a warm cache) incremental; it is optional.
find_program(DMAX_CCACHE ccache)
if(DMAX_CCACHE)
  set(CMAKE_CXX_COMPILER_LAUNCHER "${DMAX_CCACHE}")
  set(CMAKE_CUDA_COMPILER_LAUNCHER "${DMAX_CCACHE}")
endif()
