// The list of backends compiled into this build (see registry.hpp for the folder convention).
#include "registry.hpp"

#if __has_include("shm/shm_backend.hpp")
#include "shm/shm_backend.hpp"
#define MYELIN_REGISTRY_SHM 1
#else
#define MYELIN_REGISTRY_SHM 0
#endif
#if MYELIN_HAVE_UCX && __has_include("ucx/ucx_backend.hpp")
#include "ucx/ucx_backend.hpp"
#define MYELIN_REGISTRY_UCX 1
#else
#define MYELIN_REGISTRY_UCX 0
#endif
#if MYELIN_HAVE_VERBS && __has_include("verbs/verbs_backend.hpp")
#include "verbs/verbs_backend.hpp"
#define MYELIN_REGISTRY_VERBS 1
#else
#define MYELIN_REGISTRY_VERBS 0
#endif

namespace myelin::transport::internal {

namespace {
// Preference order for peers on other nodes, then shm (chosen only for same-node peers).
constexpr BackendFactory kFactories[] = {
#if MYELIN_REGISTRY_VERBS
    {Backend::kVerbs, &create_verbs_backend},
#endif
#if MYELIN_REGISTRY_UCX
    {Backend::kUcx, &create_ucx_backend},
#endif
    {Backend::kTcp, &create_tcp_backend},
#if MYELIN_REGISTRY_SHM
    {Backend::kShm, &create_shm_backend},
#endif
};
}  // namespace

std::span<const BackendFactory> compiled_backends() noexcept {
  return kFactories;
}

}  // namespace myelin::transport::internal
