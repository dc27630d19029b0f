// absl::Mutex made visible to ThreadSanitizer. Compiled only into builds with
// MUONPS_SANITIZE=thread (common/CMakeLists.txt), whose links wrap the entry
// points below with ld's --wrap.
//
// Why: Debian's abseil is not built with ThreadSanitizer, so TSan sees
// neither the acquire nor the release inside absl::Mutex, and every field
// guarded by one would be reported as a race. An instrumented abseil tells
// TSan about each lock and unlock (__tsan_mutex_* annotations); these
// wrappers do the same around the library's own Lock and Unlock, for every
// call made from muonps's objects (gRPC's and abseil's own calls are not
// wrapped: their memory accesses are invisible to TSan anyway).
//
// Waits for a Condition (Await, LockWhen and their timed forms) are done
// here rather than in abseil: abseil evaluates a waiter's condition on the
// thread that unlocks, inside the library, where no annotation can order it.
// Here the waiting thread evaluates its own condition with the lock held,
// unlocks, sleeps until another thread next unlocks that mutex (or 100 ms
// pass), and locks again. The semantics are abseil's: the condition holds
// when an untimed wait returns, a timed wait returns the condition's value
// at its deadline, and the mutex is held in the same mode on return.
//
// The names are those of Debian's libabsl 20220623 (inline namespace
// debian3): another abseil fails the static_assert below, and a renamed
// function fails the link, rather than running unwrapped.
#include <linux/futex.h>
#include <sanitizer/tsan_interface.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <ctime>
#include <string_view>
#include <vector>

#include "absl/base/config.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

#ifndef ABSL_HAVE_THREAD_SANITIZER
#error "absl_mutex_tsan.cc is only for builds with -fsanitize=thread"
#endif

#define MUONPS_STRINGIFY_INNER(x) #x
#define MUONPS_STRINGIFY(x) MUONPS_STRINGIFY_INNER(x)
static_assert(std::string_view(MUONPS_STRINGIFY(ABSL_OPTION_INLINE_NAMESPACE_NAME)) == "debian3",
              "the wrapped names below are those of Debian's abseil 20220623 (debian3)");

namespace {

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Time;

// Waiters, spread over stripes by mutex address. The counters are relaxed
// atomics and the sleep is a raw futex, so that TSan sees no ordering here:
// the only order it sees is the annotated lock and unlock.
struct Stripe {
  std::atomic<uint32_t> generation{0};  // bumped by unlocks while waiters > 0
  std::atomic<int> waiters{0};
};
Stripe g_stripes[256];

Stripe& StripeOf(const Mutex* mu) {
  const auto address = reinterpret_cast<uintptr_t>(mu);
  return g_stripes[(address >> 4) % (sizeof(g_stripes) / sizeof(g_stripes[0]))];
}

void WakeWaiters(const Mutex* mu) {
  Stripe& stripe = StripeOf(mu);
  if (stripe.waiters.load(std::memory_order_relaxed) == 0) return;
  stripe.generation.fetch_add(1, std::memory_order_relaxed);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&stripe.generation), FUTEX_WAKE_PRIVATE, INT_MAX,
          nullptr, nullptr, 0);
}

// The mutexes this thread holds in shared (reader) mode: a wait must lock
// them again in that mode.
thread_local std::vector<const Mutex*> t_reader_held;

bool HeldAsReader(const Mutex* mu) {
  return std::find(t_reader_held.begin(), t_reader_held.end(), mu) != t_reader_held.end();
}

}  // namespace

extern "C" {

// abseil's own functions (ld --wrap resolves __real_X to X).
void __real__ZN4absl7debian35Mutex4LockEv(Mutex* mu);
void __real__ZN4absl7debian35Mutex6UnlockEv(Mutex* mu);
bool __real__ZN4absl7debian35Mutex7TryLockEv(Mutex* mu);
void __real__ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu);
void __real__ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu);
bool __real__ZN4absl7debian35Mutex13ReaderTryLockEv(Mutex* mu);
void __real__ZN4absl7debian35MutexD1Ev(Mutex* mu);
void __real__ZN4absl7debian35MutexD2Ev(Mutex* mu);
void __real__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(CondVar* cv, Mutex* mu);
bool __real__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(CondVar* cv,
                                                                                 Mutex* mu,
                                                                                 Duration timeout);
