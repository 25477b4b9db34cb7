// How the kernels split a call's work over threads: OpenMP where the library is built with it,
// else (and in a forked child) a small persistent pool of their own.
//
// OpenMP first: built with -fopenmp, the library's libgomp.so.1 is torch's own runtime (already
// loaded), so kernels and torch ops share one team of threads, and a spinning wait policy
// (OMP_WAIT_POLICY=ACTIVE, or libgomp's default spin before sleeping) hands a call to an awake
// thread in a microsecond. Waking a sleeping thread costs far more on a VM, and a decode step makes
// a kernel call per layer and op, so the wake-ups add up (benchmarks/RESULTS.md,
// "engine/kernels/pool.h").
//
// libgomp does not survive a fork (a child's first parallel region waits forever for the parent's
// threads; torch's own ops hang the same way), so a forked child uses the pool below instead.
//
// The pool: workers are started once, sleep on a condition variable between calls and the calling
// thread always runs share 0 itself; one call runs at a time (callers queue on `calls_`); a forked
// child starts with no workers and builds its own on first use, since a fork copies only the
// forking thread.
#pragma once

#include <pthread.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tandem {

class Pool {
   public:
    // fn(share, shares) for share in [0, shares); returns when all have finished.
    void run(int64_t shares, const std::function<void(int64_t, int64_t)>& fn) {
        if (shares <= 1) {
            fn(0, 1);
            return;
        }
        std::lock_guard<std::mutex> one_at_a_time(calls_);
        {
            std::lock_guard<std::mutex> lock(mu_);
            while (started_ < shares - 1) start_worker();
            job_ = &fn;
            shares_ = shares;
            pending_ = shares - 1;
            ++generation_;
        }
        wake_.notify_all();
        fn(0, shares);
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [&] { return pending_ == 0; });
        job_ = nullptr;
    }

    // In a forked child: the workers were not copied; forget them (their objects are detached).
    void reset_after_fork() {
        new (&calls_) std::mutex();
        new (&mu_) std::mutex();
        new (&wake_) std::condition_variable();
        new (&done_) std::condition_variable();
        started_ = 0;
        pending_ = 0;
        job_ = nullptr;
    }

   private:
    void start_worker() {  // with mu_ held, before the call's generation is published
        const int64_t share = ++started_;
        const uint64_t seen = generation_;
        std::thread([this, share, seen] { work(share, seen); }).detach();
    }

    void work(int64_t share, uint64_t seen) {
        for (;;) {
            const std::function<void(int64_t, int64_t)>* job;
            int64_t shares;
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (share >= shares_) continue;  // this call needs fewer workers
                job = job_;
                shares = shares_;
            }
            (*job)(share, shares);
            std::lock_guard<std::mutex> lock(mu_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex calls_, mu_;
    std::condition_variable wake_, done_;
    const std::function<void(int64_t, int64_t)>* job_ = nullptr;
    int64_t started_ = 0, shares_ = 0, pending_ = 0;
    uint64_t generation_ = 0;
};

inline Pool& pool() {
    static Pool* instance = new Pool();  // never destroyed: detached workers may outlive static destructors
    return *instance;
}

// Set in a forked child (registered when the library loads, before any fork it could miss).
inline bool forked_child = false;
inline const bool fork_handler_registered = [] {
    pthread_atfork(nullptr, nullptr, [] {
        forked_child = true;
        pool().reset_after_fork();
    });
    return true;
}();

// Runs fn(first, last) over [0, items) split into `shares` contiguous ranges.
inline void parallel_ranges(int64_t items, int64_t shares, const std::function<void(int64_t, int64_t)>& fn) {
    if (shares > items) shares = items;
    if (shares < 1) shares = 1;
    const auto range = [&](int64_t share, int64_t total) { fn(items * share / total, items * (share + 1) / total); };
    if (shares == 1) return range(0, 1);
#ifdef _OPENMP
    if (!forked_child) {
#pragma omp parallel num_threads(shares)
        range(omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    pool().run(shares, range);
}

}  // namespace tandem
