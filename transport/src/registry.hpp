// transport/src/registry.hpp — the factory function of every backend (not public API).
//
// Convention: each backend folder provides src/<name>/<name>_backend.hpp declaring its factory
// (the same signature as below). registry.cpp lists a backend only when that header exists
// (__has_include) and, for optional libraries, when MYELIN_HAVE_<NAME> is set, so a folder that is
// still being written never breaks the link.
#pragma once

#include <memory>

#include <myelin/config.hpp>
#include <myelin/core/status.hpp>
#include <myelin/transport/options.hpp>

#include "backend.hpp"

namespace myelin::transport::internal {

Result<std::unique_ptr<BackendContext>> create_tcp_backend(const Options& options,
                                                           const ContextInfo& info);
Result<std::unique_ptr<BackendContext>> create_shm_backend(const Options& options,
                                                           const ContextInfo& info);
#if MYELIN_HAVE_UCX
Result<std::unique_ptr<BackendContext>> create_ucx_backend(const Options& options,
                                                           const ContextInfo& info);
#endif
#if MYELIN_HAVE_VERBS
Result<std::unique_ptr<BackendContext>> create_verbs_backend(const Options& options,
                                                             const ContextInfo& info);
#endif

}  // namespace myelin::transport::internal