bool __real__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(CondVar* cv,
                                                                              Mutex* mu,
                                                                              Time deadline);

}  // extern "C"

namespace {

// Unlocks that do not wake the waiters (WakeWaiters): for a waiter that has
// only evaluated its condition. Waking the others there would have the
// waiters wake each other in turn, and take the lock, for as long as they
// wait.
void UnlockQuietly(Mutex* mu) {
  __tsan_mutex_pre_unlock(mu, 0);
  __real__ZN4absl7debian35Mutex6UnlockEv(mu);
  __tsan_mutex_post_unlock(mu, 0);
}

void ReaderUnlockQuietly(Mutex* mu) {
  auto it = std::find(t_reader_held.begin(), t_reader_held.end(), mu);
  if (it != t_reader_held.end()) t_reader_held.erase(it);
  __tsan_mutex_pre_unlock(mu, __tsan_mutex_read_lock);
  __real__ZN4absl7debian35Mutex12ReaderUnlockEv(mu);
  __tsan_mutex_post_unlock(mu, __tsan_mutex_read_lock);
}

}  // namespace

extern "C" {

// --- Locks and unlocks: abseil's, annotated ---------------------------------

void __wrap__ZN4absl7debian35Mutex4LockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, 0);
  __real__ZN4absl7debian35Mutex4LockEv(mu);
  __tsan_mutex_post_lock(mu, 0, 0);
}

void __wrap__ZN4absl7debian35Mutex6UnlockEv(Mutex* mu) {
  UnlockQuietly(mu);
  WakeWaiters(mu);
}

bool __wrap__ZN4absl7debian35Mutex7TryLockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, __tsan_mutex_try_lock);
  const bool locked = __real__ZN4absl7debian35Mutex7TryLockEv(mu);
  __tsan_mutex_post_lock(
      mu, locked ? __tsan_mutex_try_lock : __tsan_mutex_try_lock | __tsan_mutex_try_lock_failed, 0);
  return locked;
}

void __wrap__ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, __tsan_mutex_read_lock);
  __real__ZN4absl7debian35Mutex10ReaderLockEv(mu);
  __tsan_mutex_post_lock(mu, __tsan_mutex_read_lock, 0);
  t_reader_held.push_back(mu);
}

void __wrap__ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu) {
  ReaderUnlockQuietly(mu);
  WakeWaiters(mu);
}

bool __wrap__ZN4absl7debian35Mutex13ReaderTryLockEv(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, __tsan_mutex_try_read_lock);
  const bool locked = __real__ZN4absl7debian35Mutex13ReaderTryLockEv(mu);
  __tsan_mutex_post_lock(
      mu, locked ? __tsan_mutex_try_read_lock : __tsan_mutex_try_read_lock_failed, 0);
  if (locked) t_reader_held.push_back(mu);
  return locked;
}

// The inline constructor announces the mutex to TSan (__tsan_mutex_create
// with __tsan_mutex_not_static); the destructor, compiled in the library,
// cannot.
void __wrap__ZN4absl7debian35MutexD1Ev(Mutex* mu) {
  __real__ZN4absl7debian35MutexD1Ev(mu);
  __tsan_mutex_destroy(mu, __tsan_mutex_not_static);
}

void __wrap__ZN4absl7debian35MutexD2Ev(Mutex* mu) {
  __real__ZN4absl7debian35MutexD2Ev(mu);
  __tsan_mutex_destroy(mu, __tsan_mutex_not_static);
}

}  // extern "C"

