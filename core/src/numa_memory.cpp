// NUMA-bound buffers, huge pages and pinning. hwloc is used for binding and node lookups only;
// its topology is loaded once per process and kept for the process's lifetime.
#include <myelin/core/numa_memory.hpp>

#include <hwloc.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include <myelin/core/cache_line.hpp>

namespace myelin {
namespace {

// The process-wide topology. Loading takes milliseconds, so it is done once; hwloc's read-only
// queries on a loaded topology are thread-safe, and binding calls do not modify it.
hwloc_topology_t topology() {
  static hwloc_topology_t topo = [] {
    hwloc_topology_t t = nullptr;
    if (hwloc_topology_init(&t) != 0) return static_cast<hwloc_topology_t>(nullptr);
    if (hwloc_topology_load(t) != 0) {
      hwloc_topology_destroy(t);
      return static_cast<hwloc_topology_t>(nullptr);
    }
    return t;
  }();
  return topo;
}

std::size_t base_page_size() noexcept {
  static const std::size_t size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// Reads "<key>: <number>" from /proc/meminfo; 0 when absent.
std::size_t meminfo_value(const char* key) noexcept {
  FILE* f = std::fopen("/proc/meminfo", "re");
  if (f == nullptr) return 0;
  char line[256];
  std::size_t value = 0;
  const std::size_t key_len = std::strlen(key);
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, key, key_len) == 0 && line[key_len] == ':') {
      unsigned long long v = 0;
      if (std::sscanf(line + key_len + 1, "%llu", &v) == 1) value = static_cast<std::size_t>(v);
      break;
    }
  }
  std::fclose(f);
  return value;
}

struct HwlocBitmap {
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  HwlocBitmap() = default;
  HwlocBitmap(const HwlocBitmap&) = delete;
  HwlocBitmap& operator=(const HwlocBitmap&) = delete;
  ~HwlocBitmap() { hwloc_bitmap_free(set); }
};

}  // namespace

std::string_view page_kind_name(PageKind kind) noexcept {
  switch (kind) {
    case PageKind::kNormal:
      return "normal";
    case PageKind::kTransparent:
      return "transparent-huge";
    case PageKind::kHugeTlb:
      return "hugetlb";
  }
  return "unknown";
}

NumaBuffer::NumaBuffer(NumaBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)),
      node_(other.node_),
      kind_(other.kind_) {}

NumaBuffer& NumaBuffer::operator=(NumaBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) munmap(data_, mapped_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
    node_ = other.node_;
    kind_ = other.kind_;
  }
  return *this;
}

NumaBuffer::~NumaBuffer() {
  if (data_ != nullptr) munmap(data_, mapped_);
}

std::size_t huge_page_size() noexcept {
  return meminfo_value("Hugepagesize") * 1024;
}
std::size_t free_huge_pages() noexcept {
  return meminfo_value("HugePages_Free");
}

int numa_node_count() noexcept {
  hwloc_topology_t topo = topology();
  if (topo == nullptr) return 1;
  const int n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  return n > 0 ? n : 1;
}

Status bind_memory_to_node(void* addr, std::size_t len, int node) {
  hwloc_topology_t topo = topology();
  if (topo == nullptr) return internal_error("hwloc topology could not be loaded");
  hwloc_obj_t obj = hwloc_get_numanode_obj_by_os_index(topo, static_cast<unsigned>(node));
  if (node < 0 || obj == nullptr) {
    return invalid_argument("NUMA node ", node, " does not exist (", numa_node_count(),
                            " node(s))");
  }
  // MIGRATE moves pages that were touched before the binding; STRICT fails instead of silently
  // leaving them elsewhere.
  const int flags = HWLOC_MEMBIND_BYNODESET | HWLOC_MEMBIND_MIGRATE | HWLOC_MEMBIND_STRICT;
  if (hwloc_set_area_membind(topo, addr, len, obj->nodeset, HWLOC_MEMBIND_BIND, flags) != 0) {
    return errno_status("binding memory to NUMA node " + std::to_string(node), errno);
  }
  return ok_status();
}

