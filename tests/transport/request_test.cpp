// Request handles, RequestStateRef and RequestStatePool: completion, reference counting, reuse of
// states from a pool's free list, and states that outlive their pool (ASan checks the frees).
#include <myelin/transport/request.hpp>

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace myelin::transport {
namespace {

TEST(Request, EmptyAndImmediateRequestsAreDone) {
  Request empty;
  EXPECT_TRUE(empty.done());
  EXPECT_TRUE(empty.status().ok());
  EXPECT_EQ(empty.bytes(), 0u);
  Request sent = Request::completed(42);
  EXPECT_TRUE(sent.done());
  EXPECT_EQ(sent.bytes(), 42u);
  EXPECT_EQ(sent.description(), "completed request");
  Request refused = Request::failed(invalid_argument("too big"));
  EXPECT_TRUE(refused.done());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  Request moved = std::move(refused);
  EXPECT_EQ(moved.status().code(), StatusCode::kInvalidArgument);
}

// The first outcome wins; a later success or failure changes nothing.
TEST(Request, CompletesOnceWithTheFirstOutcome) {
  auto [ok_request, ok_state] = Request::make_pending();
  EXPECT_FALSE(ok_request.done());
  ok_state->complete(ok_status(), 8);
  ok_state->complete(cancelled("teardown after the fact"), 0);
  EXPECT_TRUE(ok_request.done());
  EXPECT_TRUE(ok_request.status().ok());
  EXPECT_EQ(ok_request.bytes(), 8u);

  auto [bad_request, bad_state] = Request::make_pending();
  bad_state->complete(peer_failed("rank 1 is gone"), 0);
  bad_state->complete(ok_status(), 64);
  EXPECT_EQ(bad_request.status().code(), StatusCode::kPeerFailed);
  EXPECT_EQ(bad_request.bytes(), 0u);
}

// Copies of a handle and of the backend's reference all see one state; it lives until the last
// of them goes (here: a state without a pool, freed then; ASan reports a leak or a double free).
TEST(Request, HandlesAndReferencesShareOneCountedState) {
  auto [request, state] = Request::make_pending();
  EXPECT_EQ(state.use_count(), 2u);
  Request copy = request;
  RequestStateRef backend_copy = state;
  EXPECT_EQ(state.use_count(), 4u);
  EXPECT_TRUE(backend_copy == state);
  state->describe("recv", 3, std::make_shared<const std::string>("rank 1"));
  EXPECT_EQ(copy.description(), "recv on channel 3 with rank 1");

  Request moved = std::move(request);
  EXPECT_EQ(state.use_count(), 4u);  // a move hands the reference over
  EXPECT_TRUE(request.done());       // NOLINT(bugprone-use-after-move): moved-from is empty
  backend_copy.reset();
  EXPECT_FALSE(backend_copy);
  EXPECT_EQ(state.use_count(), 3u);

  state->complete(ok_status(), 5);
  state.reset();
  EXPECT_TRUE(copy.done());
  EXPECT_EQ(moved.bytes(), 5u);
  copy = Request::completed(9);  // assignment releases the old state
  EXPECT_EQ(copy.bytes(), 9u);
  EXPECT_EQ(moved.bytes(), 5u);
  copy = moved;
  moved = std::move(copy);
  EXPECT_EQ(moved.bytes(), 5u);
}

// A state returns to the free list only once every handle and backend reference is gone, and
// comes back pending with nothing of its past (outcome, bytes, description).
TEST(RequestStatePool, ReusesAStateOnlyWhenNobodyHoldsIt) {
  RequestStatePool pool(4);
  auto [r1, s1] = pool.make_pending();
  RequestState* first = s1.get();
  s1->describe("recv", 7, nullptr);
  s1->complete(out_of_range("recv buffer too small"), 0);
  pool.recycle(std::move(s1));
  EXPECT_EQ(pool.cached(), 0u);  // r1 still holds it
  auto [r2, s2] = pool.make_pending();
  EXPECT_NE(s2.get(), first);
  EXPECT_EQ(r1.status().code(), StatusCode::kOutOfRange);

  { Request gone = std::move(r1); }  // the last reference to the first state goes
  EXPECT_EQ(pool.cached(), 1u);
  auto [r3, s3] = pool.make_pending();
  EXPECT_EQ(s3.get(), first);
  EXPECT_EQ(pool.cached(), 0u);
  EXPECT_FALSE(r3.done());
  EXPECT_TRUE(r3.status().ok());
  EXPECT_EQ(r3.bytes(), 0u);
  EXPECT_EQ(r3.description(), "request");
  s3->complete(ok_status(), 3);
  EXPECT_EQ(r3.bytes(), 3u);

  // The backend may drop its reference first or last: either way the state comes back once.
  s2.reset();
  EXPECT_EQ(pool.cached(), 0u);
  { Request gone = std::move(r2); }
  EXPECT_EQ(pool.cached(), 1u);
}

// The most recently returned state is reused first (its cache lines are the warm ones), and at
// most `capacity` states wait on the list; the others are freed as they return.
TEST(RequestStatePool, ReusesTheNewestAndKeepsAtMostItsCapacity) {
  RequestStatePool pool(2);
  std::vector<std::pair<Request, RequestStateRef>> live;
  std::vector<RequestState*> addresses;
  for (int i = 0; i < 5; ++i) {
    live.push_back(pool.make_pending());
    addresses.push_back(live.back().second.get());
  }
  for (auto& [request, state] : live) {
    state->complete(ok_status(), 1);
    state.reset();
    request = Request();  // in order: states 0 and 1 are listed, 2 to 4 freed
  }
  EXPECT_EQ(pool.cached(), 2u);
  auto [a, sa] = pool.make_pending();
  EXPECT_EQ(sa.get(), addresses[1]);
  auto [b, sb] = pool.make_pending();
  EXPECT_EQ(sb.get(), addresses[0]);
  EXPECT_EQ(pool.cached(), 0u);

  RequestStatePool none(0);  // keeps nothing: every state is freed with its last reference
  { auto pending = none.make_pending(); }
  EXPECT_EQ(none.cached(), 0u);
}

// Handles may outlive the pool (a Request kept after its Context closed): they stay readable and
// the state is freed with the last of them; the pool's own list goes with the pool.
TEST(RequestStatePool, StatesOutliveTheirPool) {
  Request survivor;
  RequestStateRef backend_ref;
  {
    RequestStatePool pool(8);
    { auto listed = pool.make_pending(); }  // one state on the list when the pool goes
    EXPECT_EQ(pool.cached(), 1u);
    auto [request, state] = pool.make_pending();
    auto [other, other_state] = pool.make_pending();
    other_state->complete(ok_status(), 2);
    survivor = std::move(request);
    backend_ref = std::move(state);
  }
  EXPECT_FALSE(survivor.done());
  backend_ref->complete(ok_status(), 17);
  EXPECT_TRUE(survivor.done());
  EXPECT_EQ(survivor.bytes(), 17u);
  backend_ref.reset();
  survivor = Request();  // the last state of the pool goes, and with it the list's head
}

// A pool in a steady ping-pong allocates once: post, complete, drop, post again.
TEST(RequestStatePool, SteadyStateReusesOneState) {
  RequestStatePool pool;
  RequestState* seen = nullptr;
  for (int i = 0; i < 1000; ++i) {
    auto [request, state] = pool.make_pending();
    if (seen == nullptr) seen = state.get();
    ASSERT_EQ(state.get(), seen) << "iteration " << i;
    state->complete(ok_status(), static_cast<size_t>(i));
    state.reset();
    ASSERT_TRUE(request.done());
    ASSERT_EQ(request.bytes(), static_cast<size_t>(i));
  }
  EXPECT_EQ(pool.cached(), 1u);
}

}  // namespace
}  // namespace myelin::transport
