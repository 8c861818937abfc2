// dmax.step_tables on the CPU: a cached forward's fed slots, rotary cos / sin and block-causal
// mask (the CPU standing for CUDA runs it; the CPU's own decode keeps its tables between a
// frozen model's forwards, LLaDA2MoeModel._step_inputs).
// Semantics: dmax_ext.reference.step_tables_reference; the CUDA kernel:
// csrc/kernels/step_tables.cuh.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "common/layer_op_checks.h"
#include "cpu/dispatch_float.h"
#include "ops_cpu.h"

namespace dmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_tables(
    const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& valid_from,
    const at::Tensor& write_slot, int64_t span, int64_t block_length, at::ScalarType dtype) {
  checks::check_step_tables_args(positions, inv_freq, valid_from, write_slot, span, block_length,
                                 dtype);
  const int64_t batch = positions.size(0), length = positions.size(1), half = inv_freq.size(0);
  const int64_t first = write_slot.item<int64_t>();
  TORCH_CHECK(first >= 0 && first % block_length == 0 && first + length <= span,
              "step_tables: write_slot must be a multiple of block_length (", block_length,
              ") with write_slot + T <= span (", span, "), got ", first, " for T = ", length);
  const at::Tensor positions_c = positions.contiguous(), inv_freq_c = inv_freq.contiguous();
  const at::Tensor valid_from_c = valid_from.contiguous();
  const int64_t* pos = positions_c.const_data_ptr<int64_t>();
  const float* freq = inv_freq_c.const_data_ptr<float>();
  const int64_t* start = valid_from_c.const_data_ptr<int64_t>();
  const auto opts = positions.options();
  at::Tensor fed = at::arange(first, first + length, opts);
  at::Tensor cos = at::empty({batch, length, 2 * half}, opts.dtype(dtype));
  at::Tensor sin = at::empty({batch, length, 2 * half}, opts.dtype(dtype));
  at::Tensor mask = at::empty({batch, 1, length, span}, opts.dtype(at::kBool));
  bool* mask_p = mask.mutable_data_ptr<bool>();
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    T* cos_p = cos.mutable_data_ptr<T>();
    T* sin_p = sin.mutable_data_ptr<T>();
    for (int64_t row = 0; row < batch * length; ++row) {
      const float position = static_cast<float>(pos[row]);
      for (int64_t j = 0; j < 2 * half; ++j) {
        const float angle = position * freq[j < half ? j : j - half];
        cos_p[row * 2 * half + j] = static_cast<T>(std::cos(angle));
        sin_p[row * 2 * half + j] = static_cast<T>(std::sin(angle));
      }
      const int64_t slot = first + row % length;
      const int64_t end = std::min((slot / block_length + 1) * block_length, first + length);
      const int64_t b = row / length;
      for (int64_t s = 0; s < span; ++s) mask_p[row * span + s] = s >= start[b] && s < end;
    }
    return cos;
  });
  return {fed, cos, sin, mask};
}

}  // namespace dmax::cpu
