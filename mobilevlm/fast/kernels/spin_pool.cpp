// The worker threads of the native kernels: a pool whose workers spin for a short while after each job before
// they sleep.
//
// Why not at::parallel_for (OpenMP): a decode step runs ~120 kernel calls (4 products and the attention per
// layer, then the lm_head), each an OpenMP parallel region. Under OMP_WAIT_POLICY=PASSIVE (what the benchmarks
// set, and what a shared machine wants) OpenMP's workers sleep at the end of every region, so each region pays a
// futex wake-up: measured at 1.7B int4 with 2 threads, a 44 ms step took 30-39 ms when the workers could spin.
// llama.cpp pays one wake-up per token (one region per graph, its own spinning barriers inside). Here the
// workers spin for kSpin after a job - longer than the gaps between one step's kernels, far shorter than the
// time between tokens of a slow consumer or between requests - then block, so an idle process burns no CPU.
#include <immintrin.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr auto kSpin = std::chrono::microseconds(500);

class SpinPool {
 public:
  ~SpinPool() { stop_workers(); }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    const int parts = static_cast<int>(std::min<int64_t>(n, std::max(1, at::get_num_threads())));
    if (parts <= 1) {
      fn(0, n);
      return;
    }
    // one job at a time (e.g. two server threads); the pool is sized by the caller's thread setting
    std::lock_guard<std::mutex> submit(submit_);
    ensure_workers(parts - 1);
    job_ = &fn;
    n_ = n;
    parts_ = parts;
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    fn(0, split(1));
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  int64_t split(int part) const { return n_ * part / parts_; }

  void ensure_workers(int count) {
    // a forked child has the parent's pool object but none of its threads
    if (owner_ != getpid()) {
      workers_.clear();  // the threads do not exist here: nothing to join
      owner_ = getpid();
    }
    if (static_cast<int>(workers_.size()) >= count) return;
    stop_workers();
    stopping_ = false;
    // the generation the workers start from is read here: a thread that starts after the first job was posted
    // must still see that job as new
    const uint64_t current = generation_.load(std::memory_order_acquire);
    for (int i = 0; i < count; ++i) workers_.emplace_back([this, i, current] { work(i + 1, current); });
  }

  void stop_workers() {
    if (workers_.empty() || owner_ != getpid()) return;
    {
      std::lock_guard<std::mutex> lock(sleep_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
    workers_.clear();
  }

  void work(int part, uint64_t seen) {
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        _mm_pause();
        if ((spins & 63) == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stopping_) return;
      if (part < parts_) (*job_)(split(part), split(part + 1));
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex submit_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 1;
  bool stopping_ = false;
  pid_t owner_ = getpid();
  std::vector<std::thread> workers_;
};

}  // namespace

// fn(begin, end) over contiguous parts of [0, n), one per thread of torch's setting, the caller running the first.
void mobilevlm_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  static SpinPool pool;
  pool.run(n, fn);
}
