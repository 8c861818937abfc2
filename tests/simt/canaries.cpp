// Canary kernels for the simt emulator: each exhibits one bug class of the checklist in
// shared/notes/cuda_on_cpu.md §3 (or checks one primitive against a host computation).
// Usage: canaries <name> [seed]. Prints what it observed; a simt::Error is printed as
// "simt::Error: <message>" with exit status 3. tests/test_simt_emulator.py asserts on the text.
#include "kernels/device.h"

#include <chrono>
#include <cmath>
#include <cinttypes>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

// ---- bug classes -------------------------------------------------------------------------

// Neighbour read without a barrier: the value depends on which thread ran first.
__global__ void missing_barrier_kernel(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + 1;
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];  // needs __syncthreads() before
}

// A tile loop without the barrier at its top: the warp that finishes an iteration first writes
// the next tile over the one the other warp still reads. Between its reads and those writes
// each warp passes warp collectives, which keep interleaved turns in step: only warp-greedy
// phases (random schedules) run one warp that far ahead.
__global__ void missing_loop_barrier_kernel(const int* in, int* out, int tiles) {
  __shared__ int tile[64];
  int sum = 0;
  for (int i = 0; i < tiles; ++i) {
    tile[threadIdx.x] = in[i * 64 + threadIdx.x];  // needs __syncthreads() before
    __syncthreads();
    int part = tile[63 - threadIdx.x];  // the other warp's element
    for (int o = 16; o > 0; o /= 2) part += __shfl_xor_sync(0xffffffffu, part, o);
    sum += part;
  }
  out[threadIdx.x] = sum;
}

__global__ void divergent_barrier_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.0f;
  if (threadIdx.x < 32) __syncthreads();  // only the first warp
  __syncthreads();
  out[threadIdx.x] = s[63 - threadIdx.x];
}

__global__ void exit_before_barrier_kernel(float* out, int n) {
  __shared__ float s[64];
  if (static_cast<int>(threadIdx.x) >= n) return;  // threads past n skip the barrier
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % n];
}

__global__ void wrong_mask_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  const unsigned lane = threadIdx.x & 31;
  if (lane < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);  // full mask, half the warp
  out[threadIdx.x] = v;
}

__global__ void partial_warp_kernel(float* out) {  // launched with 48 threads
  float v = 1.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

__global__ void split_sites_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if ((threadIdx.x & 31) < 16)
    v = __shfl_sync(0xffffffffu, v, 0);
  else
    v = __shfl_sync(0xffffffffu, v, 31);
  out[threadIdx.x] = v;
}

__global__ void caller_not_in_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, 1.0f, 1);
}

__global__ void bad_width_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1, 12);
}

__global__ void barrier_in_warp_op_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x == 1) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// red[lane] for lane >= number of warps was never written: poison must show (NaN / -1).
__global__ void uninit_shared_kernel(float* out, int* out_int) {
  __shared__ float red[32];
  __shared__ int ired[32];
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red[warp] = 1.0f;
    ired[warp] = 1;
  }
  __syncthreads();
  if (warp == 0) {
    float v = red[lane];  // bug: lane < blockDim.x / 32 missing
    int iv = ired[lane];
    for (int o = 16; o > 0; o >>= 1) {
      v += __shfl_xor_sync(0xffffffffu, v, o);
      iv += __shfl_xor_sync(0xffffffffu, iv, o);
    }
    if (lane == 0) {
      out[blockIdx.x] = v;
      out_int[blockIdx.x] = iv;
    }
  }
}

__global__ void dyn_smem_overrun_kernel(float* out, int n) {
  DMAX_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x] = 1.0f;  // launched with n + 1 threads for n floats
  out[threadIdx.x] = static_cast<float>(n);
}

__global__ void dyn_smem_read_overrun_kernel(float* out, int n) {
  DMAX_DYNAMIC_SMEM(float, buf);
  if (static_cast<int>(threadIdx.x) < n) buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x + 1];  // the last thread reads buf[n]
}

