// dmax.moe_experts on the CPU: the routed experts of a MoE layer for a few tokens (a decoding
// block), fused: the N * k routed slots are counting-sorted by expert; every busy expert runs its
// SwiGLU FFN on its rows once, reading its weights once (csrc/cpu/vec/moe_experts_kernel.cpp), in
// parallel over experts, into an [N, k, H] buffer in the model dtype; then each token's k outputs
// are weighted and summed in slot order and cast once. Semantics: dmax_ext.model.moe (the torch
// formulations, impl "reference"); no CUDA version (on CUDA the model runs torch._grouped_mm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/dispatch_float.h"
#include "cpu/vec/capability.h"
#include "cpu/vec/cpu_features.h"
#include "cpu/vec/moe_experts_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

void check_moe_experts_args(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                            const at::Tensor& gate_up, const at::Tensor& down) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "moe_experts: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(x.dim() == 2, "moe_experts: x must be [N, H], got ", x.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong,
              "moe_experts: expert_ids must be int64 [N, k] with N = ", x.size(0), ", got ",
              ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat,
              "moe_experts: expert_weights must be float32 ", ids.sizes(), ", got ",
              weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(gate_up.scalar_type() == dtype && down.scalar_type() == dtype,
              "moe_experts: gate_up and down must have x's dtype ", dtype, ", got ",
              gate_up.scalar_type(), " and ", down.scalar_type());
  const int64_t H = x.size(1);
  if (gate_up.dim() == 5) {  // packed for the bf16 dot products (moe_experts_kernel.h)
    TORCH_CHECK(dtype == at::kBFloat16, "moe_experts: packed gate_up / down are bfloat16 only, "
                "got ", dtype);
    TORCH_CHECK(H % 32 == 0 && gate_up.size(2) * 2 == H && gate_up.size(3) == 32 &&
                    gate_up.size(4) == 2,
                "moe_experts: a packed gate_up must be [E, 2I / 32, H / 2, 32, 2] with H = ", H,
                " (a multiple of 32), got ", gate_up.sizes());
    const int64_t I = gate_up.size(1) * 16;
    TORCH_CHECK(down.dim() == 5 && down.size(0) == gate_up.size(0) && down.size(1) * 32 == H &&
                    down.size(2) * 2 == I && down.size(3) == 32 && down.size(4) == 2,
                "moe_experts: with a packed gate_up, down must be packed [E, H / 32, I / 2, 32, "
                "2] = [", gate_up.size(0), ", ", H / 32, ", ", I / 2, ", 32, 2], got ",
                down.sizes());
  } else {
    TORCH_CHECK(gate_up.dim() == 3 && gate_up.size(1) == H && gate_up.size(2) % 2 == 0,
                "moe_experts: gate_up must be [E, H, 2I] with H = ", H, ", got ",
                gate_up.sizes());
    TORCH_CHECK(down.dim() == 3 && down.size(0) == gate_up.size(0) &&
                    down.size(1) == gate_up.size(2) / 2 && down.size(2) == H,
                "moe_experts: down must be [E, I, H] = [", gate_up.size(0), ", ",
                gate_up.size(2) / 2, ", ", H, "], got ", down.sizes());
  }
  for (const auto* t : {&x, &ids, &weights, &gate_up, &down}) {
    TORCH_CHECK(t->device().is_cpu(), "moe_experts: the CPU kernel got a ", t->device(),
                " tensor");
  }
}

