// simt::launch: validates a launch configuration the way CUDA does, then runs the grid's blocks
// one after another on the calling thread, with __shared__ storage poisoned for every block.
#pragma once

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "block.h"

// Static __shared__ arrays live in the "simt_shared" section (see simt.h). The bounds are
// hidden so that every shared object resolves its own section: DMAX_LAUNCH passes them from
// the launching translation unit, i.e. from the library that also holds the kernel.
extern "C" {
extern char __start_simt_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_simt_shared[] __attribute__((weak, visibility("hidden")));
}

namespace simt {

// CUDA's limits (compute capability 8.0 / 9.0).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long long kMaxGridDim[3] = {2147483647ull, 65535ull, 65535ull};
constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;  // the opt-in maximum on sm_90

namespace detail {

struct SharedSection {
  char* begin;
  char* end;
};

// The byte that fills shared memory before every block. 0xFF reads as NaN (float types) or -1;
// but a NaN slips through fmaxf / fminf, so an out-of-range read feeding a max reduction would
// go unseen: the reverse schedule (seed 1) and odd random seeds fill with 0x7F instead, a huge
// finite float / large positive int (0x7F7F7F7F = 3.4e38) that corrupts such a reduction.
inline unsigned char shared_poison_byte() {
  const uint64_t seed = schedule_seed();
  return (seed == 1 || (seed > 1 && (seed & 1))) ? 0x7F : 0xFF;
}

#if defined(SIMT_ASAN)
// ASan without SIMT_SANITIZE keeps the section; with -fsanitize-sections=simt_shared g++ puts
// redzones after some of its arrays: poison around them, unchecked.
__attribute__((no_sanitize_address)) inline void poison_section(const SharedSection& s) {
  for (char* p = s.begin; p < s.end; ++p)
    if (!__asan_address_is_poisoned(p)) *static_cast<volatile char*>(p) = char(shared_poison_byte());
}
#else
inline void poison_section(const SharedSection& s) {
  if (s.begin < s.end) std::memset(s.begin, shared_poison_byte(), static_cast<size_t>(s.end - s.begin));
}
#endif

// The dynamic shared memory of one launch: exactly smem_bytes, re-poisoned for every block.
// Under ASan the allocation is exact, so any access past it is a heap-buffer-overflow; without
// it, canary bytes around the buffer are checked after every block (a write past the end is an
// error, a read past it gives NaN).
class DynamicSmem {
 public:
#if defined(SIMT_ASAN)
  static constexpr size_t kFront = 0, kBack = 0;
#else
  static constexpr size_t kFront = 64, kBack = 256;
#endif
  // Canary word 0x7FFFFFFF: NaN when read as float, double, __half or bf16, INT_MAX as int,
  // and unlike the 0xFF poison it tells a stored -1 / NaN from an untouched byte.
  static unsigned char canary(size_t i) { return (i & 3) == 3 ? 0x7F : 0xFF; }

  explicit DynamicSmem(size_t bytes) : bytes_(bytes) {
    raw_ = static_cast<unsigned char*>(
        ::operator new(kFront + bytes + kBack, std::align_val_t{64}));
  }
  ~DynamicSmem() { ::operator delete(raw_, std::align_val_t{64}); }
  DynamicSmem(const DynamicSmem&) = delete;
  DynamicSmem& operator=(const DynamicSmem&) = delete;

  unsigned char* data() const { return raw_ + kFront; }

  void poison() {
    for (size_t i = 0; i < kFront; ++i) raw_[i] = canary(i);
    std::memset(data(), shared_poison_byte(), bytes_);
    for (size_t i = 0; i < kBack; ++i) data()[bytes_ + i] = canary(kFront + bytes_ + i);
  }

  // "" when intact, else where the first damaged canary byte is.
  std::string damage() const {
    for (size_t i = 0; i < kFront; ++i)
      if (raw_[i] != canary(i))
        return "a write " + std::to_string(kFront - i) + " bytes before the start";
    for (size_t i = 0; i < kBack; ++i)
      if (data()[bytes_ + i] != canary(kFront + bytes_ + i))
        return "a write at byte offset " + std::to_string(bytes_ + i);
    return "";
  }