__global__ void empty_kernel(float* out) { out[0] = 1.0f; }

// ---- correct kernels ---------------------------------------------------------------------

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T red[32];
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned nwarps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : T(0);
  v = warp_sum(v);
  __syncthreads();  // red is reused by the next call
  return v;
}

// Two block reductions over a row, like a softmax's max + sum.
__global__ void row_sums_kernel(const float* __restrict__ x, float* out, int n) {
  const float* row = x + static_cast<size_t>(blockIdx.x) * n;
  float s = 0.f, q = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s += row[i];
    q += row[i] * row[i];
  }
  s = block_sum(s);
  q = block_sum(q);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = s;
    out[2 * blockIdx.x + 1] = q;
  }
}

template <class T>
__global__ void shuffle_kernel(const T* in, T* out, int op, int arg, int width) {
  const T v = in[threadIdx.x];
  T r;
  switch (op) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
  }
  out[threadIdx.x] = r;
}

__global__ void outside_source_kernel(float* out, unsigned* out_u) {
  if ((threadIdx.x & 31) < 16) {  // a correct half-warp mask; lane 15 reads lane 16
    out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);
    out_u[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 7u, 1);
  }
}

__global__ void vote_kernel(const int* pred, unsigned* ballot, int* any, int* all, unsigned mask) {
  const unsigned lane = threadIdx.x & 31;
  if (!(mask >> lane & 1u)) return;
  __syncwarp(mask);
  ballot[threadIdx.x] = __ballot_sync(mask, pred[threadIdx.x]);
  any[threadIdx.x] = __any_sync(mask, pred[threadIdx.x]);
  all[threadIdx.x] = __all_sync(mask, pred[threadIdx.x]);
}

__global__ void atomics_kernel(int* i, unsigned* u, unsigned long long* ull, float* f, double* d,
                               int* old_seen) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int old = atomicAdd(&i[0], 1);
  old_seen[old] = 1;  // every old value 0..n-1 exactly once
  atomicMax(&i[1], t);
  atomicMin(&i[2], -t);
  atomicAdd(&u[0], 2u);
  atomicMax(&u[1], static_cast<unsigned>(t));
  atomicAdd(&ull[0], 3ull);
  atomicCAS(&i[3], t, t + 1);  // chains 0 -> n only in thread order; counts successes below
  atomicAdd(f, 0.5f);
  atomicAdd(d, 0.25);
  if (atomicExch(&i[4], t) == -1) atomicAdd(&i[5], 1);  // exactly one thread sees the initial -1
}

__global__ void barrier_count_kernel(int* out) {
  const int c = __syncthreads_count(threadIdx.x % 3 == 0);
  const int a = __syncthreads_and(threadIdx.x < 1000);
  const int o = __syncthreads_or(threadIdx.x == 5);
  if (threadIdx.x == 0) {
    out[0] = c;
    out[1] = a;
    out[2] = o;
  }
}

// ---- wmma (simt/wmma.h) ---------------------------------------------------------------------

// D = A B + C for one 16 x 16 x 16 tile: A row-major (lda 24), B row- or column-major, C and D
// in memory of either layout. Every pointer a 32-byte aligned offset of its buffer.
template <class T, class LayoutB>
__global__ void wmma_product_kernel(const T* a, const T* b, const float* c, float* d,
                                    int out_layout) {
  namespace wmma = nvcuda::wmma;
  const auto layout = out_layout ? wmma::mem_col_major : wmma::mem_row_major;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, a, 24);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(acc, c, 16, layout);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, layout);
}

// A kernel that assumes where a fragment's elements sit (here the row-major order lane * 8 + i)
// and writes them itself: CUDA does not specify the layout, and the emulation's is another.
__global__ void wmma_layout_guess_kernel(float* d) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = static_cast<float>(threadIdx.x * 8 + i);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

__global__ void wmma_misaligned_kernel(const __half* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a + 4, 16);  // 8 bytes past a 32-byte boundary
}

