// transport/src/verbs/verbs_pool.cpp — registered block pool for eager rings and staging.
#include "verbs/verbs_pool.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

#include <myelin/core/log.hpp>

namespace myelin::transport::internal::verbs {
namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kChunkTarget = size_t{4} << 20;  // grow by at least this much
constexpr int kMpolPreferred = 1;                 // from <linux/mempolicy.h>

size_t round_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}
}  // namespace

BlockPool::Block& BlockPool::Block::operator=(Block&& o) noexcept {
  if (this != &o) {
    reset();
    pool_ = std::move(o.pool_);
    data_ = o.data_;
    lkey_ = o.lkey_;
    rkey_ = o.rkey_;
    o.data_ = nullptr;
  }
  return *this;
}

void BlockPool::Block::reset() noexcept {
  if (pool_ && data_ != nullptr) pool_->free_.push_back({data_, lkey_, rkey_});
  pool_.reset();
  data_ = nullptr;
}

std::shared_ptr<BlockPool> BlockPool::create(std::shared_ptr<Device> device, size_t block_size,
                                             int numa_node) {
  return std::shared_ptr<BlockPool>(new BlockPool(std::move(device), block_size, numa_node));
}

BlockPool::BlockPool(std::shared_ptr<Device> device, size_t block_size, int numa_node)
    : device_(std::move(device)), block_size_(round_up(block_size, 4096)), numa_node_(numa_node) {}

BlockPool::~BlockPool() {
  for (Chunk& c : chunks_) {
    c.mr.reset();
    ::munmap(c.base, c.size);
  }
}

Status BlockPool::grow() {
  size_t size = round_up(std::max(block_size_, kChunkTarget), kHugePage);
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  const char* backing = "huge pages";
  if (base == MAP_FAILED) {
    base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return errno_status("mmap eager pool chunk", errno);
    backing = ::madvise(base, size, MADV_HUGEPAGE) == 0 ? "transparent huge pages" : "4 KiB pages";
  }
  if (numa_node_ >= 0 && numa_node_ < 64) {
    const unsigned long mask = 1ul << numa_node_;
    if (::syscall(SYS_mbind, base, size, kMpolPreferred, &mask, 64, 0) != 0) {
      MYELIN_LOG_DEBUG << "mbind to NUMA node " << numa_node_ << " failed (errno " << errno
                       << "); eager pool left unbound";
    }
  }
  Chunk c;
  c.base = base;
  c.size = size;
  c.mr.reset(
      ibv_reg_mr(device_->pd(), base, size, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE));
  if (!c.mr) {
    const int err = errno;
    ::munmap(base, size);
    return errno_status("ibv_reg_mr of a " + std::to_string(size >> 20) + " MiB eager pool chunk",
                        err, StatusCode::kResourceExhausted);
  }
  backing_ = backing;
  for (size_t off = 0; off + block_size_ <= size; off += block_size_) {
    free_.push_back({static_cast<uint8_t*>(base) + off, c.mr->lkey, c.mr->rkey});
  }
  chunks_.push_back(std::move(c));
  return ok_status();
}

Result<BlockPool::Block> BlockPool::acquire() {
  if (free_.empty()) MYELIN_RETURN_IF_ERROR(grow());
  Free f = free_.back();
  free_.pop_back();
  Block b;
  b.pool_ = shared_from_this();
  b.data_ = f.data;
  b.lkey_ = f.lkey;
  b.rkey_ = f.rkey;
  return b;
}

}  // namespace myelin::transport::internal::verbs
