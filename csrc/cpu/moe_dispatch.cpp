// dmax.moe_dispatch and dmax.moe_combine on the CPU: the permutation around a MoE layer's grouped
// GEMMs (a stable counting sort of the routed entries by expert; the weighted sum back per token).
// Semantics: dmax_ext.reference.moe_dispatch_reference / moe_combine_reference; the CUDA
// kernels: csrc/kernels/moe_dispatch.cuh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/layer_op_checks.h"
#include "cpu/dispatch_float.h"
#include "ops_cpu.h"

namespace dmax::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch(const at::Tensor& ids,
                                                            int64_t n_experts) {
  checks::check_moe_dispatch_args(ids, n_experts);
  const at::Tensor ids_c = ids.contiguous();
  const int64_t entries = ids.numel(), k = ids.size(1);
  const int64_t* id = ids_c.const_data_ptr<int64_t>();
  std::vector<int64_t> starts(n_experts + 1, 0);
  for (int64_t i = 0; i < entries; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < n_experts, "moe_dispatch: ids must be in [0, ", n_experts,
                "), got ", id[i], " at entry ", i);
    ++starts[id[i] + 1];
  }
  const auto long_opts = ids.options();
  at::Tensor rows = at::empty({entries}, long_opts);
  at::Tensor inverse = at::empty({entries}, long_opts);
  at::Tensor offsets = at::empty({n_experts}, long_opts.dtype(at::kInt));
  int32_t* offsets_p = offsets.mutable_data_ptr<int32_t>();
  for (int64_t e = 0; e < n_experts; ++e) {
    starts[e + 1] += starts[e];
    offsets_p[e] = static_cast<int32_t>(starts[e + 1]);
  }
  int64_t* rows_p = rows.mutable_data_ptr<int64_t>();
  int64_t* inverse_p = inverse.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < entries; ++i) {  // entry order within an expert: a stable sort
    const int64_t place = starts[id[i]]++;
    rows_p[place] = i / k;
    inverse_p[i] = place;
  }
  return {rows, inverse, offsets};
}

at::Tensor moe_combine(const at::Tensor& sorted_out, const at::Tensor& inverse,
                       const at::Tensor& weights, const std::optional<at::Tensor>& addend,
                       const std::optional<at::Tensor>& residual) {
  checks::check_moe_combine_args(sorted_out, inverse, weights, addend, residual);
  const at::Tensor addend_c = addend.has_value() ? addend->contiguous() : at::Tensor();
  const at::Tensor residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor x = sorted_out.contiguous(), inverse_c = inverse.contiguous();
  const at::Tensor weights_c = weights.contiguous();
  const int64_t tokens = weights.size(0), k = weights.size(1), H = sorted_out.size(1);
  const int64_t* places = inverse_c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < inverse.numel(); ++i) {
    TORCH_CHECK(places[i] >= 0 && places[i] < sorted_out.size(0), "moe_combine: inverse must be "
                "in [0, ", sorted_out.size(0), "), got ", places[i], " at entry ", i);
  }
  at::Tensor out = at::empty({tokens, H}, x.options());
  return dispatch_float(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* x_p = x.const_data_ptr<T>();
    const float* w_p = weights_c.const_data_ptr<float>();
    T* out_p = out.mutable_data_ptr<T>();
    const T* add_p = addend.has_value() ? addend_c.const_data_ptr<T>() : nullptr;
    const T* res_p = residual.has_value() ? residual_c.const_data_ptr<T>() : nullptr;
    at::parallel_for(0, tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(k * H, 1)),
                     [&](int64_t begin, int64_t end) {
      std::vector<float> acc(H);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < k; ++j) {  // j in order, each product rounded, then added
          const float w = w_p[n * k + j];
          const T* row = x_p + places[n * k + j] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += w * static_cast<float>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) out_p[n * H + h] = static_cast<T>(acc[h]);
        // T(T(sum) + addend), then T(that + residual): each add of two rounded tensors.
        for (const T* term : {add_p, res_p}) {
          if (term == nullptr) continue;
          for (int64_t h = 0; h < H; ++h) {
            out_p[n * H + h] = static_cast<T>(static_cast<float>(out_p[n * H + h]) +
                                              static_cast<float>(term[n * H + h]));
          }
        }
      }
    });
    return out;
  });
}

}  // namespace dmax::cpu
