// transport/src/verbs/verbs_pool.hpp — NUMA-local, pre-registered memory for the eager path.
//
// Every endpoint needs the same amount of registered memory: its receive ring, its send staging
// slots and its credit word. BlockPool hands out blocks of one fixed size carved from chunks that
// are mapped on the chosen NUMA node (mbind MPOL_PREFERRED), backed by huge pages where the system
// has them (MAP_HUGETLB, else transparent huge pages through madvise), and registered once per
// chunk (LOCAL_WRITE | REMOTE_WRITE: the ring and the credit word are written by the peer).
// Releasing a block returns it to a free list; chunks live as long as the pool.
//
// Thread safety: none (the Context's thread). Ownership: Block is a move-only handle that returns
// its memory on destruction; it keeps the pool (and through it the PD) alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include <myelin/core/status.hpp>

#include "verbs/verbs_device.hpp"
#include "verbs/verbs_handles.hpp"

namespace myelin::transport::internal::verbs {

class BlockPool : public std::enable_shared_from_this<BlockPool> {
 public:
  class Block {
   public:
    Block() = default;
    Block(Block&& o) noexcept { *this = std::move(o); }
    Block& operator=(Block&& o) noexcept;
    Block(const Block&) = delete;
    Block& operator=(const Block&) = delete;
    ~Block() { reset(); }
    [[nodiscard]] uint8_t* data() const noexcept { return data_; }
    [[nodiscard]] uint32_t lkey() const noexcept { return lkey_; }
    [[nodiscard]] uint32_t rkey() const noexcept { return rkey_; }
    void reset() noexcept;

   private:
    friend class BlockPool;
    std::shared_ptr<BlockPool> pool_;
    uint8_t* data_ = nullptr;
    uint32_t lkey_ = 0;
    uint32_t rkey_ = 0;
  };

  // block_size is rounded up to 4 KiB. numa_node < 0: no binding.
  static std::shared_ptr<BlockPool> create(std::shared_ptr<Device> device, size_t block_size,
                                           int numa_node);
  ~BlockPool();

  Result<Block> acquire();
  [[nodiscard]] size_t block_size() const noexcept { return block_size_; }
  // How the chunks are backed ("huge pages", "transparent huge pages", "4 KiB pages").
  [[nodiscard]] const char* backing() const noexcept { return backing_; }

 private:
  BlockPool(std::shared_ptr<Device> device, size_t block_size, int numa_node);
  Status grow();
  struct Chunk {
    void* base = nullptr;
    size_t size = 0;
    MrPtr mr;  // declared after base: deregistered before the unmap in ~BlockPool
  };
  struct Free {
    uint8_t* data;
    uint32_t lkey, rkey;
  };
  std::shared_ptr<Device> device_;
  size_t block_size_;
  int numa_node_;
  const char* backing_ = "none yet";
  std::vector<Chunk> chunks_;
  std::vector<Free> free_;
};

}  // namespace myelin::transport::internal::verbs
