// One fiber per emulated CUDA thread: a private mmap'ed stack with a guard page, entered once
// through makecontext and switched afterwards with _setjmp/_longjmp (no sigprocmask syscall).
// Fibers belong to the OS thread that created them and never run on another one: compilers
// cache thread_local addresses across calls, so a migrated fiber would read the wrong TLS.
#pragma once

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif

#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace simt {
namespace detail {

// ASan inflates frames several times over; stacks are MAP_NORESERVE, so only touched pages cost.
#if defined(SIMT_ASAN)
constexpr size_t kFiberStackBytes = 1024 * 1024;
#else
constexpr size_t kFiberStackBytes = 256 * 1024;
#endif

// The OS thread's own stack, the place every fiber switches back to.
struct Home {
  jmp_buf ctx;
  void* asan_fake_stack = nullptr;
  const void* stack_bottom = nullptr;  // learned from the first fiber entry (ASan only)
  size_t stack_size = 0;
};

inline Home& home() {
  static thread_local Home h;
  return h;
}

class Fiber {
 public:
  using Entry = void (*)();

  explicit Fiber(Entry entry) : entry_(entry) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    map_bytes_ = kFiberStackBytes + page;
    void* m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    map_ = static_cast<char*>(m);
    mprotect(map_, page, PROT_NONE);  // stacks grow down: the guard sits below the stack
    stack_ = map_ + page;
    reset();
  }
  ~Fiber() { munmap(map_, map_bytes_); }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Forget whatever the fiber was doing (after an error abandoned it mid-kernel): the next
  // resume starts it at its entry again.
  void reset() {
    getcontext(&uc_);
    uc_.uc_stack.ss_sp = stack_;
    uc_.uc_stack.ss_size = kFiberStackBytes;
    uc_.uc_link = nullptr;
    makecontext(&uc_, entry_, 0);
    started_ = false;
#if defined(SIMT_ASAN)
    // Frames abandoned mid-kernel left their redzones poisoned in the shadow.
    __asan_unpoison_memory_region(stack_, kFiberStackBytes);
    asan_fake_stack_ = nullptr;
#endif
  }

  // Scheduler side: run this fiber until it yields back.
  void resume() {
    Home& h = home();
    if (_setjmp(h.ctx) == 0) {
#if defined(SIMT_ASAN)
      __sanitizer_start_switch_fiber(&h.asan_fake_stack, stack_, kFiberStackBytes);
#endif
      if (!started_) {
        started_ = true;
        setcontext(&uc_);
      }
      _longjmp(ctx_, 1);
    }
#if defined(SIMT_ASAN)
    __sanitizer_finish_switch_fiber(h.asan_fake_stack, nullptr, nullptr);
#endif
  }

  // Fiber side: give control back to the scheduler; returns when resumed again.
  void yield() {
    Home& h = home();
    if (_setjmp(ctx_) == 0) {
#if defined(SIMT_ASAN)
      __sanitizer_start_switch_fiber(&asan_fake_stack_, h.stack_bottom, h.stack_size);
#endif
      _longjmp(h.ctx, 1);
    }
#if defined(SIMT_ASAN)
    __sanitizer_finish_switch_fiber(asan_fake_stack_, &h.stack_bottom, &h.stack_size);
#endif
  }

  // First thing the entry function does on the fresh stack.
  static void on_entry() {
#if defined(SIMT_ASAN)
    Home& h = home();
    __sanitizer_finish_switch_fiber(nullptr, &h.stack_bottom, &h.stack_size);
#endif
  }

 private:
  Entry entry_;
  char* map_ = nullptr;
  size_t map_bytes_ = 0;
  char* stack_ = nullptr;
  ucontext_t uc_;
  jmp_buf ctx_;
  bool started_ = false;
#if defined(SIMT_ASAN)
  void* asan_fake_stack_ = nullptr;
#endif
};

// The fibers of one OS thread, grown to the largest block seen and reused across launches.
class FiberPool {
 public:
  Fiber& get(unsigned i, Fiber::Entry entry) {
    while (fibers_.size() <= i) fibers_.push_back(std::make_unique<Fiber>(entry));
    return *fibers_[i];
  }

 private:
  std::vector<std::unique_ptr<Fiber>> fibers_;
};

inline FiberPool& fiber_pool() {
  static thread_local FiberPool pool;
  return pool;
}

}  // namespace detail
}  // namespace simt
