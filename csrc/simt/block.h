// The block scheduler: runs the CUDA threads of one block as fibers on the calling OS thread,
// each until it blocks (at __syncthreads, at a warp collective, or at its end), and checks every
// rendezvous strictly: a divergent barrier, a collective whose named lanes cannot all arrive,
// and a block where nothing can run while someone waits are errors, not hangs.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "error.h"
#include "fiber.h"

// The CUDA built-in variables. thread_local: fibers of one OS thread share them, and the
// scheduler sets threadIdx before every resume (never migrate fibers: see fiber.h).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace simt {

namespace detail {
inline std::atomic<uint64_t>& schedule_seed_storage() {
  static std::atomic<uint64_t> seed{[] {
    const char* env = std::getenv("SIMT_SCHEDULE_SEED");
    return env ? std::strtoull(env, nullptr, 0) : 0ull;
  }()};
  return seed;
}
}  // namespace detail

// 0 = threads (and blocks) in index order, 1 = reverse order, anything else = a random order
// drawn from the seed, re-drawn at every barrier phase, together with how the warps take turns
// in that phase (schedule_warp_greedy). Default: $SIMT_SCHEDULE_SEED or 0.
inline void set_schedule_seed(uint64_t seed) { detail::schedule_seed_storage() = seed; }
inline uint64_t schedule_seed() { return detail::schedule_seed_storage(); }

namespace detail {

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// order = 0..n-1 in the schedule's order for (seed, stream of draws `salt`).
inline void schedule_order(std::vector<unsigned>& order, size_t n, uint64_t seed, uint64_t salt) {
  order.resize(n);
  for (size_t i = 0; i < n; ++i) order[i] = static_cast<unsigned>(seed == 1 ? n - 1 - i : i);
  if (seed <= 1) return;
  uint64_t state = seed ^ (salt * 0xD1B54A32D192ED03ull);
  for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix64(state) % i]);
}

// How the threads of a barrier phase take turns. Interleaved (seeds 0 and 1, and half the phases
// of a random seed): each ready thread in the order runs until it blocks, so the warps move
// through their collectives together. Warp-greedy (the other random phases): the first ready
// thread's whole warp runs until every lane of it waits at a barrier or has exited, then the
// next warp: one warp a full stretch of code ahead of another, as warps of different speeds
// are on a GPU. That exposes a missing __syncthreads between one loop iteration's reads of shared
// memory and the next iteration's writes (tests/test_simt_emulator.py), which interleaved turns
// never run far enough apart to show.
inline bool schedule_warp_greedy(uint64_t seed, uint64_t salt) {
  if (seed <= 1) return false;
  uint64_t state = seed ^ (salt * 0x9FB21C651E98DF25ull) ^ 0x6A09E667F3BCC909ull;
  return splitmix64(state) & 1u;
}

// Everything a block needs to know about its launch.
struct KernelRun {
  const char* kernel = "";
  dim3 grid, block;
  void (*invoke)(const void* call) = nullptr;  // runs the kernel for the current thread
  const void* call = nullptr;
  unsigned char* dynamic_smem = nullptr;
};

enum class ThreadState : uint8_t { Ready, AtBarrier, AtWarp, Exited };
enum class WarpOp : uint8_t { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Syncwarp };

inline const char* op_name(WarpOp op) {
  static const char* const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                      "__shfl_xor_sync", "__ballot_sync", "__any_sync",
                                      "__all_sync", "__syncwarp"};
  return names[static_cast<int>(op)];
}

struct ThreadSlot {
  ThreadState state = ThreadState::Ready;
  bool started = false;  // its fiber has run in this block (so it is mid-kernel until it exits)
  uint3 idx{};
  unsigned barriers = 0;  // __syncthreads reached so far
  Site site;              // where it waits
  WarpOp op = WarpOp::Syncwarp;
  unsigned mask = 0;
  int arg = 0;
  int width = 32;
  uint64_t in = 0, out = 0;
  bool poison = false;
};

class Block;
inline Block*& current_block() {
  static thread_local Block* block = nullptr;
  return block;
}

