// transport/src/ucx/ucx_backend.hpp — the UCX backend's entry point (not public API).
//
// create_ucx_backend() opens one UCP context and one UCP worker (single-threaded) for a transport
// Context: active messages carry two-sided traffic, ucp_put/get with packed rkeys carry one-sided
// traffic. Built only when MYELIN_HAVE_UCX; registry.cpp picks this header up with __has_include.
//
// UCX is configured from the environment (UCX_TLS, UCX_NET_DEVICES, ...) with these overrides:
//   - Options::device, when set, becomes UCX_NET_DEVICES;
//   - Options::eager_limit (or UCX_RNDV_THRESH when it is a plain byte count, else 8 KiB) becomes
//     the rendezvous threshold, which is what limits().eager_limit reports;
//   - UCX_POSIX_ERROR_HANDLING and UCX_SYSV_ERROR_HANDLING default to y (set in the environment,
//     unless already set, before UCX reads it): shared-memory peers can then fail cleanly;
//   - UCX_KEEPALIVE_INTERVAL, unless set in the environment, becomes a quarter of Options::timeout
//     (clamped to 100 ms .. 20 s) so a dead peer is noticed within the Context's timeout even on
//     transports without connection state (shared memory), and UCX_KEEPALIVE_NUM_EPS, unless set,
//     becomes inf (every endpoint checked each round).
// See docs/transport-ucx.md for the design, ordering guarantees and error handling.
#pragma once

#include <memory>

#include <myelin/core/status.hpp>
#include <myelin/transport/options.hpp>

#include "backend.hpp"

namespace myelin::transport::internal {

// Opens the UCX backend. Errors: unavailable when UCX finds no usable transport (for example a
// UCX_TLS naming none present), invalid_argument for options UCX rejects.
Result<std::unique_ptr<BackendContext>> create_ucx_backend(const Options& options,
                                                           const ContextInfo& info);

}  // namespace myelin::transport::internal
