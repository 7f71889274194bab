/* The parallel-loop launcher linked into every ctc CPU library (model.so): chunks claimed at run time.
 *
 * Why: TVM's LLVM codegen turns each parallel loop into a lambda and calls the library's context pointer
 * __TVMBackendParallelLaunch(lambda, closure, 0).  TVM's own pool gives every thread one fixed range
 * (task i of n runs [i*ceil(N/n), (i+1)*ceil(N/n))) and the caller waits at the join until every worker
 * has run its range, so one delayed thread (preempted by another process, a vCPU the host has not
 * scheduled yet, a worker still waking up) delays every parallel kernel.  EfficientNet-Lite0 has ~53
 * such joins per call, and its 2-thread median on a quiet VM was 1.57x ONNX Runtime's while its min was
 * 1.24x.  Here the loop is cut into more chunks than threads (the lambda takes the chunk as its task id
 * and the chunk count as its task count, so its range arithmetic is TVM's own), every thread claims
 * chunks from a shared counter, and the caller waits only for chunks that another thread has already
 * claimed: a worker that has not started yet gets nothing left to do, as in ONNX Runtime's pool.
 * Which iteration runs on which thread changes, nothing else: each iteration computes what it did.
 *
 * ctc.backends.tvm.build installs it after loading the library (ctc_parallel_install), unless
 * CTC_PARALLEL=tvm is set, which keeps TVM's pool.  CTC_PARALLEL_CHUNKS sets the chunks per thread
 * (default 4); CTC_PARALLEL_SPIN_US how long an idle worker spins before it sleeps (default 2000).
 * Only one launch runs at a time per library; a launch from another thread meanwhile (or from
 * inside a chunk) runs its chunks serially on its caller.  After fork() the parent's workers are not in
 * the child: its first launch starts its own.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  void *sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv *penv, void *cdata);

#define CTC_MAX_THREADS 256

#ifdef __cplusplus /* TVM links the library with g++, which compiles a .c file as C++ */
#define CTC_EXPORT extern "C"
#else
#define CTC_EXPORT
#endif

/* the job of the current generation; read by workers only through a successful claim */
static FTVMParallelLambda job_fn;
static void *job_cdata;
static int32_t job_chunks;
/* (generation << 32) | next unclaimed chunk */
static uint64_t job_state;
static int32_t job_remaining; /* chunks not yet finished */
static int32_t job_error;
static uint32_t wake_word; /* futex: bumped with every new job */
static int32_t sleepers;
static int32_t busy; /* a launch is running */
static int32_t quit;

static int n_threads = 1;       /* caller included */
static int chunks_per_thread = 4;
static long spin_ns = 2000000;
static int n_workers;           /* started */
static pid_t owner_pid;
static pthread_t workers[CTC_MAX_THREADS];
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int in_chunk;

