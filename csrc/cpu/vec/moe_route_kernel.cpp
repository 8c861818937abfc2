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

// Index of the largest value among those with take[i] (lowest index on ties), or -1.
int64_t best(const float* values, const std::vector<char>& take, int64_t n) {
  int64_t arg = -1;
  for (int64_t i = 0; i < n; ++i)
    if (take[i] && (arg < 0 || values[i] > values[arg])) arg = i;
  return arg;
}

}  // namespace

void moe_route_rows(const RouteTask& t, int64_t begin, int64_t end) {
  const int64_t E = t.E, per_group = E / t.n_group;
  std::vector<float> scores(E), biased(E), group_score(t.n_group);
  std::vector<char> open(t.n_group), kept_expert(E);
  for (int64_t r = begin; r < end; ++r) {
    sigmoid_row(t.logits + r * E, E, scores.data());
    for (int64_t e = 0; e < E; ++e) biased[e] = scores[e] + t.bias[e];
    for (int64_t g = 0; g < t.n_group; ++g) {  // the sum of the group's two best
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
      group_score[g] = first + second;
    }
    std::fill(open.begin(), open.end(), 1);
    std::fill(kept_expert.begin(), kept_expert.end(), 0);
    for (int64_t j = 0; j < t.topk_group; ++j) {
      const int64_t g = best(group_score.data(), open, t.n_group);
      open[g] = 0;
      std::fill(kept_expert.begin() + g * per_group, kept_expert.begin() + (g + 1) * per_group, 1);
    }
    int64_t* ids = t.ids + r * t.top_k;
    float* w = t.weights + r * t.top_k;
    for (int64_t j = 0; j < t.top_k; ++j) {
      const int64_t e = best(biased.data(), kept_expert, E);
      kept_expert[e] = 0;
      ids[j] = e;
      w[j] = scores[e];
    }
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
