// The threads that run a kernel's tasks, for every kernel library (bf16 and avx2): PyTorch's own OpenMP
// threads when built with -fopenmp (nn/native.py links libgomp.so.1, which resolves to the copy torch has
// loaded), else threads started per call.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

// fn(i) for i in [0, n) on `threads` threads (this one included) taking tasks in turn; each task runs on
// one thread from start to end, so results do not depend on the thread count. With OpenMP the threads are
// the team of PyTorch's pool, already started: a full-size SD1.5 UNet step was 10% faster than
// with a std::thread started per call (each start also woke the other core; docs/performance.md).
template <class F>
void lf_parallel(int64_t n, int threads, F fn) {
    threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n));
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    };
    if (threads == 1) return worker();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    worker();
#else
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto &t : pool) t.join();
#endif
}
