// Launcher of the step_tables kernel (csrc/kernels/step_tables.cuh) over raw device pointers:
// picks the element type of cos / sin.
#include <cstdint>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "kernels/step_tables.cuh"

namespace dmax {
namespace {

template <class T>
void step_tables_typed(const StepTablesArgs& a, cudaStream_t stream) {
  const LaunchConfig cfg =
      kernels::step_tables_launch_config(a.batch * a.length, a.half, a.span);
  const auto step_tables_kernel = &kernels::step_tables_kernel<T>;
  DMAX_LAUNCH(step_tables_kernel, cfg.grid, cfg.block, cfg.smem_bytes, stream)(
      a.positions, a.inv_freq, a.valid_from, a.write_slot, a.fed, static_cast<T*>(a.cos),
      static_cast<T*>(a.sin), a.mask, static_cast<int>(a.length), static_cast<int>(a.half),
      static_cast<int>(a.span), static_cast<int>(a.block_length));
}

}  // namespace

void launch_step_tables(const StepTablesArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.length == 0) return;
  with_element_type(args.dtype,
                    [&](auto t) { step_tables_typed<decltype(t)>(args, stream); });
  DMAX_CHECK_LAUNCH("step_tables");
}

}  // namespace dmax
