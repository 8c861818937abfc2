// dmax.logits_stats on the CPU: one pass over each row of V logits (compiled once per CPU
// capability, see logits_stats_kernel.h). The row is read from memory once, in blocks of kBlock
// logits converted to fp32 into an L1-resident buffer; each block then costs
//   pass 1 (load + convert + block max + which groups of 64 logits can count in the sum),
//   pass 2 (sum of exp(x - m) over those groups: on AVX512 over their logits that can count,
//           packed together first; top-k candidates, found in pass 1 until the k-th best is
//           known to lie in such a group),
//   pass 3 (temperature > 0 only: Gumbel scores of the candidates that can still win),
// with the running max m and sum s rescaled once per block (online softmax), so exp is evaluated
// at most once per logit. Top-k and Gumbel candidates are found with vector compares against the
// current k-th best / the current pruning threshold; the rare hits go through scalar code.
// Speed (bf16 rows of 32768 logits through the op, in cache, 1 thread, the AMD EPYC (Zen 5 class)
// of docs/PERFORMANCE.md's 06:11 entry): 12.5 us a row before the groups, exp_nonpositive, the
// mask compares and the top-k in pass 2; 6.0 us with every group summed, less on rows whose
// tail lies far below the peak. Rows of a decode of llada2-small's benchmark weights (most groups
// live, 5-11% of the logits): 4.9 -> 3.5 us with pass 2's packing (2026-12-06).
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/rng.h"
#include "cpu/vec/exp_nonpositive.h"
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

// Bit i set when a[i] > b[i] / a[i] >= b[i] (false for NaN). On AVX512 the compare writes a mask
// register directly: through true_lanes (compare to a vector, then to zero) pass 1 ran 2x slower.
inline uint32_t lanes_greater(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ);
#else
  return true_lanes(a > b);
#endif
}
// Bit i set unless a[i] < b[i]: NaN lanes are set.
inline uint32_t lanes_not_below(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ);
#else
  return ~true_lanes(a < b) & ((1u << kW) - 1u);
#endif
}