// The busy experts shared among the threads. An expert's time is roughly a fixed part (its
// weights streamed from memory: ~9 us cold for llada2-small's, bf16) plus a part per row (~0.6
// us), and a block's routing is uneven (~8 experts of 20-32 rows, ~15 of 1-9), so equal counts
// of experts per thread left one waiting for the other (2 threads, the routing of a llada2-small
// decode's later steps: 205 -> 196 us a layer with the shares below). So thread t starts at
// the expert where a t-th of the estimated work begins and claims experts in id order
// (consecutive experts are adjacent in memory: one stream per thread) up to the last; then it
// claims the unclaimed ones below its start, downwards: the end of its neighbour's share, the
// far end from where that neighbour works. Each expert runs once, on the thread that claims it;
// the loads end within about one expert of each other whatever the routing. One thread claims
// every expert in id order. Which thread runs an expert changes no result.
class ExpertShares {
 public:
  ExpertShares(const std::vector<int64_t>& busy, const std::vector<int64_t>& start,
               int64_t max_threads)
      : n_(static_cast<int64_t>(busy.size())),
        claimed_(new std::atomic<bool>[std::max<int64_t>(n_, 1)]) {
    for (int64_t b = 0; b < n_; ++b) claimed_[b].store(false, std::memory_order_relaxed);
    const int64_t threads = std::max<int64_t>(1, std::min(max_threads, n_));
    std::vector<int64_t> cost(n_ + 1, 0);  // prefix sums of the estimated work, in rows
    for (int64_t b = 0; b < n_; ++b) {
      const int64_t e = busy[b];
      cost[b + 1] = cost[b] + kFixedCostRows + start[e + 1] - start[e];
    }
    first_.assign(threads, 0);
    for (int64_t t = 1, b = 0; t < threads; ++t) {
      while (b < n_ && cost[b] * threads < cost[n_] * t) ++b;
      first_[t] = b;
    }
  }
  int64_t threads() const { return static_cast<int64_t>(first_.size()); }
  // Calls run_expert(b, next) for each expert thread t claims (b: its index in busy; next: the
  // index it is likely to claim next, for the prefetch of its weights, or -1).
  template <class Fn>
  void run(int64_t t, const Fn& run_expert) const {
    const int64_t from = first_[t];
    int64_t b = next_unclaimed_up(from);
    while (b >= 0) {
      const int64_t after = b + 1 < n_ ? b + 1 : (from > 0 ? from - 1 : -1);
      run_expert(b, after);
      b = next_unclaimed_up(b + 1);
    }
    for (b = next_unclaimed_down(from - 1); b >= 0; b = next_unclaimed_down(b - 1))
      run_expert(b, b > 0 ? b - 1 : -1);
  }

 private:
  static constexpr int64_t kFixedCostRows = 15;  // an expert's weight stream, in rows' time
  bool claim(int64_t b) const { return !claimed_[b].exchange(true, std::memory_order_relaxed); }
  int64_t next_unclaimed_up(int64_t b) const {
    for (; b < n_; ++b)
      if (claim(b)) return b;
    return -1;
  }
  int64_t next_unclaimed_down(int64_t b) const {
    for (; b >= 0; --b)
      if (claim(b)) return b;
    return -1;
  }
  int64_t n_;
  std::unique_ptr<std::atomic<bool>[]> claimed_;
  std::vector<int64_t> first_;
};