// Half of the warp multiplies: mma_sync is a collective of the whole warp.
__global__ void wmma_half_warp_kernel(float* d) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(fa, __float2half(1.f));
  wmma::fill_fragment(fb, __float2half(1.f));
  wmma::fill_fragment(acc, 0.f);
  if (threadIdx.x < 16) wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// ---- host side ---------------------------------------------------------------------------

using Canary = std::function<void(uint64_t seed)>;

template <class T>
T host_shuffle(const std::vector<T>& in, int lane, int op, int arg, int width) {
  const int group = lane & ~(width - 1), pos = lane & (width - 1);
  int src;
  switch (op) {
    case 0: src = group + (arg & (width - 1)); break;
    case 1: src = (lane ^ arg) < group + width ? (lane ^ arg) : lane; break;
    case 2: src = pos + arg < width ? lane + arg : lane; break;
    default: src = pos >= arg ? lane - arg : lane; break;
  }
  return in[src];
}

template <class T>
int check_shuffles(const char* type, std::mt19937& rng) {
  int bad = 0;
  std::vector<T> in(64), out(64);
  for (int i = 0; i < 64; ++i) in[i] = static_cast<T>(static_cast<float>(rng() % 1000) - 500.0f);
  for (int width : {32, 16, 8, 4, 2, 1})
    for (int op = 0; op < 4; ++op)
      for (int arg : {0, 1, 2, 3, 5, 7, 16, 31}) {
        DMAX_LAUNCH(shuffle_kernel<T>, 1, 64, 0, nullptr)(in.data(), out.data(), op, arg, width);
        for (int t = 0; t < 64; ++t) {
          const T want = host_shuffle(std::vector<T>(in.begin() + (t & ~31), in.begin() + (t & ~31) + 32),
                                      t & 31, op, arg, width);
          if (std::memcmp(&want, &out[t], sizeof(T)) != 0 && bad++ < 5)
            printf("%s op %d arg %d width %d thread %d: got %g want %g\n", type, op, arg, width, t,
                   double(static_cast<float>(out[t])), double(static_cast<float>(want)));
        }
      }
  return bad;
}

// Mismatches of wmma_product_kernel against a double computation (each output within 1e-5
// relative of the sum of its products' magnitudes), over layouts and input types.
template <class T>
int check_wmma(const char* type, std::mt19937& rng) {
  int bad = 0;
  for (int b_col = 0; b_col < 2; ++b_col)
    for (int out_layout = 0; out_layout < 2; ++out_layout) {
      alignas(64) T a[16 * 24], b[256];
      alignas(64) float c[256], d[256];
      for (T& v : a) v = static_cast<T>(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 256.0f);
      for (T& v : b) v = static_cast<T>(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 512.0f);
      for (float& v : c) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 64.0f;
      if (b_col)
        DMAX_LAUNCH((wmma_product_kernel<T, nvcuda::wmma::col_major>), 1, 32, 0, nullptr)(
            a, b, c, d, out_layout);
      else
        DMAX_LAUNCH((wmma_product_kernel<T, nvcuda::wmma::row_major>), 1, 32, 0, nullptr)(
            a, b, c, d, out_layout);
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
          const int o = out_layout ? j * 16 + i : i * 16 + j;
          double want = c[o], magnitude = std::fabs(c[o]);
          for (int k = 0; k < 16; ++k) {
            const double p = static_cast<double>(static_cast<float>(a[i * 24 + k])) *
                             static_cast<float>(b_col ? b[j * 16 + k] : b[k * 16 + j]);
            want += p;
            magnitude += std::fabs(p);
          }
          if (!(std::fabs(d[o] - want) <= 1e-5 * magnitude + 1e-30) && bad++ < 5)
            printf("%s b_col %d out_col %d (%d, %d): got %g want %g\n", type, b_col, out_layout,
                   i, j, d[o], want);
        }
    }
  return bad;
}

