// dmax.logits_stats as a CUDA kernel (semantics: python/dmax_ext/reference.py,
// logits_stats_reference). One block per row of V logits, a single pass over the row:
//  - each thread walks 16-byte vectors (8 bf16/fp16 or 4 fp32 logits) strided by the block,
//    kLoadsInFlight loads at a time, after a scalar head up to the first 16-byte boundary and
//    before a scalar tail; so a thread sees its logits in increasing id order;
//  - per thread: online max m and sum s of exp(x - m) (rescaled once per vector), a sorted
//    top-K list in registers (K = 1, or 8 for k = 2..8), and for temperature > 0 the best
//    Gumbel score, computed in double (as the reference) only for logits that pass two float
//    checks (a logit threshold, then one expf: may_reach) of still beating it; after every
//    round of loads the warp shares its pruning bounds (K-th best, best score) by shuffles;
//  - then a warp reduction with xor shuffles (top-K lists merged by a bitonic network, ties to
//    the lowest id), one __syncthreads through shared memory, and the same reduction in warp 0.
// Compiles unchanged as host C++ against the simt emulation (kernels/device.h).
#pragma once
#include "common/rng.h"
#include "kernels/device.h"

namespace dmax::kernels {

constexpr int kLogitsStatsMaxThreads = 512;
// 16-byte loads each thread issues before consuming them. With two 512-thread blocks per SM
// (__launch_bounds__(512, 2): <= 64 registers) that is 32 KB in flight per SM, above the
// bandwidth-latency product of an H100 SM (~3.35 TB/s * ~0.7 us / 132 SMs = 18 KB).
constexpr int kLoadsInFlight = 2;
constexpr int kNoId = 0x7fffffff;  // free top-K slot / no Gumbel winner yet: loses every tie
constexpr unsigned kLogitsStatsFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// (a, ia) ranks before (b, ib): the larger logit, the lower id on ties. NaN ranks before nothing.
__device__ __forceinline__ bool rank_before(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}

template <int K>
struct TopKList {
  float v[K];
  int id[K];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v[i] = -INFINITY;
      id[i] = kNoId;
    }
  }
  // Until the list holds K real entries every logit is a candidate (even -inf: k may exceed the
  // number of finite logits); afterwards only those above the K-th. A logit below `bound` (a
  // lower bound of the row's K-th best) is never a candidate.
  __device__ __forceinline__ bool wants(float chunk_max, float bound) const {
    return chunk_max >= bound && (chunk_max > v[K - 1] || id[K - 1] == kNoId);
  }
  // The K-th best so far, -inf while the list is not full: a lower bound of the row's K-th best.
  __device__ __forceinline__ float kth_bound() const {
    return id[K - 1] == kNoId ? -INFINITY : v[K - 1];
  }
  __device__ __forceinline__ void push(float x, int i) {
    if (!rank_before(x, i, v[K - 1], id[K - 1])) return;
    v[K - 1] = x;
    id[K - 1] = i;
#pragma unroll
    for (int j = K - 1; j > 0; --j) {  // one bubble pass restores the order
      if (rank_before(v[j], id[j], v[j - 1], id[j - 1])) {
        const float tv = v[j];
        v[j] = v[j - 1];
        v[j - 1] = tv;
        const int ti = id[j];
        id[j] = id[j - 1];
        id[j - 1] = ti;
      }
    }
  }
  // this = the top K of (this U other), both sorted and disjoint in ids. Taking the better of
  // v[i] and other[K-1-i] leaves the top K as a bitonic sequence; a bitonic merge sorts it.
  __device__ __forceinline__ void merge(const TopKList& o) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (rank_before(o.v[K - 1 - i], o.id[K - 1 - i], v[i], id[i])) {
        v[i] = o.v[K - 1 - i];
        id[i] = o.id[K - 1 - i];
      }
    }
#pragma unroll
    for (int stride = K / 2; stride > 0; stride /= 2) {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        if ((i & stride) == 0 && rank_before(v[i + stride], id[i + stride], v[i], id[i])) {
          const float tv = v[i];
          v[i] = v[i + stride];
          v[i + stride] = tv;
          const int ti = id[i];
          id[i] = id[i + stride];
          id[i + stride] = ti;
        }
      }
    }
  }
  __device__ __forceinline__ void merge_xor(int lane_mask) {
    TopKList o;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      o.v[i] = __shfl_xor_sync(kLogitsStatsFullMask, v[i], lane_mask);
      o.id[i] = __shfl_xor_sync(kLogitsStatsFullMask, id[i], lane_mask);
    }
    merge(o);
  }
};

