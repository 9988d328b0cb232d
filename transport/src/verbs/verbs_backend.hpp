// transport/src/verbs/verbs_backend.hpp — the native InfiniBand / RoCE verbs backend.
//
// RC queue pairs over libibverbs. Connection set-up in one of two modes, chosen by
// MYELIN_VERBS_CM=exchange|rdmacm (default exchange); both peers must use the same mode:
//   exchange  the Context address carries LID, GID, port MTU and the QPN of a small UD "wire-up"
//             QP. connect() creates the RC QP and sends its QPN, PSN, MTU and ring location to
//             the peer's UD QP (retransmitted until answered); each side moves its QP to RTR as
//             soon as it knows the other's, and starts sending once it knows the other is in RTR.
//             Works on InfiniBand without IPoIB.
//   rdmacm    the address carries the IP and port of an rdma_cm listener on the device's netdev;
//             connect() resolves address and route and connects; the ring location travels as
//             CM private data. When both peers connect at once the connection started by the
//             smaller backend token wins and the other is rejected.
// Device: Options::device ("rxe0", "mlx5_0:1"); GID: see verbs_device.hpp.
// Data path: see verbs_endpoint.hpp and docs/transport-verbs.md.
//
// Thread safety: none; the Context's progress thread only.
#pragma once

#include <memory>

#include <myelin/core/status.hpp>
#include <myelin/transport/options.hpp>

#include "backend.hpp"

namespace myelin::transport::internal {

Result<std::unique_ptr<BackendContext>> create_verbs_backend(const Options& options,
                                                             const ContextInfo& info);

}  // namespace myelin::transport::internal