// Lane-wise max for pass 1. On AVX512 a NaN in v is dropped (vmaxps returns its second operand
// when either is NaN): pass 1 then keeps the NaN's group live (lanes_not_below), so the NaN
// reaches the sum and the row's conf (the error the wrapper reports). Elsewhere at::vec::maximum
// propagates it to the block max, which marks the row bad. (at::vec::maximum's NaN test costs 3
// more instructions a vector, on the chain of the running max.)
inline Vec max_for_pass1(const Vec& acc, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(v, acc);
#else
  return at::vec::maximum(acc, v);
#endif
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

constexpr int kUnroll = 4;  // vectors in a group: pass 1's step, pass 2's unit
constexpr int64_t kGroup = kUnroll * kW;

// A Kahan-compensated running sum of vectors: a lane holding exp(0) = 1 would otherwise round
// away most of each small term added to it (several ulps over a block of a peaked row). Pass 2
// adds one vector a group, the group's 4 terms summed pairwise (positive terms: within 2 ulp of
// their sum), so the compensation's 4 dependent adds stay off the critical path.
struct KahanLanes {
  Vec acc{0.f}, comp{0.f};
  void add(const Vec& term) {
    const Vec y = term - comp;
    const Vec t = acc + y;
    comp = (t - acc) - y;
    acc = t;
  }
  double total() const {
    alignas(64) float lanes[kW];
    (acc - comp).store(lanes);
    double s = 0.0;
    for (int l = 0; l < kW; ++l) s += lanes[l];
    return s;
  }
};

// Pushes the lanes of group buf[j, j + kGroup) above the k-th best (vkth) into the top-k, in id
// order (base: the id of buf[0]); vkth follows the k-th best. The rare path of passes 1 and 2.
inline void push_group_hits(const float* buf, int64_t j, int64_t base, TopK& top, Vec& vkth) {
  for (int64_t t = j; t < j + kGroup; t += kW) {
    for (uint32_t h = lanes_greater(Vec::loadu(buf + t), vkth); h; h &= h - 1) {
      const int l = __builtin_ctz(h);
      top.push(buf[t + l], base + t + l);
    }
    vkth = Vec(top.val[top.k - 1]);
  }
}

// Pass 1 over the whole groups of a block from offset j, once the top-k is full: each vector is
// converted into buf, folded into its own running max (vmax[u]: kUnroll independent chains),
// compared with the k-th best logit when kHits (a hit, rare, goes through push_group_hits), and
// the group goes on the live list when a lane is not below floor. x points at the block, whose
// first logit has id base. Returns the offset of the first group left.
// (A function of its own: written inline in the row loop, GCC kept n_live and vmax in memory
// and this loop ran 2-3x slower.)
template <bool kHits, typename T>
int64_t scan_groups(const T* x, int64_t base, float* buf, int64_t j, int64_t n, const Vec& floor,
                    TopK& top, Vec* vmax_out, int32_t* live, int& n_live_out) {
  // A later block is fetched from memory while this one computes (software prefetch: the
  // stream pauses during pass 2; measured ~17% faster on a DRAM-resident B = 32 batch). Past
  // the row's end it is the next row's first blocks (the rows are contiguous; past the last
  // row a useless prefetch, which cannot fault): a decode's logits, just written by the lm_head
  // and mostly in L3, 158 -> 137 us for 32 rows of llada2-small (2026-12-06).
  const T* next = x + kPrefetchBlocks * kBlock;
  Vec vmax[kUnroll];
  for (int u = 0; u < kUnroll; ++u) vmax[u] = vmax_out[u];
  Vec vkth(top.val[top.k - 1]);
  int n_live = n_live_out;
  for (; j + kGroup <= n; j += kGroup) {
    uint32_t alive = 0, hit = 0;
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t ju = j + u * kW;
      __builtin_prefetch(next + ju);
      const Vec v = load_float(x + ju);
      v.store(buf + ju);
      vmax[u] = max_for_pass1(vmax[u], v);
      alive |= lanes_not_below(v, floor);
      if constexpr (kHits) hit |= lanes_greater(v, vkth);
    }
    live[n_live] = static_cast<int32_t>(j);
    n_live += alive != 0;
    if (hit) push_group_hits(buf, j, base, top, vkth);  // reloaded rather than kept (spilled)
  }
  for (int u = 0; u < kUnroll; ++u) vmax_out[u] = vmax[u];
  n_live_out = n_live;
  return j;
}

// exp(x - m) is summed only over groups holding a logit x >= m' - skip_below(V) (or a NaN), m' <= m
// the running max before the block: the rest, at most V terms each < e^-(ln V + 20), add less
// than 2.1e-9 relative to a sum >= 1 (a quarter of float32's unit roundoff is 1.5e-8). A
// confident head skips most of its groups (llada2-small's benchmark weights: about half).
inline float skip_below(int64_t V) {
  return static_cast<float>(std::log(static_cast<double>(V)) + 20.0);
}