namespace {

void LockIn(Mutex* mu, bool reader) {
  if (reader) {
    __wrap__ZN4absl7debian35Mutex10ReaderLockEv(mu);
  } else {
    __wrap__ZN4absl7debian35Mutex4LockEv(mu);
  }
}

void UnlockIn(Mutex* mu, bool reader, bool wake) {
  if (reader) {
    ReaderUnlockQuietly(mu);
  } else {
    UnlockQuietly(mu);
  }
  if (wake) WakeWaiters(mu);
}

// With `mu` held (as a reader when `reader`): waits until `cond` holds or
// `deadline` passes, and returns cond's value then, with `mu` held as before.
bool WaitFor(Mutex* mu, bool reader, const Condition& cond, Time deadline) {
  Stripe& stripe = StripeOf(mu);
  // The first unlock ends the caller's own critical section, which may have
  // changed what other waiters wait for; later ones follow a mere look.
  bool wake = true;
  while (true) {
    if (cond.Eval()) return true;
    const Time now = absl::Now();
    if (now >= deadline) return false;
    stripe.waiters.fetch_add(1, std::memory_order_relaxed);
    // Read before unlocking: an unlock after ours bumps it, so the futex
    // returns at once instead of sleeping through the change.
    const uint32_t seen = stripe.generation.load(std::memory_order_relaxed);
    UnlockIn(mu, reader, wake);
    wake = false;
    const timespec nap = absl::ToTimespec(std::min(deadline - now, absl::Milliseconds(100)));
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&stripe.generation), FUTEX_WAIT_PRIVATE, seen,
            &nap, nullptr, 0);
    stripe.waiters.fetch_sub(1, std::memory_order_relaxed);
    LockIn(mu, reader);
  }
}

// CondVar waits stay abseil's; only the mutex's release and reacquisition
// inside them are told to TSan.
template <typename Fn>
bool AroundCondVarWait(Mutex* mu, Fn&& wait) {
  const bool reader = HeldAsReader(mu);
  const unsigned flags = reader ? __tsan_mutex_read_lock : 0;
  __tsan_mutex_pre_unlock(mu, flags);
  __tsan_mutex_post_unlock(mu, flags);
  // The wait unlocks inside abseil, out of WakeWaiters' sight: wake them
  // now, and they lock once it has.
  WakeWaiters(mu);
  const bool result = wait();
  __tsan_mutex_pre_lock(mu, flags);
  __tsan_mutex_post_lock(mu, flags, 0);
  return result;
}

}  // namespace

extern "C" {

// --- Waits for a condition ---------------------------------------------------

void __wrap__ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE(Mutex* mu, const Condition& cond) {
  WaitFor(mu, HeldAsReader(mu), cond, absl::InfiniteFuture());
}

bool __wrap__ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& cond, Duration timeout) {
  return WaitFor(mu, HeldAsReader(mu), cond, absl::Now() + timeout);
}

bool __wrap__ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& cond, Time deadline) {
  return WaitFor(mu, HeldAsReader(mu), cond, deadline);
}

void __wrap__ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE(Mutex* mu, const Condition& cond) {
  LockIn(mu, /*reader=*/false);
  WaitFor(mu, /*reader=*/false, cond, absl::InfiniteFuture());
}

void __wrap__ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE(Mutex* mu,
                                                                     const Condition& cond) {
  LockIn(mu, /*reader=*/true);
  WaitFor(mu, /*reader=*/true, cond, absl::InfiniteFuture());
}

bool __wrap__ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& cond, Duration timeout) {
  const Time deadline = absl::Now() + timeout;
  LockIn(mu, /*reader=*/false);
  return WaitFor(mu, /*reader=*/false, cond, deadline);
}

bool __wrap__ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& cond, Time deadline) {
  LockIn(mu, /*reader=*/false);
  return WaitFor(mu, /*reader=*/false, cond, deadline);
}

bool __wrap__ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& cond, Duration timeout) {
  const Time deadline = absl::Now() + timeout;
  LockIn(mu, /*reader=*/true);
  return WaitFor(mu, /*reader=*/true, cond, deadline);
}

bool __wrap__ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& cond, Time deadline) {
  LockIn(mu, /*reader=*/true);
  return WaitFor(mu, /*reader=*/true, cond, deadline);
}

// --- Condition variables -------------------------------------------------------

void __wrap__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(CondVar* cv, Mutex* mu) {
  AroundCondVarWait(mu, [&] {
    __real__ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(cv, mu);
    return true;
  });
}

bool __wrap__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(CondVar* cv,
                                                                                 Mutex* mu,
                                                                                 Duration timeout) {
  return AroundCondVarWait(mu, [&] {
    return __real__ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(cv, mu,
                                                                                       timeout);
  });
}

bool __wrap__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(CondVar* cv,
                                                                              Mutex* mu,
                                                                              Time deadline) {
  return AroundCondVarWait(mu, [&] {
    return __real__ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(cv, mu,
                                                                                    deadline);
  });
}

}  // extern "C"
