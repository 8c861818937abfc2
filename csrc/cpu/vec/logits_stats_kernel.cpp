// dmax.logits_stats on the CPU: one pass over each row of V logits (compiled once per CPU
// capability, see logits_stats_kernel.h). The row is read from memory once, in blocks of kBlock
// logits converted to fp32 into an L1-resident buffer; each block then costs
//   pass 1 (load + convert + block max), pass 2 (sum of exp(x - m) + top-k candidates),
//   pass 3 (temperature > 0 only: Gumbel scores of the candidates that can still win),
// with the running max m and sum s rescaled once per block (online softmax), so exp is evaluated
// once per logit. Top-k and Gumbel candidates are found with vector compares against the current
// k-th best / the current pruning threshold; the rare hits go through scalar code.
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/rng.h"
#include "cpu/vec/logits_stats_kernel.h"

namespace dmax::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = Vec::size();
constexpr int64_t kBlock = 2048;  // 8 KB of fp32: stays in L1 between the passes
constexpr int64_t kPrefetchBlocks = 2;  // software prefetch distance, in blocks
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();
static_assert(kBlock % kW == 0, "a block is whole vectors");

inline Vec load_float(const float* p) { return Vec::loadu(p); }
inline Vec load_float(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}
inline Vec load_float(const c10::Half* p) {
  Vec v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
}

// Bit i set when lane i of a vector compare is true (true lanes are all-ones, false lanes zero).
inline uint32_t true_lanes(const Vec& cmp) {
  return ~static_cast<uint32_t>(cmp.zero_mask()) & ((1u << kW) - 1u);
}

// Running top-k of (logit, id), best first; ties in the logit go to the lower id. Until k real
// entries are in, the free slots hold (-inf, kNoId), which any real entry (even -inf) beats.
struct TopK {
  float val[8];
  int64_t id[8];
  int k;
  explicit TopK(int k_) : k(k_) {
    std::fill(val, val + 8, -kInf);
    std::fill(id, id + 8, kNoId);
  }
  static bool better(float a, int64_t ia, float b, int64_t ib) {
    return a > b || (a == b && ia < ib);
  }
  bool full() const { return id[k - 1] != kNoId; }
  void push(float x, int64_t i) {
    if (!better(x, i, val[k - 1], id[k - 1])) return;  // NaN never enters
    int j = k - 1;
    for (; j > 0 && better(x, i, val[j - 1], id[j - 1]); --j) {
      val[j] = val[j - 1];
      id[j] = id[j - 1];
    }
    val[j] = x;
    id[j] = i;
  }
};

// The largest Gumbel noise -log(-log(u)) that rng_uniform can produce (u <= kRngUniformMax).
const double kGumbelMax = -std::log(-std::log(kRngUniformMax));

// Gumbel-max sampling state of one row: score_v = double(x_v) / T + g_v. A logit x can only win
// if x / T + kGumbelMax >= best, so x < thr (thr <= (best - kGumbelMax - margin) * T, rounded
// down to float) is skipped without computing its noise.
struct Gumbel {
  double T;
  float inv_t;  // float(1 / T), for the float estimate of the scores
  uint32_t row_state;
  double best = -std::numeric_limits<double>::infinity();
  float best_near = -kInf;  // float(best)
  int64_t id = kNoId;
  float logit = -kInf;
  float thr = -kInf;
  void update(double score, int64_t i, float x) {
    best = score;
    id = i;
    logit = x;
    best_near = static_cast<float>(best);
    const double margin = 1e-9 * (std::fabs(best) + 32.0);  // covers the rounding of x / T + g
    const double t = (best - kGumbelMax - margin) * T;
    float f = static_cast<float>(t);
    if (static_cast<double>(f) > t) f = std::nextafter(f, -kInf);
    thr = f;
  }
};

