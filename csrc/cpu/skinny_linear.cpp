// dmax.skinny_linear on the CPU: x @ weight^T for a few rows of x (a decoding block's projections
// and lm_head), the weight read once in place. float32: x is transposed into a [K, Mp] copy (rows
// padded with zeros to whole vectors), then the output columns (weight rows) are split over the
// threads in whole register tiles, each running csrc/cpu/vec/skinny_linear_kernel.cpp. bfloat16
// where the AVX512 copy runs and use_bf16_dot() (cpu_features.h: AVX512-BF16 without AMX, or
// DMAX_CPU_BF16_DOT=on): the same tiles with vdpbf16ps, x packed as [ceil(K/2), Mp] pairs of k
// (about twice the float32 kernel's rate; sums no longer bitwise the library's). Other 16-bit
// cases: the library GEMM with the operands swapped, and a vectorized transpose of its product.
// Semantics: F.linear without bias (dmax_ext.reference.skinny_linear_reference); no CUDA version.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>
#include <optional>

#include "cpu/vec/capability.h"
#include "cpu/vec/cpu_features.h"
#include "cpu/vec/skinny_linear_kernel.h"
#include "ops_cpu.h"

namespace dmax::cpu {
namespace {

void check_skinny_linear_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& residual) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "skinny_linear: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(x.dim() == 2, "skinny_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "skinny_linear: weight must be [N, K] with K = ", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype, "skinny_linear: weight must have x's dtype ", dtype,
              ", got ", weight.scalar_type());
  for (const auto* t : {&x, &weight}) {
    TORCH_CHECK(t->device().is_cpu(), "skinny_linear: the CPU kernel got a ", t->device(),
                " tensor");
  }
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.scalar_type() == dtype && r.dim() == 2 && r.size(0) == x.size(0) &&
                    r.size(1) == weight.size(0),
                "skinny_linear: residual must be ", dtype, " [", x.size(0), ", ",
                weight.size(0), "], got ", r.scalar_type(), " ", r.sizes());
    TORCH_CHECK(r.device().is_cpu(), "skinny_linear: the CPU kernel got a ", r.device(),
                " residual");
  }
}

// Chunks of whole tiles streaming at least ~64 KB of weights each. Inside a forward the other
// threads are still spinning from the previous op, and handing them a chunk costs ~1-2 us: at 2
// threads llada2-small's shared-expert projections ([128, 512] and [512, 128] bf16, 32 rows) and
// its router ([64, 512] float32) ran 11.3 / 11.4 / 13.3 us on one thread with 256 KB chunks and
// 8.6 / 7.7 / 9.9 us split (2026-12-06); the larger projections did not change. Each chunk packs
// x for itself (a block's 32 x 512: ~1.4 us, which the other threads spent waiting when the
// caller packed once; at 1 thread one chunk, one pack).
template <class Columns>
void for_column_tiles(int64_t N, int64_t K, int64_t element_bytes, const Columns& columns) {
  static const auto tile_rows = DMAX_CPU_KERNEL(skinny_linear_tile_rows)();
  const int64_t tiles = (N + tile_rows - 1) / tile_rows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (tile_rows * K * element_bytes));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    columns(begin * tile_rows, std::min(end * tile_rows, N));
  });
}

// The residual's elements (contiguous [M, N]) for the kernels' epilogues, or nullptr.
template <class T>
const T* residual_data(const at::Tensor& residual) {
  return residual.defined() ? static_cast<const T*>(residual.const_data_ptr()) : nullptr;
}

// The rows of x in chunks of at most kRowChunk, each a call of the kernel as a decoding block's
// few rows are: the chunk's packed x stays in L2 while the weight streams once per chunk (one
// pack of all M rows, read at a stride of Mp for every tile, fell out of L2 past ~256 rows:
// float32 [2048, 1408] x [512, 1408] at 129 GFLOP/s, the library's oneDNN at 241). The kernel
// computes each output row from that row alone, in an order that does not depend on M, so a
// row's product is the same bits in any batch: decoding's batch invariance (docs/ARCHITECTURE.md)
// rests on it. f(first row, rows) runs one chunk.
constexpr int64_t kRowChunk = 128;
template <class Chunk>
void for_row_chunks(int64_t M, const Chunk& f) {
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) f(m0, std::min(kRowChunk, M - m0));
}