 private:
  size_t bytes_;
  unsigned char* raw_;
};

inline void validate(const char* kernel, const dim3& grid, const dim3& block, size_t smem) {
  auto fail = [&](const std::string& what) {
    throw Error("kernel '" + std::string(kernel) + "': invalid launch configuration: " + what);
  };
  const unsigned b[3] = {block.x, block.y, block.z};
  const unsigned g[3] = {grid.x, grid.y, grid.z};
  for (int d = 0; d < 3; ++d) {
    if (b[d] == 0 || g[d] == 0)
      fail("zero dimension in grid " + to_string(grid) + " or block " + to_string(block));
    if (b[d] > kMaxBlockDim[d])
      fail("block " + to_string(block) + " exceeds the maximum (1024,1024,64)");
    if (g[d] > kMaxGridDim[d])
      fail("grid " + to_string(grid) + " exceeds the maximum (2147483647,65535,65535)");
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads > kMaxThreadsPerBlock)
    fail("block " + to_string(block) + " has " + std::to_string(threads) +
         " threads, more than 1024");
  if (smem > kMaxDynamicSmemBytes)
    fail(std::to_string(smem) + " bytes of dynamic shared memory, more than 227 KiB (" +
         std::to_string(kMaxDynamicSmemBytes) + ")");
}

// Static shared arrays are process-wide, so launches from different OS threads take turns.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void launch(KernelRun run, size_t smem_bytes, const SharedSection& section) {
  if (current_block() != nullptr)
    throw Error("kernel '" + std::string(run.kernel) +
                "' launched from inside a kernel (dynamic parallelism is not emulated)");
  std::lock_guard<std::mutex> lock(launch_mutex());
  validate(run.kernel, run.grid, run.block, smem_bytes);
  const unsigned long long blocks = 1ull * run.grid.x * run.grid.y * run.grid.z;
  if (blocks > (1ull << 26))
    throw Error("kernel '" + std::string(run.kernel) + "': grid of " + std::to_string(blocks) +
                " blocks is too large to emulate");
  DynamicSmem smem(smem_bytes);
  run.dynamic_smem = smem.data();
  std::vector<unsigned> order;
  schedule_order(order, static_cast<size_t>(blocks), schedule_seed(), 0x5EEDB10Cull);
  for (unsigned linear : order) {
    const uint3 idx{linear % run.grid.x, (linear / run.grid.x) % run.grid.y,
                    linear / (run.grid.x * run.grid.y)};
    poison_section(section);
    smem.poison();
    Block(run, idx).execute();
    const std::string damage = smem.damage();
    if (!damage.empty())
      throw Error("kernel '" + std::string(run.kernel) + "' block " + to_string(idx) +
                  ": dynamic shared memory overrun: " + damage + " of the " +
                  std::to_string(smem_bytes) + "-byte buffer");
  }
}

// DMAX_LAUNCH(k, ...)(args...): converts the arguments to the kernel's parameter types (CUDA
// passes kernel parameters by value) and runs the grid.
template <class... Params>
class Launcher {
 public:
  using Kernel = void (*)(Params...);
  Launcher(Kernel kernel, const char* name, dim3 grid, dim3 block, size_t smem,
           SharedSection section)
      : kernel_(kernel), name_(name), grid_(grid), block_(block), smem_(smem), section_(section) {}

  template <class... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params),
                  "DMAX_LAUNCH: wrong number of kernel arguments");
    struct Call {
      Kernel kernel;
      std::tuple<std::decay_t<Params>...> params;
    };
    const Call call{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    KernelRun run;
    run.kernel = name_;
    run.grid = grid_;
    run.block = block_;
    run.call = &call;
    run.invoke = [](const void* c) {
      const Call& call = *static_cast<const Call*>(c);
      std::apply(call.kernel, call.params);  // every thread gets its own copy of the params
    };
    launch(run, smem_, section_);
  }

 private:
  Kernel kernel_;
  const char* name_;
  dim3 grid_, block_;
  size_t smem_;
  SharedSection section_;
};

template <class... Params, class Stream>
inline Launcher<Params...> launcher(void (*kernel)(Params...), const char* name, dim3 grid,
                                    dim3 block, size_t smem_bytes, Stream /*stream*/,
                                    SharedSection section) {
  return Launcher<Params...>(kernel, name, grid, block, smem_bytes, section);
}

// The current block's dynamic shared memory (DMAX_DYNAMIC_SMEM).
inline unsigned char* dynamic_smem() {
  return running_block("DMAX_DYNAMIC_SMEM").run().dynamic_smem;
}

}  // namespace detail
}  // namespace simt

#define SIMT_LAUNCH(k, grid, block, smem, stream)                                      \
  ::simt::detail::launcher((k), #k, (grid), (block), (smem), (stream),                 \
                           ::simt::detail::SharedSection{__start_simt_shared, __stop_simt_shared})