// Pass 3 over one block, for vectors holding a logit >= thr. Logit x with noise u scores at least
// best iff -log(-log(u)) >= c = best - x / T, i.e. iff v = 1 - u <= 1 - exp(-exp(-c)), which is
// <= t = exp(x / T - best). So lanes with v > t (v is k / 2^25, exact in float for v <= 1/2 and
// within 2^-25 otherwise) cannot win, and only the others get the exact double score of the
// reference. One float exp per logit instead of two double logs; the slack factor
// 1 + 1e-5 + 1e-6 (|x / T| + |best|) covers float(1 / T), the float products and sums, and exp.
// Padding lanes are -inf and never win.
void gumbel_block(const float* buf, int64_t npad, int64_t base, Gumbel& g) {
  const Vec two_m25(1.0f / 33554432.0f), slack0(1.0f + 1e-5f), rel(1e-6f);
  const Vec inv_t(g.inv_t);
  for (int64_t j = 0; j < npad; j += kW) {
    const Vec x = Vec::loadu(buf + j);
    const uint32_t live = true_lanes(x >= Vec(g.thr));
    if (!live) continue;
    alignas(64) float v_scaled[kW];
    for (int l = 0; l < kW; ++l) {
      const uint32_t q = rng_bits_from_row(g.row_state, static_cast<uint32_t>(base + j + l));
      v_scaled[l] = static_cast<float>((1u << 25) - 2 * q - 1);  // (1 - u) * 2^25
    }
    const Vec best(g.best_near), xt = x * inv_t;
    const Vec t = (xt - best).exp();
    const Vec slack = slack0 + (xt.abs() + best.abs()) * rel;
    uint32_t maybe = live & true_lanes(Vec::loadu(v_scaled) * two_m25 <= t * slack);
    for (; maybe; maybe &= maybe - 1) {
      const int l = __builtin_ctz(maybe);
      const int64_t id = base + j + l;
      const double u = rng_uniform_from_row(g.row_state, static_cast<uint32_t>(id));
      const double exact = static_cast<double>(buf[j + l]) / g.T - std::log(-std::log(u));
      if (exact > g.best) g.update(exact, id, buf[j + l]);  // ids grow: a tie keeps the lower id
    }
  }
}

