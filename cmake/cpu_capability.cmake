# CPU kernels written with at::vec (csrc/cpu/vec/*.cpp) are compiled once per CPU capability, the
# way ATen compiles its native/cpu kernels: each copy gets -DCPU_CAPABILITY=<cap> (so at::vec and
# the kernel live in namespace <cap>) and that capability's instruction-set flags. The op picks a
# copy at run time from at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY); the target
# gets DMAX_CPU_CAPABILITY_<cap> for every copy that exists.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(DMAX_CPU_CAPABILITIES DEFAULT AVX2 AVX512)
else()
  set(DMAX_CPU_CAPABILITIES DEFAULT)
endif()
set(DMAX_CPU_FLAGS_DEFAULT "")
set(DMAX_CPU_FLAGS_AVX2 -mavx2 -mfma -mbmi -mbmi2 -mf16c)
set(DMAX_CPU_FLAGS_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mbmi -mbmi2 -mf16c)

function(dmax_add_cpu_capability_sources target)
  foreach(src ${ARGN})
    get_filename_component(name "${src}" NAME_WE)
    foreach(cap ${DMAX_CPU_CAPABILITIES})
      set(wrapper "${CMAKE_CURRENT_BINARY_DIR}/cpu_capability/${name}.${cap}.cpp")
      file(CONFIGURE OUTPUT "${wrapper}" CONTENT "#include \"${src}\"\n")
      set_source_files_properties("${wrapper}" PROPERTIES
        COMPILE_DEFINITIONS "CPU_CAPABILITY=${cap};CPU_CAPABILITY_${cap}"
        COMPILE_OPTIONS "${DMAX_CPU_FLAGS_${cap}}")
      target_sources(${target} PRIVATE "${wrapper}")
    endforeach()
  endforeach()
  foreach(cap ${DMAX_CPU_CAPABILITIES})
    target_compile_definitions(${target} PRIVATE DMAX_CPU_CAPABILITY_${cap})
  endforeach()
endfunction()
