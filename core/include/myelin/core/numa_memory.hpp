// myelin/core/numa_memory.hpp
//
// NUMA-aware memory: page-aligned buffers bound to a NUMA node (through hwloc, which stays a
// private dependency of myelin_core), huge pages where the system has them, and the placement
// policy rings use: a ring's memory lives on its consumer's node, because the consumer is the side
// that polls it.
//
//   auto buf = allocate_numa(1 << 20, placement_for_consumer(/*consumer_cpu=*/3));
//   if (!buf.ok()) return buf.status();
//   std::byte* p = buf->data();
//
// Huge pages, HugePages::kTry (the default): a buffer of at least one huge page first tries
// explicit huge pages (MAP_HUGETLB, from the pool in /proc/sys/vm/nr_hugepages); when the pool is
// empty it falls back to normal pages with transparent-huge-page advice (MADV_HUGEPAGE), and
// buffer.page_kind() says which one it got. kRequire turns the fallback into an error, kNever
// skips both. Smaller buffers always use normal pages.
//
// NUMA binding: the pages are bound (MPOL_BIND through hwloc) before they are first touched, then
// touched so they are resident on that node when allocate_numa() returns. kAnyNumaNode leaves
// placement to the kernel's first-touch policy.
//
// Thread safety: every function may be called from any thread. A NumaBuffer is a move-only owner
// of its mapping; its bytes are shared like any memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include <myelin/core/status.hpp>

namespace myelin {

inline constexpr int kAnyNumaNode = -1;

enum class HugePages : uint8_t {
  kNever,    // normal pages only
  kTry,      // explicit huge pages, else transparent huge pages, else normal pages
  kRequire,  // explicit huge pages or an error
};

enum class PageKind : uint8_t {
  kNormal,       // base pages (4 KiB on x86-64)
  kTransparent,  // base pages with MADV_HUGEPAGE: the kernel may back them with huge pages
  kHugeTlb,      // explicit huge pages from the hugetlb pool
};
std::string_view page_kind_name(PageKind kind) noexcept;

struct MemoryOptions {
  int numa_node = kAnyNumaNode;  // node to bind to, or kAnyNumaNode
  HugePages huge_pages = HugePages::kTry;
};

// An anonymous private mapping, zero-filled, unmapped on destruction.
class NumaBuffer {
 public:
  NumaBuffer() noexcept = default;
  NumaBuffer(NumaBuffer&& other) noexcept;
  NumaBuffer& operator=(NumaBuffer&& other) noexcept;
  NumaBuffer(const NumaBuffer&) = delete;
  NumaBuffer& operator=(const NumaBuffer&) = delete;
  ~NumaBuffer();

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  // The size asked for; the mapping may be larger (rounded up to a page).
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t mapped_size() const noexcept { return mapped_; }
  [[nodiscard]] int numa_node() const noexcept { return node_; }  // bound node or kAnyNumaNode
  [[nodiscard]] PageKind page_kind() const noexcept { return kind_; }
  [[nodiscard]] bool empty() const noexcept { return data_ == nullptr; }

 private:
  friend Result<NumaBuffer> allocate_numa(std::size_t bytes, const MemoryOptions& options);
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t mapped_ = 0;
  int node_ = kAnyNumaNode;
  PageKind kind_ = PageKind::kNormal;
};

// Allocates `bytes` (> 0) of zeroed memory per `options`. Errors: invalid_argument (zero size,
// node out of range), resource_exhausted (no memory, or no huge pages with kRequire), io_error.
Result<NumaBuffer> allocate_numa(std::size_t bytes, const MemoryOptions& options = {});

// Binds [addr, addr+len) (page-aligned addr) to `node` with MPOL_BIND; pages already touched
// are migrated. Used for shared segments as well as NumaBuffer.
Status bind_memory_to_node(void* addr, std::size_t len, int node);

// Number of NUMA nodes (1 on a machine without NUMA).
int numa_node_count() noexcept;
// The NUMA node of a logical CPU (OS index). Errors: invalid_argument for an unknown CPU.
Result<int> numa_node_of_cpu(int cpu);
// The CPU the calling thread runs on now (sched_getcpu), and its node.
int current_cpu() noexcept;
Result<int> current_numa_node();
// The node holding the (touched) pages of [addr, addr+len); not_found when they are spread over
// several nodes or none is resident.
Result<int> numa_node_of_memory(const void* addr, std::size_t len);

// Placement policy for rings: memory on the consumer's node, huge pages when the system has them.
// An unknown CPU (or a negative one) gives kAnyNumaNode.
MemoryOptions placement_for_consumer(int consumer_cpu) noexcept;

// Size of the default huge page (from /proc/meminfo), 0 when unknown; and the free pages in the
// hugetlb pool of that size.
std::size_t huge_page_size() noexcept;
std::size_t free_huge_pages() noexcept;

// Pins the calling thread to one logical CPU. Errors: invalid_argument (no such CPU, or not in
// this process's allowed set), or the errno of sched_setaffinity.
Status pin_current_thread_to_cpu(int cpu);

}  // namespace myelin