at::Tensor skinny_linear_float(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& residual) {
  static const auto columns = DMAX_CPU_KERNEL(skinny_linear_columns);
  static const auto pack = DMAX_CPU_KERNEL(skinny_linear_pack);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return residual.defined() ? out.copy_(residual) : out.zero_();
  const float* x_p = x.const_data_ptr<float>();
  const float* res_p = residual_data<float>(residual);
  float* out_p = out.mutable_data_ptr<float>();
  for_row_chunks(M, [&](int64_t m0, int64_t rows) {
    const int64_t Mp = (rows + 15) / 16 * 16;
    const SkinnyLinearTask shared{nullptr, rows, Mp, K, N, weight.const_data_ptr<float>(),
                                  out_p + m0 * N, use_nta_prefetch(),
                                  res_p ? res_p + m0 * N : nullptr};
    for_column_tiles(N, K, 4, [&](int64_t begin, int64_t end) {
      const std::unique_ptr<float[]> xt(new float[K * Mp]);  // each chunk its own (see above)
      pack(x_p + m0 * K, rows, K, Mp, xt.get());
      SkinnyLinearTask task = shared;
      task.xt = xt.get();
      columns(task, begin, end);
    });
  });
  return out;
}

#ifdef DMAX_CPU_CAPABILITY_AVX512
// x's pairs of k transposed to [ceil(K/2), Mp] by the float32 pack (32-bit words, bits only),
// an odd K padded with a zero column first; then the column tiles.
at::Tensor skinny_linear_bf16_dot(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& residual) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return residual.defined() ? out.copy_(residual) : out.zero_();
  const at::Tensor xe = K % 2 ? at::constant_pad_nd(x, {0, 1}) : x;
  const int64_t pairs = (K + 1) / 2;
  const auto* x_p = reinterpret_cast<const float*>(xe.const_data_ptr());
  const uint16_t* res_p = residual_data<uint16_t>(residual);
  auto* out_p = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  for_row_chunks(M, [&](int64_t m0, int64_t rows) {
    const int64_t Mp = (rows + 15) / 16 * 16;
    const SkinnyLinearBf16Task shared{
        nullptr, rows, Mp, K, N, reinterpret_cast<const uint16_t*>(weight.const_data_ptr()),
        out_p + m0 * N, use_nta_prefetch(), res_p ? res_p + m0 * N : nullptr};
    for_column_tiles(N, K, 2, [&](int64_t begin, int64_t end) {
      const std::unique_ptr<uint32_t[]> xt(new uint32_t[pairs * Mp]);  // each chunk its own
      AVX512::skinny_linear_pack(x_p + m0 * pairs, rows, pairs, Mp,
                                 reinterpret_cast<float*>(xt.get()));
      SkinnyLinearBf16Task task = shared;
      task.xt = xt.get();
      AVX512::skinny_linear_bf16_columns(task, begin, end);
    });
  });
  return out;
}
#endif

// 16-bit: the library's GEMM (oneDNN, AMX in bf16) as weight @ x^T, the few rows second, which
// streams the weight without repacking it (llada2-small's lm_head, 32 rows of bf16: 2.7 ms
// against 6.1 ms for x @ weight^T), then transposed back by a vectorized kernel (torch's copy
// of the [V, 32] product took 0.8-1.9 ms of it).
at::Tensor skinny_linear_16bit(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& residual) {
  static const auto transpose = DMAX_CPU_KERNEL(transpose_16bit);
  const int64_t M = x.size(0), N = weight.size(0);
  const at::Tensor product = at::mm(weight, x.t()).contiguous();  // [N, M]
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const auto* in_p = reinterpret_cast<const uint16_t*>(product.const_data_ptr());
  auto* out_p = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  at::parallel_for(0, N, std::max<int64_t>(64, (int64_t{1} << 16) / M),
                   [&](int64_t begin, int64_t end) { transpose(in_p, N, M, out_p, begin, end); });
  return residual.defined() ? out.add_(residual) : out;
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& residual) {
  check_skinny_linear_args(x, weight, residual);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) return skinny_linear_float(xc, wc, rc);
#ifdef DMAX_CPU_CAPABILITY_AVX512
  if (x.scalar_type() == at::kBFloat16 && use_bf16_dot()) return skinny_linear_bf16_dot(xc, wc, rc);
#endif
  return skinny_linear_16bit(xc, wc, rc);
}

}  // namespace dmax::cpu
