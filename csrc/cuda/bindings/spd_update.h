// torch.ops.dmax.spd_update on the kernel path (CUDA, or the simt emulation): checks, then
// launch_spd_update (csrc/cuda/spd_update.cu).
#pragma once
#include <tuple>

#include "common/spd_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> spd_update(
    const at::Tensor& ids, const at::Tensor& active, const at::Tensor& promoted,
    const at::Tensor& pred, const at::Tensor& conf, double accept_threshold, int64_t mask_id) {
  checks::check_spd_update_args(ids, active, promoted, pred, conf, accept_threshold);
  check_kernel_device(ids, "ids");
  DeviceGuard guard(ids);
  const auto ids_c = ids.contiguous(), active_c = active.contiguous();
  const auto promoted_c = promoted.contiguous(), pred_c = pred.contiguous();
  const auto conf_c = conf.contiguous();
  const int64_t B = ids.size(0), L = ids.size(1);
  auto new_ids = at::empty({B, L}, ids.options());
  auto changed = at::empty({B, L}, ids.options().dtype(at::kBool));
  auto converged = at::empty({B}, ids.options().dtype(at::kBool));
#ifdef DMAX_SIMT
  // Poisoned: an element the emulated kernel forgets to write fails the comparison.
  new_ids.fill_(-1);
  changed.fill_(true);
  converged.fill_(false);
#endif
  launch_spd_update(ids_c.const_data_ptr<int64_t>(), active_c.const_data_ptr<bool>(),
                    promoted_c.const_data_ptr<bool>(), pred_c.const_data_ptr<int64_t>(),
                    conf_c.const_data_ptr<float>(), B, L, static_cast<float>(accept_threshold),
                    mask_id, new_ids.mutable_data_ptr<int64_t>(), changed.mutable_data_ptr<bool>(),
                    converged.mutable_data_ptr<bool>(), current_stream(ids));
  return {new_ids, changed, converged};
}

}  // namespace dmax::gpu