template <typename T>
void logits_stats_row(const T* x, int64_t V, int k, Gumbel* gumbel, int64_t* pred, float* conf,
                      int64_t* topk_ids, float* topk_probs) {
  alignas(64) float buf[kBlock + kGroup];
  int32_t live[kBlock / kGroup + 1];  // offsets in buf of the groups pass 2 sums
#if defined(CPU_CAPABILITY_AVX512)
  alignas(64) float dense[kBlock + kGroup + kW];  // pass 2's packed logits (+ a store's overrun)
#endif
  TopK top(k);
  float m = -kInf;  // running max
  double s = 0.0;   // running sum of exp(x - m): fp32 lanes per block, combined in double
  bool bad = false;
  const float skip = skip_below(V);
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const int64_t npad = (n + kGroup - 1) / kGroup * kGroup;
    // Pass 1, a group of kUnroll vectors a step: convert into buf; block max; top-k candidates;
    // the list of groups that can add to the sum (scan_groups). The groups while the top-k
    // fills and the tail (converted in scalar code, padded with -inf to a whole group) go
    // through buf and push every lane.
    Vec vmax[kUnroll];
    for (auto& v : vmax) v = Vec(-kInf);
    const Vec floor(m - skip);
    int n_live = 0;
    // Once the k-th best is not below floor, no logit of a group off the live list can enter
    // the top-k: the compares move to pass 2, over the live groups only (in id order too).
    const bool hits_in_pass2 = top.full() && top.val[k - 1] >= m - skip;
    int64_t j = 0;
    for (;;) {
      if (hits_in_pass2)
        j = scan_groups<false>(x + b0, b0, buf, j, n, floor, top, vmax, live, n_live);
      else if (top.full())
        j = scan_groups<true>(x + b0, b0, buf, j, n, floor, top, vmax, live, n_live);
      if (j >= npad) break;
      const int64_t end = std::min(j + kGroup, n);
      for (int64_t t = j; t < end; ++t) buf[t] = static_cast<float>(x[b0 + t]);
      for (int64_t t = end; t < j + kGroup; ++t) buf[t] = -kInf;
      uint32_t alive = 0;
      for (int u = 0; u < kUnroll; ++u) {
        const Vec v = Vec::loadu(buf + j + u * kW);
        vmax[u] = max_for_pass1(vmax[u], v);
        alive |= lanes_not_below(v, floor);
      }
      for (int64_t t = j; t < end; ++t) top.push(buf[t], b0 + t);
      live[n_live] = static_cast<int32_t>(j);
      n_live += alive != 0;
      j += kGroup;
    }
    for (int u = 1; u < kUnroll; ++u) vmax[0] = max_for_pass1(vmax[0], vmax[u]);
    alignas(64) float lanes[kW];
    vmax[0].store(lanes);
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
    // Pass 2: sum of exp(x - m) over the live groups (none while every logit so far is -inf).
    // conf stays within ~1e-7 relative of a float64 softmax (torch.softmax in float32: ~3e-6).
    if (m > -kInf) {
      const Vec vm(m);
      KahanLanes sums;
      static_assert(kUnroll == 4, "pass 2 sums a group's terms pairwise");
      Vec vkth(top.val[k - 1]);
#if defined(CPU_CAPABILITY_AVX512)
      // The live groups' logits that can count (x >= m - skip, m now the max with this block's,
      // or NaN) packed together (vcompressps), then exp over those only: a confident head's
      // row has most groups live but only 5-11% of its logits (llada2-small's benchmark
      // weights), and the exp is most of pass 2's arithmetic.
      const Vec vfloor(m - skip);
      int64_t nd = 0;
      for (int i = 0; i < n_live; ++i) {
        const float* g = buf + live[i];
        uint32_t hit = 0;
        for (int u = 0; u < kUnroll; ++u) {
          const Vec v = Vec::loadu(g + u * kW);
          const __mmask16 keep = static_cast<__mmask16>(lanes_not_below(v, vfloor));
          _mm512_storeu_ps(dense + nd, _mm512_maskz_compress_ps(keep, v));
          nd += __builtin_popcount(keep);
          hit |= lanes_greater(v, vkth);
        }
        // (The partial tail group went through pass 1's scalar path, which pushed every lane.)
        if (hits_in_pass2 && hit && live[i] + kGroup <= n)
          push_group_hits(buf, live[i], b0, top, vkth);
      }
      for (int64_t q = nd; q % kW; ++q) dense[q] = -kInf;  // a whole last vector (exp: ~0)
      for (int64_t q = 0; q < nd; q += kW) sums.add(exp_nonpositive(Vec::loadu(dense + q) - vm));
#else
      for (int i = 0; i < n_live; ++i) {
        const float* g = buf + live[i];
        const Vec v0 = Vec::loadu(g), v1 = Vec::loadu(g + kW), v2 = Vec::loadu(g + 2 * kW),
                  v3 = Vec::loadu(g + 3 * kW);
        sums.add((exp_nonpositive(v0 - vm) + exp_nonpositive(v1 - vm)) +
                 (exp_nonpositive(v2 - vm) + exp_nonpositive(v3 - vm)));
        // (The partial tail group went through pass 1's scalar path, which pushed every lane.)
        if (hits_in_pass2 && live[i] + kGroup <= n &&
            (lanes_greater(v0, vkth) | lanes_greater(v1, vkth) | lanes_greater(v2, vkth) |
             lanes_greater(v3, vkth)))
          push_group_hits(buf, live[i], b0, top, vkth);
      }
#endif
      s += sums.total();
    }
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