// Online softmax state: m = max, s = sum exp(x - m). A thread sums in float with Kahan
// compensation (a plain float sum holding exp(0) = 1 rounds away much of every small term: ulps
// over a peaked row); threads are merged in double. A NaN logit makes s NaN, +inf makes it NaN
// (inf - inf), a row of only -inf leaves m = -inf: each marks the row as an error.
struct SoftmaxState {
  float m;
  double s;
  __device__ __forceinline__ void merge(float om, double os) {
    const float nm = fmaxf(m, om);
    s = nm == -INFINITY ? s + os
                        : s * static_cast<double>(expf(m - nm)) +
                              os * static_cast<double>(expf(om - nm));
    m = nm;
  }
};

// Gumbel-max state (temperature > 0): best score double(x) / T + g so far, its id and logit.
// A logit below thr cannot reach the best even with the largest noise rng_uniform allows.
struct GumbelState {
  double best;
  int id;
  float logit;
  float thr;
  __device__ __forceinline__ bool beats(double score, int i) const {
    return score > best || (score == best && i < id);
  }
  // Raise thr to what a best score of `b` (this thread's, or the warp's) allows.
  __device__ __forceinline__ void raise_threshold(double b, double temperature, double gumbel_max) {
    const double margin = 1e-9 * (fabs(b) + 32.0);  // covers the rounding of x / T + g
    const double t = (b - gumbel_max - margin) * temperature;
    float f = static_cast<float>(t);
    if (static_cast<double>(f) > t) f = nextafterf(f, -INFINITY);
    thr = fmaxf(thr, f);
  }
  __device__ __forceinline__ void merge_xor(int lane_mask) {
    const double ob = __shfl_xor_sync(kLogitsStatsFullMask, best, lane_mask);
    const int oi = __shfl_xor_sync(kLogitsStatsFullMask, id, lane_mask);
    const float ol = __shfl_xor_sync(kLogitsStatsFullMask, logit, lane_mask);
    if (beats(ob, oi)) {
      best = ob;
      id = oi;
      logit = ol;
    }
  }
};

// The largest Gumbel noise -log(-log(u)) that rng_uniform can produce (u <= kRngUniformMax).
__host__ __device__ inline double gumbel_noise_max() { return -log(-log(kRngUniformMax)); }

// What the threads of a row share (kernel parameters: kept out of the per-thread registers).
struct RowSampling {
  double temperature;  // > 0: Gumbel-max sampling
  double gumbel_max;   // gumbel_noise_max()
  float inv_temperature;  // float(1 / temperature), for the float pre-check
};

// Whether logit x with noise bits q (u = (q + .5) / 2^24) may score >= best, checked in float.
// score >= best iff -log(-log(u)) >= best - x / T iff v = 1 - u <= 1 - exp(-t) with
// t = exp(x / T - best), and 1 - exp(-t) <= t: lanes with v > t (with a slack covering float(1/T),
// the float arithmetic and expf's 2 ulp) cannot win. One expf instead of two double logs.
__device__ __forceinline__ bool may_reach(float x, uint32_t q, double best, float inv_t) {
  const float v = static_cast<float>((1u << 25) - 2 * q - 1) * (1.0f / 33554432.0f);
  const float best_f = static_cast<float>(best), xt = x * inv_t;
  const float slack = 1.0f + 1e-5f + (fabsf(xt) + fabsf(best_f)) * 1e-6f;
  return v <= expf(xt - best_f) * slack;
}

// Everything one thread accumulates over its logits.
template <int K>
struct RowAccumulator {
  SoftmaxState sm;   // m, and s once the thread's sum is folded in (fold_sum)
  float sum, comp;   // the thread's Kahan sum of exp(x - sm.m) and its compensation
  TopKList<K> top;
  GumbelState gs;
  uint32_t row_state;
  float bound;  // lower bound of the row's K-th best logit, shared by the warp (K > 1)