class Block {
 public:
  Block(const KernelRun& run, uint3 block_idx)
      : run_(run), idx_(block_idx), n_(run.block.x * run.block.y * run.block.z), slots_(n_) {
    for (unsigned t = 0; t < n_; ++t)
      slots_[t].idx = uint3{t % run.block.x, (t / run.block.x) % run.block.y,
                            t / (run.block.x * run.block.y)};
  }

  const KernelRun& run() const { return run_; }

  // Runs the block to completion on this OS thread; throws simt::Error on a diagnosed bug.
  void execute() {
    struct Scope {  // current_block is set exactly while this block runs
      explicit Scope(Block* b) { current_block() = b; }
      ~Scope() { current_block() = nullptr; }
    } scope(this);
    try {
      schedule();
    } catch (...) {
      abandon();
      throw;
    }
  }

  // ---- called by the running CUDA thread, on its fiber ----

  // Returns how many threads arrived with a nonzero predicate (for __syncthreads_count & co).
  unsigned syncthreads(const Site& site, int predicate) {
    ThreadSlot& me = slots_[current_];
    me.in = predicate != 0;
    me.barriers++;
    me.site = site;
    me.state = ThreadState::AtBarrier;
    if (barrier_first_ == kNone) {
      barrier_first_ = current_;
    } else {
      const ThreadSlot& first = slots_[barrier_first_];
      if (!same_site(first.site, site) || first.barriers != me.barriers)
        fail("divergent __syncthreads: " + where(barrier_first_) + " but " + where(current_));
    }
    // A lane of this warp waiting in a collective that names this thread can never complete.
    const unsigned lane = current_ & 31u, base = current_ - lane;
    for (unsigned t = base; t < n_ && t < base + 32; ++t) {
      const ThreadSlot& o = slots_[t];
      if (o.state == ThreadState::AtWarp && (o.mask >> lane & 1u))
        fail("deadlock: " + where(current_) + " while " + warp_call(t) + " waits for it");
    }
    fiber(current_).yield();
    return barrier_count_;
  }

  // Threads released by the last barrier (the population of __syncthreads_and).
  unsigned live_at_last_barrier() const { return barrier_live_; }

  uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t in, int arg, int width,
                           const Site& site, bool* poison) {
    const unsigned t = current_, lane = t & 31u, base = t - lane;
    ThreadSlot& me = slots_[t];
    me.op = op;
    me.mask = mask;
    me.site = site;
    me.arg = arg;
    me.width = width;
    me.in = in;
    if (!(mask >> lane & 1u)) fail(warp_call(t) + ": the calling lane is not in the mask");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
      fail(warp_call(t) + ": width " + std::to_string(width) + " is not a power of two <= 32");
    const unsigned lanes = n_ - base < 32 ? n_ - base : 32;
    const unsigned existing = lanes == 32 ? ~0u : (1u << lanes) - 1u;
    if (mask & ~existing)
      fail(warp_call(t) + ": the mask names lane " + std::to_string(__builtin_ctz(mask & ~existing)) +
           ", which does not exist (this warp has " + std::to_string(lanes) + " threads)");
    me.state = ThreadState::AtWarp;
    unsigned arrived = 1u << lane;
    for (unsigned m = mask & ~(1u << lane); m; m &= m - 1) {
      const unsigned l = __builtin_ctz(m);
      const ThreadSlot& o = slots_[base + l];
      if (o.state == ThreadState::Ready) continue;
      if (o.state == ThreadState::AtWarp && joins(o, me)) {
        arrived |= 1u << l;
      } else if (o.state != ThreadState::AtWarp || (o.mask >> lane & 1u)) {
        fail(warp_call(t) + ": lane " + std::to_string(l) + " " + state_of(base + l));
      }
      // else: lane l waits in another collective that does not need this lane; it may come.
    }
    if (arrived == mask) {
      complete(base, mask);
    } else {
      fiber(t).yield();
    }
    *poison = me.poison;
    return me.out;
  }

  static void fiber_main() {
    Fiber::on_entry();
    for (;;) {
      Block* b = current_block();
      ThreadSlot& me = b->slots_[b->current_];
      try {
        b->run_.invoke(b->run_.call);
      } catch (...) {
        b->error_ = std::current_exception();
      }
      me.state = ThreadState::Exited;
      b->exited_++;
      b->fiber(b->current_).yield();  // resumed later as another thread of another block
    }
  }

 private:
  static constexpr unsigned kNone = ~0u;

  Fiber& fiber(unsigned t) { return fiber_pool().get(t, &Block::fiber_main); }

  void resume(unsigned t) {
    current_ = t;
    threadIdx = slots_[t].idx;
    slots_[t].started = true;
    fiber(t).resume();
  }

  void schedule() {
    blockIdx = idx_;
    blockDim = run_.block;
    gridDim = run_.grid;
    const uint64_t seed = schedule_seed();
    const uint64_t block_salt =
        (uint64_t(idx_.z) * run_.grid.y + idx_.y) * uint64_t(run_.grid.x) + idx_.x;
    uint64_t phase = 0;
    std::vector<unsigned> order;
    schedule_order(order, n_, seed, block_salt * 0x100000001B3ull + phase);
    bool greedy = schedule_warp_greedy(seed, block_salt * 0x100000001B3ull + phase);
    for (;;) {
      bool ran = false;
      for (unsigned t : order) {
        if (slots_[t].state != ThreadState::Ready) continue;
        if (greedy) {
          run_warp(t / 32u, order);
        } else {
          resume(t);
          if (error_) std::rethrow_exception(error_);
        }
        ran = true;
      }
      if (ran) continue;
      if (exited_ == n_) return;
      release_barrier_or_fail();
      ++phase;
      schedule_order(order, n_, seed, block_salt * 0x100000001B3ull + phase);
      greedy = schedule_warp_greedy(seed, block_salt * 0x100000001B3ull + phase);
    }
  }

  // Warp-greedy turns: the lanes of warp w, in the phase's order, until none is ready.
  void run_warp(unsigned w, const std::vector<unsigned>& order) {
    lanes_.clear();
    for (unsigned t : order)
      if (t / 32u == w) lanes_.push_back(t);
    for (bool progress = true; progress;) {
      progress = false;
      for (unsigned t : lanes_) {
        if (slots_[t].state != ThreadState::Ready) continue;
        resume(t);
        progress = true;
        if (error_) std::rethrow_exception(error_);
      }
    }
  }

  // Nothing can run: either every live thread waits at the same barrier, or it is a bug.
  void release_barrier_or_fail() {
    for (unsigned t = 0; t < n_; ++t) {
      const ThreadSlot& s = slots_[t];
      if (s.state != ThreadState::AtWarp) continue;
      const unsigned base = t & ~31u;
      for (unsigned m = s.mask; m; m &= m - 1) {
        const unsigned l = __builtin_ctz(m);
        const ThreadSlot& o = slots_[base + l];
        if (!(o.state == ThreadState::AtWarp && joins(o, s)))
          fail("deadlock: " + warp_call(t) + " cannot complete: lane " + std::to_string(l) + " " +
               state_of(base + l));
      }
    }
    const ThreadSlot& first = slots_[barrier_first_];
    for (unsigned t = 0; t < n_; ++t) {
      const ThreadSlot& s = slots_[t];
      if (s.state == ThreadState::Exited && s.barriers < first.barriers)
        fail("divergent __syncthreads: " + where(barrier_first_) + " but thread " +
             to_string(s.idx) + " exited after " + std::to_string(s.barriers) + " __syncthreads");
    }
    barrier_count_ = barrier_live_ = 0;
    for (ThreadSlot& s : slots_) {
      if (s.state != ThreadState::AtBarrier) continue;
      s.state = ThreadState::Ready;
      barrier_live_++;
      barrier_count_ += static_cast<unsigned>(s.in);
    }
    barrier_first_ = kNone;
  }

  // The last lane to arrive computes every lane's result and wakes the others.
  void complete(unsigned base, unsigned mask) {
    unsigned ballot = 0;
    for (unsigned m = mask; m; m &= m - 1) {
      const unsigned l = __builtin_ctz(m);
      if (slots_[base + l].in != 0) ballot |= 1u << l;
    }
    for (unsigned m = mask; m; m &= m - 1) {
      const unsigned l = __builtin_ctz(m);
      ThreadSlot& s = slots_[base + l];
      s.poison = false;
      switch (s.op) {
        case WarpOp::Ballot: s.out = ballot; break;
        case WarpOp::Any: s.out = ballot != 0; break;
        case WarpOp::All: s.out = ballot == mask; break;
        case WarpOp::Syncwarp: s.out = 0; break;
        default: {
          const unsigned src = shuffle_source(s.op, l, s.arg, static_cast<unsigned>(s.width));
          if (src < 32 && (mask >> src & 1u)) {
            s.out = slots_[base + src].in;
          } else {  // reading a lane that does not take part: undefined in CUDA
            s.out = 0;
            s.poison = true;
          }
        }
      }
      s.state = ThreadState::Ready;
    }
  }

  // CUDA's lane arithmetic; a source outside the caller's width group gives its own value.
  static unsigned shuffle_source(WarpOp op, unsigned lane, int arg, unsigned width) {
    const unsigned group = lane & ~(width - 1), pos = lane & (width - 1);
    const unsigned delta = static_cast<unsigned>(arg);
    switch (op) {
      case WarpOp::Shfl: return group + (delta & (width - 1));
      case WarpOp::ShflUp: return pos >= delta ? lane - delta : lane;
      case WarpOp::ShflDown: return delta < width - pos ? lane + delta : lane;
      default: {  // xor: earlier groups are readable, later ones give the caller's own value
        const unsigned src = lane ^ delta;
        return src < group + width ? src : lane;
      }
    }
  }

  static bool joins(const ThreadSlot& a, const ThreadSlot& b) {
    return a.op == b.op && a.mask == b.mask && same_site(a.site, b.site);
  }

  // Reset the fibers an error left mid-kernel so the next launch starts them afresh.
  void abandon() {
    for (unsigned t = 0; t < n_; ++t)
      if (slots_[t].started && slots_[t].state != ThreadState::Exited) fiber(t).reset();
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw Error("kernel '" + std::string(run_.kernel) + "' block " + to_string(idx_) + ": " + what);
  }

  std::string thread(unsigned t) const { return "thread " + to_string(slots_[t].idx); }

  std::string where(unsigned t) const {
    return thread(t) + " waits at " + to_string(slots_[t].site) + " (#" +
           std::to_string(slots_[t].barriers) + ")";
  }

  std::string warp_call(unsigned t) const {
    const ThreadSlot& s = slots_[t];
    return std::string(op_name(s.op)) + " at " + to_string(s.site) + " by " + thread(t) +
           " (lane " + std::to_string(t & 31u) + ", mask " + hex(s.mask) + ")";
  }

  std::string state_of(unsigned t) const {
    const ThreadSlot& s = slots_[t];
    const std::string who = "(" + thread(t) + ")";
    switch (s.state) {
      case ThreadState::Exited: return who + " has exited";
      case ThreadState::AtBarrier: return who + " waits at __syncthreads at " + to_string(s.site);
      case ThreadState::AtWarp:
        return who + " waits in " + op_name(s.op) + " at " + to_string(s.site) + " with mask " +
               hex(s.mask);
      default: return who + " is running";
    }
  }

  KernelRun run_;
  uint3 idx_;
  unsigned n_;
  std::vector<ThreadSlot> slots_;
  unsigned current_ = 0;
  unsigned exited_ = 0;
  unsigned barrier_first_ = kNone;
  unsigned barrier_count_ = 0, barrier_live_ = 0;
  std::exception_ptr error_;
  std::vector<unsigned> lanes_;  // run_warp's lanes, in the phase's order
};

inline Block& running_block(const char* what) {
  Block* b = current_block();
  if (!b) throw Error(std::string(what) + " called outside a kernel launch");
  return *b;
}

}  // namespace detail
}  // namespace simt
