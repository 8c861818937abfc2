// dmax.moe_route on the CPU, one token at a time (compiled once per CPU capability, see
// moe_route_kernel.h). The torch formulation is ~15 ops per MoE layer on [N, E] tensors (sigmoid,
// bias, two top-k, a scatter, a masked fill, a gather, a normalization), each a dispatch and an
// allocation for a few kilobytes of work; here it is one pass over each row's E scores.
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec/moe_route_kernel.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;

// torch's CPU sigmoid (UnaryOpsKernel.cpp): 1 / (exp(0 - a) + 1) on whole vectors, the scalar
// formula on the tail, so the scores are torch.sigmoid's.
void sigmoid_row(const float* a, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    ((Vec(0.f) - Vec::loadu(a + i)).exp() + Vec(1.f)).reciprocal().store(out + i);
  for (; i < n; ++i) out[i] = 1.f / (1.f + std::exp(-a[i]));
}

// Offers (value, index) to the `count` best so far, kept in descending order in values / ids
// (capacity `cap`); returns the new count. Goes after every entry of a value >= value: offered
// in increasing index order, equal values keep the lower index first. One pass over a row's
// candidates with a short insertion, instead of top_k passes over all E (the router's cost was
// its selection: 24 us a layer for a block's 32 tokens).
inline int64_t offer(float* values, int64_t* ids, int64_t count, int64_t cap, float value,
                     int64_t index) {
  if (count == cap && !(value > values[cap - 1])) return count;
  int64_t pos = count < cap ? count : cap - 1;
  for (; pos > 0 && value > values[pos - 1]; --pos) {
    values[pos] = values[pos - 1];
    ids[pos] = ids[pos - 1];
  }
  values[pos] = value;
  ids[pos] = index;
  return count < cap ? count + 1 : count;
}

}  // namespace

void moe_route_rows(const RouteTask& t, int64_t begin, int64_t end) {
  const int64_t E = t.E, per_group = E / t.n_group;
  std::vector<float> scores(E), biased(E), best_values(std::max(t.top_k, t.topk_group));
  std::vector<int64_t> best_groups(t.topk_group);
  std::vector<char> kept(t.n_group);
  for (int64_t r = begin; r < end; ++r) {
    sigmoid_row(t.logits + r * E, E, scores.data());
    for (int64_t e = 0; e < E; ++e) biased[e] = scores[e] + t.bias[e];
    // The topk_group groups of the largest sum of their two best.
    int64_t n_best = 0;
    for (int64_t g = 0; g < t.n_group; ++g) {
      const float* v = biased.data() + g * per_group;
      float first = -std::numeric_limits<float>::infinity(), second = first;
      for (int64_t i = 0; i < per_group; ++i) {
        if (v[i] > first) {
          second = first;
          first = v[i];
        } else if (v[i] > second) {
          second = v[i];
        }
      }
      n_best = offer(best_values.data(), best_groups.data(), n_best, t.topk_group,
                     first + second, g);
    }
    std::fill(kept.begin(), kept.end(), 0);
    for (int64_t j = 0; j < n_best; ++j) kept[best_groups[j]] = 1;
    // The top_k experts of the kept groups, offered in index order.
    int64_t* ids = t.ids + r * t.top_k;
    float* w = t.weights + r * t.top_k;
    n_best = 0;
    for (int64_t g = 0; g < t.n_group; ++g) {
      if (!kept[g]) continue;
      for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e)
        n_best = offer(best_values.data(), ids, n_best, t.top_k, biased[e], e);
    }
    for (int64_t j = 0; j < t.top_k; ++j) w[j] = scores[ids[j]];
    if (t.top_k > 1) {
      float sum = 0.f;
      for (int64_t j = 0; j < t.top_k; ++j) sum += w[j];
      const float denom = sum + 1e-20f;
      for (int64_t j = 0; j < t.top_k; ++j) w[j] = w[j] / denom;
    }
    for (int64_t j = 0; j < t.top_k; ++j) w[j] = w[j] * t.scaling;
  }
}

}  // namespace dmax::cpu::CPU_CAPABILITY