template <typename T>
void logits_stats_row(const T* x, int64_t V, int k, Gumbel* gumbel, int64_t* pred, float* conf,
                      int64_t* topk_ids, float* topk_probs) {
  alignas(64) float buf[kBlock + kW];
  TopK top(k);
  float m = -kInf;  // running max
  double s = 0.0;   // running sum of exp(x - m): fp32 lanes per block, combined in double
  bool bad = false;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const int64_t nfull = n / kW * kW;
    // Pass 1: convert into buf, block max. at::vec::maximum propagates NaN.
    Vec vmax(-kInf);
    for (int64_t j = 0; j < nfull; j += kW) {
      const Vec v = load_float(x + b0 + j);
      v.store(buf + j);
      vmax = at::vec::maximum(vmax, v);
    }
    int64_t npad = nfull;
    if (nfull < n) {  // the tail, padded with -inf to a whole vector
      for (int64_t j = nfull; j < n; ++j) buf[j] = static_cast<float>(x[b0 + j]);
      for (int64_t j = n; j < nfull + kW; ++j) buf[j] = -kInf;
      vmax = at::vec::maximum(vmax, Vec::loadu(buf + nfull));
      npad = nfull + kW;
    }
    alignas(64) float lanes[kW];
    vmax.store(lanes);
    float bm = -kInf;
    for (int l = 0; l < kW; ++l) bm = std::isnan(lanes[l]) || lanes[l] > bm ? lanes[l] : bm;
    if (!(bm < kInf)) {  // NaN or +inf: p is undefined
      bad = true;
      break;
    }
    if (bm > m) {
      s *= std::exp(static_cast<double>(m) - static_cast<double>(bm));
      m = bm;
    }
    // Pass 2: sum of exp(x - m) (skipped while every logit so far is -inf) and top-k candidates.
    // The lanes sum with Kahan compensation: a lane holding exp(0) = 1 would otherwise round
    // away most of each small term added to it (several ulps over a block of a peaked row).
    // exp_u20 (<= 20 ulp a term), not Sleef's exp_u10: 23 -> 16 us per row of 32768 logits,
    // the largest part of a step outside the forward; conf stays within ~1e-7 relative of a
    // float64 softmax (torch.softmax in float32: ~3e-6).
    const bool sum = m > -kInf;
    const Vec vm(m);
    Vec acc(0.f), comp(0.f);
    Vec vkth(top.val[k - 1]);
    bool filling = !top.full();
    // A later block is fetched from memory while this one computes (software prefetch: the
    // stream pauses during passes 2-3; measured ~17% faster on a DRAM-resident B = 32 batch).
    const T* next = x + b0 + kPrefetchBlocks * kBlock;
    const int64_t next_n = V - b0 - kPrefetchBlocks * kBlock;
    for (int64_t j = 0; j < npad; j += kW) {
      if (j < next_n) __builtin_prefetch(next + j);
      const Vec v = Vec::loadu(buf + j);
      if (sum) {
        const Vec y = (v - vm).exp_u20() - comp;
        const Vec t = acc + y;
        comp = (t - acc) - y;
        acc = t;
      }
      uint32_t hits = filling ? (1u << kW) - 1u : true_lanes(v > vkth);
      if (hits) {
        for (; hits; hits &= hits - 1) {
          const int l = __builtin_ctz(hits);
          if (j + l < n) top.push(buf[j + l], b0 + j + l);
        }
        vkth = Vec(top.val[k - 1]);
        filling = !top.full();
      }
    }
    (acc - comp).store(lanes);
    for (int l = 0; l < kW; ++l) s += lanes[l];
    if (gumbel) gumbel_block(buf, npad, b0, *gumbel);
  }
  if (bad || m == -kInf) {  // an error row: NaN probabilities, ids in range
    *pred = 0;
    *conf = std::numeric_limits<float>::quiet_NaN();
    for (int i = 0; i < k; ++i) {
      topk_ids[i] = i;
      topk_probs[i] = std::numeric_limits<float>::quiet_NaN();
    }
    return;
  }
  const auto prob = [&](float v) {
    return static_cast<float>(std::exp(static_cast<double>(v) - static_cast<double>(m)) / s);
  };
  for (int i = 0; i < k; ++i) {
    topk_ids[i] = top.id[i];
    topk_probs[i] = prob(top.val[i]);
  }
  *pred = gumbel ? gumbel->id : top.id[0];
  *conf = prob(gumbel ? gumbel->logit : top.val[0]);
}

template <typename T>
void rows_typed(const LogitsStatsArgs& a, int64_t begin, int64_t end) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t r = begin; r < end; ++r) {
    Gumbel g;
    Gumbel* gp = nullptr;
    if (a.temperature > 0) {
      g.T = a.temperature;
      g.inv_t = static_cast<float>(1.0 / a.temperature);
      g.row_state = rng_row_state(rng_seed_state(a.seeds[r / a.L]), static_cast<uint32_t>(r % a.L));
      gp = &g;
    }
    logits_stats_row(logits + r * a.V, a.V, a.k, gp, a.pred + r, a.conf + r,
                     a.topk_ids + r * a.k, a.topk_probs + r * a.k);
  }
}

}  // namespace

void logits_stats_rows(const LogitsStatsArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case LogitsDtype::kFloat: return rows_typed<float>(args, begin, end);
    case LogitsDtype::kHalf: return rows_typed<c10::Half>(args, begin, end);
    case LogitsDtype::kBFloat16: return rows_typed<c10::BFloat16>(args, begin, end);
  }
}

}  // namespace dmax::cpu::CPU_CAPABILITY
