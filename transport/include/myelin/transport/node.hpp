// myelin/transport/node.hpp
//
// local_node_id(): the identity of "this node" as the transport and the collectives see it. Two
// processes get the same id exactly when shared memory between them works: the same running
// kernel (hostname and boot id) AND the same network namespace (the shm backend's connection
// sockets are abstract unix sockets, which do not cross network namespaces). Processes in
// different network namespaces of one kernel — the "nodes" of an emulated multi-node cluster —
// are therefore different nodes and talk over a network backend.
//
// Format: "<hostname>/<boot id>/netns:<inode of /proc/self/ns/net>". Treat it as opaque; compare
// whole ids only.
//
// Thread safety: safe to call from any thread. Never blocks beyond reading /proc. When a part
// cannot be read (no /proc), that part is replaced by a fixed marker and a warning is logged once.
#pragma once

#include <string>

namespace myelin::transport {

[[nodiscard]] std::string local_node_id();

}  // namespace myelin::transport