Result<NumaBuffer> allocate_numa(std::size_t bytes, const MemoryOptions& options) {
  if (bytes == 0) return invalid_argument("allocate_numa: zero bytes");
  NumaBuffer buf;
  buf.size_ = bytes;
  const std::size_t huge = huge_page_size();
  const bool want_huge = options.huge_pages != HugePages::kNever && huge != 0 && bytes >= huge;
  void* p = MAP_FAILED;
  if (want_huge || options.huge_pages == HugePages::kRequire) {
    if (huge == 0) return unsupported("huge pages required but the system reports none");
    const std::size_t len = align_up(bytes, huge);
    p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1,
             0);
    if (p != MAP_FAILED) {
      buf.mapped_ = len;
      buf.kind_ = PageKind::kHugeTlb;
    } else if (options.huge_pages == HugePages::kRequire) {
      return errno_status("mmap of " + std::to_string(len) + " bytes of huge pages (" +
                              std::to_string(free_huge_pages()) + " free in the pool)",
                          errno, StatusCode::kResourceExhausted);
    }
  }
  if (p == MAP_FAILED) {
    const std::size_t len = align_up(bytes, base_page_size());
    p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return errno_status("mmap of " + std::to_string(len) + " bytes", errno,
                          StatusCode::kResourceExhausted);
    }
    buf.mapped_ = len;
    buf.kind_ = PageKind::kNormal;
    if (want_huge && madvise(p, len, MADV_HUGEPAGE) == 0) buf.kind_ = PageKind::kTransparent;
  }
  buf.data_ = static_cast<std::byte*>(p);

  if (options.numa_node != kAnyNumaNode) {
    MYELIN_RETURN_IF_ERROR(bind_memory_to_node(p, buf.mapped_, options.numa_node));
    buf.node_ = options.numa_node;
  }
  // First touch after binding, so every page is resident on the chosen node now rather than on
  // whichever thread happens to write it first on the data path.
  std::memset(p, 0, buf.mapped_);
  return buf;
}

Result<int> numa_node_of_cpu(int cpu) {
  hwloc_topology_t topo = topology();
  if (topo == nullptr) return internal_error("hwloc topology could not be loaded");
  hwloc_obj_t pu =
      cpu < 0 ? nullptr : hwloc_get_pu_obj_by_os_index(topo, static_cast<unsigned>(cpu));
  if (pu == nullptr) return invalid_argument("CPU ", cpu, " does not exist");
  const int node = hwloc_bitmap_first(pu->nodeset);
  if (node < 0) return not_found("CPU ", cpu, " has no NUMA node");
  return node;
}

int current_cpu() noexcept {
  return sched_getcpu();
}

Result<int> current_numa_node() {
  const int cpu = current_cpu();
  if (cpu < 0) return errno_status("sched_getcpu", errno);
  return numa_node_of_cpu(cpu);
}

Result<int> numa_node_of_memory(const void* addr, std::size_t len) {
  hwloc_topology_t topo = topology();
  if (topo == nullptr) return internal_error("hwloc topology could not be loaded");
  HwlocBitmap nodes;
  if (hwloc_get_area_memlocation(topo, addr, len, nodes.set, HWLOC_MEMBIND_BYNODESET) != 0) {
    return errno_status("hwloc_get_area_memlocation", errno);
  }
  if (hwloc_bitmap_weight(nodes.set) != 1) {
    return not_found("memory is on ", hwloc_bitmap_weight(nodes.set), " nodes, not one");
  }
  return hwloc_bitmap_first(nodes.set);
}

MemoryOptions placement_for_consumer(int consumer_cpu) noexcept {
  MemoryOptions options;
  if (consumer_cpu >= 0) {
    auto node = numa_node_of_cpu(consumer_cpu);
    if (node.ok()) options.numa_node = *node;
  }
  return options;
}

Status pin_current_thread_to_cpu(int cpu) {
  if (cpu < 0 || cpu >= CPU_SETSIZE) return invalid_argument("CPU ", cpu, " is out of range");
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  const int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  if (rc == EINVAL) {
    return invalid_argument("CPU ", cpu, " is offline or not in this process's allowed set");
  }
  if (rc != 0) return errno_status("pinning to CPU " + std::to_string(cpu), rc);
  return ok_status();
}

}  // namespace myelin
