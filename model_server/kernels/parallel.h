// Spreading a kernel's independent items over XLA's intra-op thread pool.
#ifndef SAXPLANE_KERNELS_PARALLEL_H_
#define SAXPLANE_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace saxplane {

// Runs item(i) for every i in [0, total): pool threads and the caller take items from a
// shared counter, and the caller waits only for items already taken, so it never depends on
// a pool thread being free. A pool thread that starts after the last item was taken returns
// at once (the shared state outlives the call; `item` is not invoked then).
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, F item) {
  struct State {
    explicit State(F f) : fn(std::move(f)) {}
    F fn;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    void run() {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= total) return;
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (total <= 0) return;
  auto state = std::make_shared<State>(std::move(item));
  state->total = total;
  // The caller is itself one of the pool's threads (XLA:CPU runs thunks on it): the others
  // help, so the kernel runs on as many threads as the pool has (measured: one more, queued
  // behind the caller, only costs a wake-up).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, total - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace saxplane

#endif  // SAXPLANE_KERNELS_PARALLEL_H_
