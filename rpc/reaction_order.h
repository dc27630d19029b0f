// The order in which gRPC runs the callbacks of one call's reactor or
// interceptor, told to ThreadSanitizer.
//
// gRPC runs a reactor's reactions (OnReadDone, OnWriteDone, OnCancel, OnDone)
// after the StartRead / StartWrite / Finish call that asked for them, often
// on another of its threads, and OnDone only after every other reaction has
// returned; it likewise creates, calls and deletes a call's interceptor one
// step at a time. That hand-off happens inside gRPC, which the TSan build
// (scripts/sanitize.sh tsan) links uninstrumented, so TSan cannot see it: the
// object's fields, written in one callback and read in the next, would be
// reported as races.
//
// Such an object holds a ReactionOrder. Its constructor and every callback
// open a ReactionOrder::Scope first thing, and call Leave() right before each
// call that hands control back to gRPC (Start*, Finish, Proceed); OnDone and
// the destructor call Enter(). TSan then sees every callback, and the
// object's deletion, happen after the calls that led to them. In builds
// without TSan all of it compiles to nothing.
#ifndef MUONPS_RPC_REACTION_ORDER_H_
#define MUONPS_RPC_REACTION_ORDER_H_

#include "absl/base/config.h"

#ifdef ABSL_HAVE_THREAD_SANITIZER
#include <sanitizer/tsan_interface.h>
#endif

namespace muonps {

class ReactionOrder {
 public:
  // Acquires every earlier Leave() of this reactor.
  void Enter() {
#ifdef ABSL_HAVE_THREAD_SANITIZER
    __tsan_acquire(this);
#endif
  }
  // Releases what this thread did so far to the reactions that follow.
  void Leave() {
#ifdef ABSL_HAVE_THREAD_SANITIZER
    __tsan_release(this);
#endif
  }

  // Enter() now and Leave() at the end of the scope: one per reaction.
  class Scope {
   public:
    explicit Scope(ReactionOrder* order) : order_(order) { order_->Enter(); }
    ~Scope() { order_->Leave(); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    ReactionOrder* order_;
  };
};

}  // namespace muonps

#endif  // MUONPS_RPC_REACTION_ORDER_H_
