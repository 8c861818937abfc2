// torch.ops.dmax.promote on the kernel path (CUDA, or the simt emulation): checks, then
// launch_promote (csrc/cuda/promote.cu).
#pragma once
#include "common/spd_checks.h"
#include "cuda/bindings/common.h"
#include "cuda/launchers.h"

namespace dmax::gpu {

inline at::Tensor promote(const at::Tensor& ids, const at::Tensor& conf, const at::Tensor& pred,
                          double threshold, int64_t mask_id, bool prefix) {
  checks::check_promote_args(ids, conf, pred, threshold);
  check_kernel_device(ids, "ids");
  DeviceGuard guard(ids);
  const auto ids_c = ids.contiguous(), conf_c = conf.contiguous(), pred_c = pred.contiguous();
  auto promoted = at::empty(ids.sizes(), ids.options().dtype(at::kBool));
#ifdef DMAX_SIMT
  promoted.fill_(true);  // poisoned: a position the emulated kernel forgets to write shows up
#endif
  launch_promote(ids_c.const_data_ptr<int64_t>(), conf_c.const_data_ptr<float>(),
                 pred_c.const_data_ptr<int64_t>(), promoted.mutable_data_ptr<bool>(), ids.size(0),
                 ids.size(1), static_cast<float>(threshold), mask_id, prefix, current_stream(ids));
  return promoted;
}

}  // namespace dmax::gpu