  // N logits x[0..N) with ids first, first + 1, ...
  template <int N>
  __device__ __forceinline__ void observe(const float (&x)[N], int first, const RowSampling& rs) {
    const double temperature = rs.temperature;
    float cm = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) cm = fmaxf(cm, x[i]);
    if (cm > sm.m) {
      const float rescale = expf(sm.m - cm);
      sum *= rescale;
      comp *= rescale;
      sm.m = cm;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float y = (x[i] == -INFINITY ? 0.f : expf(x[i] - sm.m)) - comp;
      const float t = sum + y;
      comp = (t - sum) - y;
      sum = t;
    }
    if (top.wants(cm, bound)) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (x[i] >= bound) top.push(x[i], first + i);
      }
    }
    if (temperature > 0.0 && cm >= gs.thr) {
      bool improved = false;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (!(x[i] >= gs.thr && x[i] > -INFINITY)) continue;
        const uint32_t q = rng_bits_from_row(row_state, static_cast<uint32_t>(first + i));
        if (!may_reach(x[i], q, gs.best, rs.inv_temperature)) continue;
        const double score =
            static_cast<double>(x[i]) / temperature - log(-log(rng_uniform_from_bits(q)));
        if (gs.beats(score, first + i)) {
          gs.best = score;
          gs.id = first + i;
          gs.logit = x[i];
          improved = true;
        }
      }
      if (improved) gs.raise_threshold(gs.best, temperature, rs.gumbel_max);
    }
  }

  // Share the pruning bounds across the warp: any lane's K-th best bounds the row's K-th best
  // from below, and any lane's best Gumbel score bounds the winner's. Every lane of the warp
  // must call this (warp-uniform control flow).
  __device__ __forceinline__ void share_bounds(const RowSampling& rs) {
    if (K > 1) {
      float b = top.kth_bound();
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        b = fmaxf(b, __shfl_xor_sync(kLogitsStatsFullMask, b, off));
      }
      bound = fmaxf(bound, b);
    }
    if (rs.temperature > 0.0) {
      double g = gs.best;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        g = fmax(g, __shfl_xor_sync(kLogitsStatsFullMask, g, off));
      }
      if (g > -INFINITY) gs.raise_threshold(g, rs.temperature, rs.gumbel_max);
    }
  }

  __device__ __forceinline__ void fold_sum() {
    sm.s = static_cast<double>(sum) - static_cast<double>(comp);
  }

  __device__ __forceinline__ void warp_reduce(bool sample) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float om = __shfl_xor_sync(kLogitsStatsFullMask, sm.m, off);
      const double os = __shfl_xor_sync(kLogitsStatsFullMask, sm.s, off);
      sm.merge(om, os);
      top.merge_xor(off);
      if (sample) gs.merge_xor(off);
    }
  }
};

// p = exp(x - m) / s, in double: once per output, so the numerator costs no accuracy.
__device__ __forceinline__ float probability(float x, float m, double s) {
  return static_cast<float>(exp(static_cast<double>(x) - static_cast<double>(m)) / s);
}

// 16 bytes of logits, as floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) out[i] = to_float(e[i]);
}