/* statistics: launches through this pool, chunks run by the caller, chunks run by workers */
static int64_t n_launches, n_caller_chunks, n_worker_chunks;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* run every chunk of generation gen this thread can claim; returns how many it ran */
static int64_t claim_and_run(uint32_t gen, FTVMParallelLambda fn, void *cdata, int32_t chunks) {
  int64_t ran = 0;
  uint64_t s = __atomic_load_n(&job_state, __ATOMIC_ACQUIRE);
  TVMParallelGroupEnv env = {NULL, chunks};
  while ((uint32_t)(s >> 32) == gen && (int32_t)(uint32_t)s < chunks) {
    if (!__atomic_compare_exchange_n(&job_state, &s, s + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      continue;
    in_chunk = 1;
    if (fn((int)(uint32_t)s, &env, cdata) != 0) __atomic_store_n(&job_error, 1, __ATOMIC_SEQ_CST);
    in_chunk = 0;
    ++ran;
    __atomic_fetch_sub(&job_remaining, 1, __ATOMIC_ACQ_REL);
    s = __atomic_load_n(&job_state, __ATOMIC_ACQUIRE);
  }
  return ran;
}

static void *worker_main(void *arg) {
  (void)arg;
  uint32_t seen = (uint32_t)(__atomic_load_n(&job_state, __ATOMIC_SEQ_CST) >> 32);
  for (;;) {
    long t0 = now_ns();
    int spins = 0;
    uint64_t s;
    while ((uint32_t)((s = __atomic_load_n(&job_state, __ATOMIC_ACQUIRE)) >> 32) == seen) {
      if (__atomic_load_n(&quit, __ATOMIC_RELAXED)) return NULL;
      cpu_relax();
      if (++spins < 64) continue;
      spins = 0;
      if (now_ns() - t0 < spin_ns) {
        sched_yield(); /* another process waiting for this core runs first */
        continue;
      }
      /* sleep until the next job: announce, re-check, wait on the wake word */
      uint32_t w = __atomic_load_n(&wake_word, __ATOMIC_SEQ_CST);
      __atomic_fetch_add(&sleepers, 1, __ATOMIC_SEQ_CST);
      uint32_t now = (uint32_t)(__atomic_load_n(&job_state, __ATOMIC_SEQ_CST) >> 32);
      if (now == seen && !__atomic_load_n(&quit, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &wake_word, FUTEX_WAIT_PRIVATE, w, NULL, NULL, 0);
      __atomic_fetch_sub(&sleepers, 1, __ATOMIC_SEQ_CST);
      t0 = now_ns();
    }
    seen = (uint32_t)(s >> 32);
    FTVMParallelLambda fn = __atomic_load_n(&job_fn, __ATOMIC_RELAXED);
    void *cdata = __atomic_load_n(&job_cdata, __ATOMIC_RELAXED);
    int32_t chunks = __atomic_load_n(&job_chunks, __ATOMIC_RELAXED);
    int64_t ran = claim_and_run(seen, fn, cdata, chunks);
    if (ran) __atomic_fetch_add(&n_worker_chunks, ran, __ATOMIC_RELAXED);
  }
}

static void start_workers(void) {
  pthread_mutex_lock(&start_lock);
  if (owner_pid != getpid()) { /* first launch, or a forked child: the parent's workers are not here */
    n_workers = 0;
    owner_pid = getpid();
  }
  while (n_workers < n_threads - 1 && pthread_create(&workers[n_workers], NULL, worker_main, NULL) == 0) ++n_workers;
  if (n_workers < n_threads - 1) n_threads = n_workers + 1; /* no more threads to be had */
  pthread_mutex_unlock(&start_lock);
}

static int run_serial(FTVMParallelLambda fn, void *cdata, int32_t chunks) {
  TVMParallelGroupEnv env = {NULL, chunks};
  for (int32_t i = 0; i < chunks; ++i)
    if (fn(i, &env, cdata) != 0) return -1;
  return 0;
}

/* the launcher: signature of TVMBackendParallelLaunch */
CTC_EXPORT int ctc_parallel_launch(FTVMParallelLambda fn, void *cdata, int num_task) {
  (void)num_task; /* TVM's codegen passes 0: "all threads" */
  if (n_threads <= 1) return run_serial(fn, cdata, 1);
  int32_t chunks = n_threads * chunks_per_thread;
  int32_t idle = 0;
  if (in_chunk || !__atomic_compare_exchange_n(&busy, &idle, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    return run_serial(fn, cdata, chunks);
  if (owner_pid != getpid() || n_workers < n_threads - 1) start_workers();
  __atomic_store_n(&job_fn, fn, __ATOMIC_RELAXED);
  __atomic_store_n(&job_cdata, cdata, __ATOMIC_RELAXED);
  __atomic_store_n(&job_chunks, chunks, __ATOMIC_RELAXED);
  __atomic_store_n(&job_remaining, chunks, __ATOMIC_RELAXED);
  __atomic_store_n(&job_error, 0, __ATOMIC_RELAXED);
  uint32_t gen = (uint32_t)(__atomic_load_n(&job_state, __ATOMIC_RELAXED) >> 32) + 1;
  __atomic_store_n(&job_state, (uint64_t)gen << 32, __ATOMIC_SEQ_CST); /* publishes the job */
  __atomic_fetch_add(&wake_word, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0)
    syscall(SYS_futex, &wake_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  int64_t ran = claim_and_run(gen, fn, cdata, chunks);
  /* wait only for chunks that other threads claimed and are running */
  while (__atomic_load_n(&job_remaining, __ATOMIC_ACQUIRE) > 0) cpu_relax();
  __atomic_fetch_add(&n_caller_chunks, ran, __ATOMIC_RELAXED);
  __atomic_fetch_add(&n_launches, 1, __ATOMIC_RELAXED);
  int err = __atomic_load_n(&job_error, __ATOMIC_SEQ_CST);
  __atomic_store_n(&busy, 0, __ATOMIC_SEQ_CST);
  return err ? -1 : 0;
}

static long env_long(const char *name, long dflt, long lo, long hi) {
  const char *v = getenv(name);
  if (!v || !*v) return dflt;
  char *end;
  long x = strtol(v, &end, 10);
  return (*end || x < lo || x > hi) ? dflt : x;
}

/* point the library's launch pointer at this pool for `threads` threads (caller included) */
CTC_EXPORT int ctc_parallel_install(void **launch_slot, int threads) {
  if (threads < 1) threads = 1;
  if (threads > CTC_MAX_THREADS) threads = CTC_MAX_THREADS;
  n_threads = threads; /* a library loaded again with more threads starts more workers at its next launch */
  chunks_per_thread = (int)env_long("CTC_PARALLEL_CHUNKS", 4, 1, 64);
  spin_ns = env_long("CTC_PARALLEL_SPIN_US", 2000, 0, 10000000) * 1000L;
  *launch_slot = (void *)ctc_parallel_launch;
  return n_threads;
}

/* launches, chunks run by the caller, chunks run by workers, worker threads started */
CTC_EXPORT void ctc_parallel_stats(int64_t out[4]) {
  out[0] = __atomic_load_n(&n_launches, __ATOMIC_SEQ_CST);
  out[1] = __atomic_load_n(&n_caller_chunks, __ATOMIC_SEQ_CST);
  out[2] = __atomic_load_n(&n_worker_chunks, __ATOMIC_SEQ_CST);
  out[3] = owner_pid == getpid() ? n_workers : 0;
}

/* the library is being unloaded: stop this process's workers before their code goes away */
__attribute__((destructor)) static void ctc_parallel_stop(void) {
  if (owner_pid != getpid() || n_workers == 0) return;
  __atomic_store_n(&quit, 1, __ATOMIC_SEQ_CST);
  __atomic_fetch_add(&wake_word, 1, __ATOMIC_SEQ_CST);
  syscall(SYS_futex, &wake_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  for (int i = 0; i < n_workers; ++i) pthread_join(workers[i], NULL);
  n_workers = 0;
}
