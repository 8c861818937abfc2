# The test-only build: every csrc/cuda/<op>.cu launcher (and the kernel headers it includes)
# compiled unchanged as host C++ against csrc/simt, plus the torch bindings compiled with
# DMAX_SIMT so they register torch.ops.<namespace>.* on the CPU dispatch key.
file(GLOB DMAX_SIMT_RUNTIME CONFIGURE_DEPENDS "${DMAX_CSRC}/simt/*.cpp")
# find_path skips its search when the cache entry already exists (even empty), so the entry is
# created by find_path itself; -DDMAX_SIMT_CUDA_INCLUDE=... still overrides it.
find_path(DMAX_SIMT_CUDA_INCLUDE cuda_bf16.h
          HINTS "$ENV{CUDA_HOME}/include" /usr/local/cuda/include
          DOC "directory holding cuda_fp16.h / cuda_bf16.h for the host build" REQUIRED)

# g++ does not know the .cu extension, so each launcher gets a one-line C++ wrapper.
set(DMAX_SIMT_WRAPPERS "")
foreach(cu ${DMAX_CUDA_LAUNCHERS})
  get_filename_component(name "${cu}" NAME_WE)
  set(wrapper "${CMAKE_CURRENT_BINARY_DIR}/simt_wrappers/${name}.cpp")
  file(CONFIGURE OUTPUT "${wrapper}" CONTENT "#include \"${cu}\"\n")
  list(APPEND DMAX_SIMT_WRAPPERS "${wrapper}")
endforeach()

function(dmax_add_simt_library target output_name sanitizers)
  add_library(${target} SHARED ${DMAX_SIMT_WRAPPERS} ${DMAX_SIMT_RUNTIME} "${DMAX_CSRC}/cuda/bindings.cpp")
  dmax_link_torch(${target})
  target_include_directories(${target} PRIVATE "${DMAX_CSRC}" "${DMAX_SIMT_CUDA_INCLUDE}")
  target_compile_definitions(${target} PRIVATE DMAX_SIMT)
  # -O1 keeps the emulated kernels quick while staying debuggable; no strict aliasing because
  # kernels type-pun shared memory the way CUDA allows.
  target_compile_options(${target} PRIVATE -O1 -g -fno-strict-aliasing)
  if(sanitizers)
    list(JOIN sanitizers "," san)
    target_compile_definitions(${target} PRIVATE SIMT_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${san} -fno-omit-frame-pointer
                           -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=${san})
  endif()
  set_target_properties(${target} PROPERTIES OUTPUT_NAME "${output_name}" PREFIX ""
                        LIBRARY_OUTPUT_DIRECTORY "${DMAX_OUTPUT_DIR}")
endfunction()
