// torch.ops.dmax.step_tables on the kernel path (CUDA, or the simt emulation): checks, then
// launch_step_tables (csrc/cuda/step_tables.cu).
#pragma once
#include <tuple>

#include "common/layer_op_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_tables(
    const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& valid_from,
    const at::Tensor& write_slot, int64_t span, int64_t block_length, at::ScalarType dtype) {
  checks::check_step_tables_args(positions, inv_freq, valid_from, write_slot, span, block_length,
                                 dtype);
  check_kernel_device(positions, "position_ids");
  DeviceGuard guard(positions);
  const int64_t batch = positions.size(0), length = positions.size(1), half = inv_freq.size(0);
  const at::Tensor positions_c = positions.contiguous(), inv_freq_c = inv_freq.contiguous();
  const at::Tensor valid_from_c = valid_from.contiguous(), slot_c = write_slot.contiguous();
  const auto opts = positions.options();
  at::Tensor fed = at::empty({length}, opts);
  at::Tensor cos = at::empty({batch, length, 2 * half}, opts.dtype(dtype));
  at::Tensor sin = at::empty({batch, length, 2 * half}, opts.dtype(dtype));
  at::Tensor mask = at::empty({batch, 1, length, span}, opts.dtype(at::kBool));
#ifdef DMAX_SIMT
  fed.fill_(-1);  // poisoned: an element the emulated kernel forgets to write shows up
  cos.fill_(NAN);
  sin.fill_(NAN);
  mask.view(at::kByte).fill_(2);  // neither true nor false
#endif
  StepTablesArgs args;
  args.positions = positions_c.const_data_ptr<int64_t>();
  args.inv_freq = inv_freq_c.const_data_ptr<float>();
  args.valid_from = valid_from_c.const_data_ptr<int64_t>();
  args.write_slot = slot_c.const_data_ptr<int64_t>();
  args.fed = fed.mutable_data_ptr<int64_t>();
  args.cos = cos.mutable_data_ptr();
  args.sin = sin.mutable_data_ptr();
  args.mask = mask.mutable_data_ptr<bool>();
  args.dtype = float_type_of(dtype);
  args.batch = batch;
  args.length = length;
  args.half = half;
  args.span = span;
  args.block_length = block_length;
  launch_step_tables(args, current_stream(positions));
  return {fed, cos, sin, mask};
}

}  // namespace dmax::gpu