template <class T>
at::Tensor moe_experts_typed(const at::Tensor& x_in, const at::Tensor& ids_in,
                             const at::Tensor& weights_in, const at::Tensor& gate_up_in,
                             const at::Tensor& down_in) {
  static const auto expert_ffn = DMAX_CPU_KERNEL(moe_expert_ffn<T>);
  static const auto combine_rows = DMAX_CPU_KERNEL(moe_combine_rows<T>);
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  // bf16 GEMMs in AVX512-BF16 dot products where the AVX512 copy runs and cpu_features.h says so
  // (read per call: the switch is an environment variable the tests flip).
  bool bf16_dot = false;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    bf16_dot = use_bf16_dot();
  // Packed weights serve the dot products only; any other form reads them unpacked (a copy).
  const bool packed = gate_up_in.dim() == 5 && bf16_dot;
  const auto plain = [&](const at::Tensor& w) {
    return w.dim() == 5 ? w.permute({0, 2, 4, 1, 3}).reshape({w.size(0), w.size(2) * 2, -1})
                        : w.contiguous();
  };
  const at::Tensor gate_up = packed ? gate_up_in.contiguous() : plain(gate_up_in);
  const at::Tensor down = packed ? down_in.contiguous() : plain(down_in);
  const int64_t N = x.size(0), H = x.size(1), k = ids.size(1);
  const int64_t E = gate_up.size(0);
  const int64_t I = packed ? gate_up.size(1) * 16 : gate_up.size(2) / 2;
  at::Tensor out = at::empty({N, H}, x.options());
  if (N == 0 || H == 0) return out;
  if (k == 0 || I == 0) return out.zero_();

  // Counting sort of the slots s = n * k + j by expert (stable: slot order within an expert).
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t s = 0; s < N * k; ++s) {
    TORCH_CHECK(id[s] >= 0 && id[s] < E, "moe_experts: expert_ids[", s / k, ", ", s % k,
                "] = ", id[s], " is outside [0, ", E, ")");
    ++start[id[s] + 1];
  }
  std::vector<int64_t> busy;
  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (start[e + 1]) busy.push_back(e);
    max_rows = std::max(max_rows, start[e + 1]);
    start[e + 1] += start[e];
  }
  std::vector<int64_t> slots(N * k), fill(start.begin(), start.end() - 1);
  for (int64_t s = 0; s < N * k; ++s) slots[fill[id[s]]++] = s;

  at::Tensor y = at::empty({N, k, H}, x.options());  // each slot's output, in T (exact)
  T* y_p = y.mutable_data_ptr<T>();
  const T* x_p = x.const_data_ptr<T>();
  const T* gate_up_p = gate_up.const_data_ptr<T>();
  const T* down_p = down.const_data_ptr<T>();
  const bool nta_prefetch = use_nta_prefetch();
  const ExpertShares shares(busy, start, at::get_num_threads());
  at::parallel_for(0, shares.threads(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(max_rows);
    std::vector<T*> out_rows(max_rows);
    // Work space for the busiest expert, not zero-filled (a std::vector's resize fills: ~180 KB
    // a call at 32 tokens, each kernel writes its part before reading it).
    const std::unique_ptr<float[]> scratch(new float[max_rows * (2 * H + 3 * I)]);
    for (int64_t t = begin; t < end; ++t) {
      shares.run(t, [&](int64_t b, int64_t next) {
        const int64_t e = busy[b], m = start[e + 1] - start[e];
        for (int64_t i = 0; i < m; ++i) {
          const int64_t s = slots[start[e] + i];
          rows[i] = s / k;
          out_rows[i] = y_p + s * H;
        }
        const T* next_gate_up = next >= 0 ? gate_up_p + busy[next] * H * 2 * I : nullptr;
        expert_ffn(ExpertTask<T>{x_p, rows.data(), out_rows.data(), m, H, I,
                                 gate_up_p + e * H * 2 * I, down_p + e * I * H, next_gate_up,
                                 scratch.get(), bf16_dot, packed, nta_prefetch});
      });
    }
  });
  const CombineTask<T> combine{y_p, weights.const_data_ptr<float>(), k, H,
                               out.mutable_data_ptr<T>()};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k * H, 1));
  at::parallel_for(0, N, grain,
                   [&](int64_t begin, int64_t end) { combine_rows(combine, begin, end); });
  return out;
}

}  // namespace

bool cpu_bf16_dot() { return use_bf16_dot(); }

at::Tensor pack_moe_weights(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.scalar_type() == at::kBFloat16 && w_in.dim() == 3,
              "pack_moe_weights: w must be bfloat16 [E, K, N], got ", w_in.scalar_type(), " ",
              w_in.sizes());
  TORCH_CHECK(w_in.size(1) % 2 == 0 && w_in.size(2) % kPackCols == 0,
              "pack_moe_weights: w must be [E, K, N] with K even and N a multiple of ", kPackCols,
              ", got ", w_in.sizes());
  TORCH_CHECK(w_in.device().is_cpu(), "pack_moe_weights: the CPU kernel got a ", w_in.device(),
              " tensor");
  static const auto pack_pairs = DMAX_CPU_KERNEL(moe_pack_pairs);
  const at::Tensor w = w_in.contiguous();
  const int64_t E = w.size(0), K = w.size(1), N = w.size(2);
  at::Tensor out = at::empty({E, N / kPackCols, K / 2, kPackCols, 2}, w.options());
  const auto* w_p = reinterpret_cast<const uint16_t*>(w.const_data_ptr());
  auto* out_p = reinterpret_cast<uint32_t*>(out.mutable_data_ptr());
  // A pair row moves 4 N bytes: chunks of ~256 KB.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(N, 1));
  at::parallel_for(0, E * (K / 2), grain,
                   [&](int64_t begin, int64_t end) { pack_pairs(w_p, K, N, out_p, begin, end); });
  return out;
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& expert_ids,
                       const at::Tensor& expert_weights, const at::Tensor& gate_up,
                       const at::Tensor& down) {
  check_moe_experts_args(x, expert_ids, expert_weights, gate_up, down);
  return dispatch_float(x.scalar_type(), [&](auto t) {
    return moe_experts_typed<decltype(t)>(x, expert_ids, expert_weights, gate_up, down);
  });
}

}  // namespace dmax::cpu