const std::map<std::string, Canary>& canaries() {
  static const std::map<std::string, Canary> all = {
      {"missing_barrier",
       [](uint64_t) {
         std::vector<int> out(64);
         DMAX_LAUNCH(missing_barrier_kernel, 1, 64, 0, nullptr)(out.data());
         long sum = 0;
         for (int v : out) sum += v;
         printf("sum %ld\n", sum);  // 2080 when every neighbour was written first
       }},
      {"missing_loop_barrier",
       [](uint64_t) {
         const int tiles = 8;
         std::vector<int> in(64 * tiles), out(64);
         for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 7 % 101);
         DMAX_LAUNCH(missing_loop_barrier_kernel, 1, 64, 0, nullptr)(in.data(), out.data(), tiles);
         int wrong = 0;
         for (int t = 0; t < 64; ++t) {
           int want = 0;
           for (int i = 0; i < tiles; ++i)
             for (int u = (t & 32) ^ 32; u < ((t & 32) ^ 32) + 32; ++u) want += in[i * 64 + u];
           wrong += out[t] != want;
         }
         printf("wrong sums %d\n", wrong);
       }},
      {"divergent_barrier",
       [](uint64_t) {
         std::vector<float> out(64);
         DMAX_LAUNCH(divergent_barrier_kernel, dim3(2, 1, 1), 64, 0, nullptr)(out.data());
       }},
      {"exit_before_barrier",
       [](uint64_t) {
         std::vector<float> out(64);
         DMAX_LAUNCH(exit_before_barrier_kernel, 1, 64, 0, nullptr)(out.data(), 40);
       }},
      {"wrong_mask",
       [](uint64_t) {
         std::vector<float> out(32);
         DMAX_LAUNCH(wrong_mask_kernel, 1, 32, 0, nullptr)(out.data());
       }},
      {"partial_warp",
       [](uint64_t) {
         std::vector<float> out(48);
         DMAX_LAUNCH(partial_warp_kernel, 1, 48, 0, nullptr)(out.data());
       }},
      {"split_sites",
       [](uint64_t) {
         std::vector<float> out(32);
         DMAX_LAUNCH(split_sites_kernel, 1, 32, 0, nullptr)(out.data());
       }},
      {"caller_not_in_mask",
       [](uint64_t) {
         std::vector<float> out(32);
         DMAX_LAUNCH(caller_not_in_mask_kernel, 1, 32, 0, nullptr)(out.data());
       }},
      {"bad_width",
       [](uint64_t) {
         std::vector<float> out(32);
         DMAX_LAUNCH(bad_width_kernel, 1, 32, 0, nullptr)(out.data());
       }},
      {"barrier_in_warp_op",
       [](uint64_t) {
         std::vector<float> out(32);
         DMAX_LAUNCH(barrier_in_warp_op_kernel, 1, 32, 0, nullptr)(out.data());
       }},
      {"uninit_shared",
       [](uint64_t) {
         std::vector<float> out(2);
         std::vector<int> out_int(2);
         DMAX_LAUNCH(uninit_shared_kernel, 2, 64, 0, nullptr)(out.data(), out_int.data());
         printf("float %g %g int %d %d\n", out[0], out[1], out_int[0], out_int[1]);
       }},
      {"dyn_smem_overrun",
       [](uint64_t) {
         std::vector<float> out(65);
         DMAX_LAUNCH(dyn_smem_overrun_kernel, 1, 65, 64 * sizeof(float), nullptr)(out.data(), 64);
       }},
      {"dyn_smem_read_overrun",
       [](uint64_t) {
         std::vector<float> out(64);
         DMAX_LAUNCH(dyn_smem_read_overrun_kernel, 1, 64, 64 * sizeof(float), nullptr)(out.data(), 64);
         printf("last %g\n", out[63]);
       }},
      {"launch_limits",
       [](uint64_t) {
         float out = 0;
         const struct {
           dim3 grid, block;
           size_t smem;
         } bad[] = {{dim3(1), dim3(1025), 0},          {dim3(1), dim3(32, 33), 0},
                    {dim3(0), dim3(32), 0},            {dim3(1), dim3(1, 1, 65), 0},
                    {dim3(1, 65536), dim3(32), 0},     {dim3(1), dim3(32), 227 * 1024 + 1}};
         for (const auto& c : bad) {
           try {
             DMAX_LAUNCH(empty_kernel, c.grid, c.block, c.smem, nullptr)(&out);
             printf("accepted\n");
           } catch (const simt::Error& e) {
             printf("%s\n", e.what());
           }
         }
         DMAX_LAUNCH(empty_kernel, dim3(1, 65535), dim3(1024), 227 * 1024, nullptr)(&out);
         printf("limits accepted %g\n", out);
       }},
      {"reduction",
       [](uint64_t) {
         const int rows = 3, n = 5000;
         std::vector<float> x(static_cast<size_t>(rows) * n), out(2 * rows);
         std::mt19937 rng(7);
         for (float& v : x) v = static_cast<float>(rng() % 2001) / 1000.0f - 1.0f;
         for (unsigned threads : {1024u, 256u, 96u}) {
           DMAX_LAUNCH(row_sums_kernel, rows, threads, 0, nullptr)(x.data(), out.data(), n);
           for (int r = 0; r < rows; ++r) printf("%.9g %.9g ", out[2 * r], out[2 * r + 1]);
           printf("\n");
         }
         double ref = 0;
         for (int i = 0; i < n; ++i) ref += x[i];
         printf("host %.6f\n", ref);
       }},
      {"shuffles",
       [](uint64_t) {
         std::mt19937 rng(1);
         int bad = check_shuffles<float>("float", rng) + check_shuffles<double>("double", rng) +
                   check_shuffles<int>("int", rng) + check_shuffles<unsigned>("unsigned", rng) +
                   check_shuffles<long long>("long long", rng) +
                   check_shuffles<unsigned long long>("ull", rng) +
                   check_shuffles<int64_t>("int64_t", rng) + check_shuffles<__half>("half", rng) +
                   check_shuffles<__nv_bfloat16>("bf16", rng);
         printf("shuffle mismatches %d\n", bad);
       }},
      {"outside_source",
       [](uint64_t) {
         std::vector<float> out(32, 0.f);
         std::vector<unsigned> out_u(32, 0);
         DMAX_LAUNCH(outside_source_kernel, 1, 32, 0, nullptr)(out.data(), out_u.data());
         printf("lane14 %g %u lane15 %g 0x%x\n", out[14], out_u[14], out[15], out_u[15]);
       }},
      {"votes",
       [](uint64_t) {
         std::mt19937 rng(3);
         int bad = 0;
         for (unsigned mask : {0xffffffffu, 0x0000ffffu, 0x80000001u, 0x55555555u}) {
           for (int trial = 0; trial < 4; ++trial) {
             std::vector<int> pred(64), any(64, -7), all(64, -7);
             std::vector<unsigned> ballot(64, 0);
             for (int& p : pred) p = trial == 0 ? 0 : trial == 1 ? 3 : static_cast<int>(rng() % 2);
             DMAX_LAUNCH(vote_kernel, 1, 64, 0, nullptr)(pred.data(), ballot.data(), any.data(),
                                                         all.data(), mask);
             for (int w = 0; w < 2; ++w) {
               unsigned want = 0;
               for (int l = 0; l < 32; ++l)
                 if ((mask >> l & 1u) && pred[32 * w + l]) want |= 1u << l;
               for (int l = 0; l < 32; ++l) {
                 if (!(mask >> l & 1u)) continue;
                 const int t = 32 * w + l;
                 if (ballot[t] != want || any[t] != (want != 0) || all[t] != (want == mask)) bad++;
               }
             }
           }
         }
         printf("vote mismatches %d\n", bad);
       }},
      {"atomics",
       [](uint64_t) {
         const int blocks = 3, threads = 96, n = blocks * threads;
         std::vector<int> i = {0, -1, 1, 0, -1, 0}, seen(n, 0);
         std::vector<unsigned> u = {0, 0};
         unsigned long long ull = 0;
         float f = 0;
         double d = 0;
         DMAX_LAUNCH(atomics_kernel, blocks, threads, 0, nullptr)(i.data(), u.data(), &ull, &f, &d,
                                                                 seen.data());
         int distinct = 0;
         for (int s : seen) distinct += s;
         printf("add %d max %d min %d u %u umax %u ull %llu f %g d %g exch_once %d distinct_old %d\n",
                i[0], i[1], i[2], u[0], u[1], ull, f, d, i[5], distinct);
       }},
      {"barrier_count",
       [](uint64_t) {
         std::vector<int> out(3);
         DMAX_LAUNCH(barrier_count_kernel, 1, 100, 0, nullptr)(out.data());
         printf("count %d and %d or %d\n", out[0], out[1], out[2]);
       }},
      {"reuse_after_error",
       [](uint64_t) {
         std::vector<float> out(64);
         try {
           DMAX_LAUNCH(divergent_barrier_kernel, 1, 64, 0, nullptr)(out.data());
         } catch (const simt::Error&) {
           printf("first launch failed\n");
         }
         std::vector<float> x(64 * 10, 1.0f), sums(2 * 10);
         DMAX_LAUNCH(row_sums_kernel, 10, 64, 0, nullptr)(x.data(), sums.data(), 64);
         printf("then %g %g\n", sums[0], sums[19]);
       }},
      {"wmma",
       [](uint64_t) {
         std::mt19937 rng(11);
         printf("wmma mismatches %d\n", check_wmma<__half>("half", rng) +
                                            check_wmma<__nv_bfloat16>("bf16", rng));
       }},
      {"wmma_layout_guess",
       [](uint64_t) {
         alignas(64) float d[256];
         DMAX_LAUNCH(wmma_layout_guess_kernel, 1, 32, 0, nullptr)(d);
         int misplaced = 0;
         for (int e = 0; e < 256; ++e) misplaced += d[e] != static_cast<float>(e);
         printf("misplaced %d of 256\n", misplaced);
       }},
      {"wmma_misaligned",
       [](uint64_t) {
         alignas(64) __half a[512];
         DMAX_LAUNCH(wmma_misaligned_kernel, 1, 32, 0, nullptr)(a);
       }},
      {"wmma_half_warp",
       [](uint64_t) {
         alignas(64) float d[256];
         DMAX_LAUNCH(wmma_half_warp_kernel, 1, 32, 0, nullptr)(d);
       }},
      {"outside_kernel", [](uint64_t) { __syncthreads(); }},
      {"perf",
       [](uint64_t) {
         const int rows = 8, n = 157184;
         std::vector<float> x(static_cast<size_t>(rows) * n, 0.5f), out(2 * rows);
         DMAX_LAUNCH(row_sums_kernel, 1, 1024, 0, nullptr)(x.data(), out.data(), n);  // warm-up
         const auto t0 = std::chrono::steady_clock::now();
         DMAX_LAUNCH(row_sums_kernel, rows, 1024, 0, nullptr)(x.data(), out.data(), n);
         const auto t1 = std::chrono::steady_clock::now();
         printf("ms_per_block %.2f (sum %g)\n",
                std::chrono::duration<double, std::milli>(t1 - t0).count() / rows, out[0]);
       }},
  };
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !canaries().count(argv[1])) {
    fprintf(stderr, "usage: canaries <name> [seed]; names:");
    for (const auto& c : canaries()) fprintf(stderr, " %s", c.first.c_str());
    fprintf(stderr, "\n");
    return 2;
  }
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 0;
  simt::set_schedule_seed(seed);
  try {
    canaries().at(argv[1])(seed);
  } catch (const simt::Error& e) {
    printf("simt::Error: %s\n", e.what());
    return 3;
  }
  return 0;
}
