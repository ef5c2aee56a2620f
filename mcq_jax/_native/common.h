// What mcq_jax's native kernels share: the floating-point mode XLA:CPU
// computes in, and a parallel loop on XLA's CPU thread pool.

#ifndef MCQ_JAX_NATIVE_COMMON_H_
#define MCQ_JAX_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace mcq_jax {

// Flushes denormal results and operands to zero while alive, as XLA:CPU
// computes, then restores the caller's mode.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ | DAZ
#elif defined(__aarch64__)
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    uint64_t fz = saved_ | (uint64_t{1} << 24);
    asm volatile("msr fpcr, %0" : : "r"(fz));
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" : : "r"(saved_));
#endif
  }

 private:
#if defined(__aarch64__)
  uint64_t saved_ = 0;
#else
  unsigned saved_ = 0;
#endif
};

// Runs body(i) for every i in [0, count) on the calling thread and up to
// `pool.num_threads()` tasks of XLA's thread pool. Every thread takes the
// next index until none is left, and the caller then waits only for indices
// already taken: it never waits for a task the pool has not started (whose
// threads may all be busy, in this call's caller among others).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool* pool, int64_t count, const Body& body) {
  const int64_t helpers =
      pool == nullptr ? 0 : std::min<int64_t>(pool->num_threads(), count - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  const Body* shared_body = &body;  // read only for indices below count
  auto run = [state, count, shared_body]() {
    FlushDenormals flush;  // per thread
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      (*shared_body)(i);
      if (state->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = run;
    pool->Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == count; });
}

}  // namespace mcq_jax

#endif  // MCQ_JAX_NATIVE_COMMON_H_