// Grid: one block per row (rows = B * L). Block: whole warps, blockDim.x <= 512.
template <typename T, int K>
__global__ void __launch_bounds__(kLogitsStatsMaxThreads, 2)
    logits_stats_kernel(const T* __restrict__ logits, int length, int vocab, int k,
                        RowSampling sampling, const int64_t* __restrict__ seeds,
                        int64_t* __restrict__ pred, float* __restrict__ conf,
                        int64_t* __restrict__ topk_ids, float* __restrict__ topk_probs) {
  constexpr int kVec = 16 / sizeof(T);
  const int row = blockIdx.x;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const T* x = logits + static_cast<int64_t>(row) * vocab;

  RowAccumulator<K> acc;
  acc.sm.m = -INFINITY;
  acc.sum = 0.f;
  acc.comp = 0.f;
  acc.top.clear();
  acc.gs.best = -INFINITY;
  acc.gs.id = kNoId;
  acc.gs.logit = -INFINITY;
  acc.gs.thr = -INFINITY;
  acc.bound = -INFINITY;
  const bool sample = sampling.temperature > 0.0;
  acc.row_state = 0;
  if (sample) {
    acc.row_state = rng_row_state(rng_seed_state(seeds[row / length]),
                                  static_cast<uint32_t>(row % length));
  }

  // Scalar head up to the first 16-byte boundary, 16-byte body, scalar tail.
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(x) % 16;
  int head = misalign == 0 ? 0 : static_cast<int>((16 - misalign) / sizeof(T));
  head = head < vocab ? head : vocab;
  const int nvec = (vocab - head) / kVec;
  const int tail_start = head + nvec * kVec;
  if (tid < head) {
    const float one[1] = {to_float(x[tid])};
    acc.observe(one, tid, sampling);
  }
  // The body in rounds of kLoadsInFlight vectors per thread; every thread runs every round, so
  // the warp can share its bounds after each one.
  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  const int per_round = kLoadsInFlight * nthreads;
  const int rounds = (nvec + per_round - 1) / per_round;
  for (int r = 0; r < rounds; ++r) {
    const int j = r * per_round + tid;
    uint4 raw[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      if (j + u * nthreads < nvec) raw[u] = __ldg(body + j + u * nthreads);
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      if (j + u * nthreads < nvec) {
        float v[kVec];
        unpack16<T>(raw[u], v);
        acc.observe(v, head + (j + u * nthreads) * kVec, sampling);
      }
    }
    acc.share_bounds(sampling);
  }
  if (tid < vocab - tail_start) {
    const float one[1] = {to_float(x[tail_start + tid])};
    acc.observe(one, tail_start + tid, sampling);
  }

  // Block reduction: warps, then warp 0 over the warps' results.
  __shared__ float s_m[32], s_v[32 * K], s_glogit[32];
  __shared__ int s_id[32 * K], s_gid[32];
  __shared__ double s_s[32], s_gbest[32];
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  acc.fold_sum();
  acc.warp_reduce(sample);
  if (lane == 0) {
    s_m[warp] = acc.sm.m;
    s_s[warp] = acc.sm.s;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      s_v[warp * K + i] = acc.top.v[i];
      s_id[warp * K + i] = acc.top.id[i];
    }
    s_gbest[warp] = acc.gs.best;
    s_gid[warp] = acc.gs.id;
    s_glogit[warp] = acc.gs.logit;
  }
  __syncthreads();
  if (warp != 0) return;
  if (lane < nwarps) {
    acc.sm.m = s_m[lane];
    acc.sm.s = s_s[lane];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      acc.top.v[i] = s_v[lane * K + i];
      acc.top.id[i] = s_id[lane * K + i];
    }
    acc.gs.best = s_gbest[lane];
    acc.gs.id = s_gid[lane];
    acc.gs.logit = s_glogit[lane];
  } else {  // the identity of every merge
    acc.sm.m = -INFINITY;
    acc.sm.s = 0.0;
    acc.top.clear();
    acc.gs.best = -INFINITY;
    acc.gs.id = kNoId;
    acc.gs.logit = -INFINITY;
  }
  acc.warp_reduce(sample);
  if (lane != 0) return;

  // A NaN / +inf logit or an all -inf row: NaN probabilities, ids kept inside [0, V).
  const float m = acc.sm.m;
  const double s = acc.sm.s;
  const bool bad = !(m > -INFINITY && m < INFINITY && s > 0.0 && s < INFINITY);
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int i = 0; i < K; ++i) {  // constant indices keep the list in registers
    if (i < k) {
      const int id = acc.top.id[i];
      topk_ids[static_cast<int64_t>(row) * k + i] = bad || id == kNoId ? i : id;
      topk_probs[static_cast<int64_t>(row) * k + i] = bad ? nan : probability(acc.top.v[i], m, s);
    }
  }
  const int chosen = sample ? acc.gs.id : acc.top.id[0];
  const float chosen_logit = sample ? acc.gs.logit : acc.top.v[0];
  pred[row] = bad || chosen == kNoId ? 0 : chosen;
  conf[row] = bad ? nan : probability(chosen_logit, m, s);
}

// Block size: whole warps covering the row's 16-byte vectors, at most 512 (a 157184-wide bf16
// row is 19648 vectors: 38 per thread, in 19 rounds of two). Static shared memory only.
inline LaunchConfig logits_stats_launch_config(int64_t rows, int64_t vocab, int elem_bytes) {
  const int64_t vectors = (vocab * elem_bytes + 15) / 16 + 1;  // +1: a misaligned head/tail
  int64_t threads = (vectors + 31) / 32 * 32;
  if (threads < 32) threads = 32;
  if (threads > kLogitsStatsMaxThreads) threads = kLogitsStatsMaxThreads;
  LaunchConfig cfg;
  cfg.grid = dim3(static_cast<unsigned>(rows), 1, 1);
  cfg.block = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.smem_bytes = 0;
  return cfg;
}

}  // namespace dmax::kernels
