// NUMA-bound allocation, huge-page fallback, pinning and the consumer placement policy.
#include <myelin/core/numa_memory.hpp>
#include <myelin/core/record_ring.hpp>
#include <myelin/core/spsc_ring.hpp>

#include <gtest/gtest.h>

#include <sched.h>

#include <thread>

namespace myelin {
namespace {

TEST(NumaMemory, AllocatesZeroedMemoryOnEveryNode) {
  ASSERT_GE(numa_node_count(), 1);
  for (int node = 0; node < numa_node_count(); ++node) {
    auto buf = allocate_numa(3 * 4096 + 5, {.numa_node = node, .huge_pages = HugePages::kNever});
    ASSERT_TRUE(buf.ok()) << buf.status();
    EXPECT_EQ(buf->size(), 3u * 4096 + 5);
    EXPECT_EQ(buf->mapped_size(), 4u * 4096);
    EXPECT_EQ(buf->numa_node(), node);
    EXPECT_EQ(buf->page_kind(), PageKind::kNormal);
    for (std::size_t i = 0; i < buf->size(); ++i) ASSERT_EQ(buf->data()[i], std::byte{0});
    auto where = numa_node_of_memory(buf->data(), buf->mapped_size());
    ASSERT_TRUE(where.ok()) << where.status();
    EXPECT_EQ(*where, node) << "pages must be resident on the node they were bound to";
  }
}

TEST(NumaMemory, RejectsBadArguments) {
  EXPECT_EQ(allocate_numa(0).status().code(), StatusCode::kInvalidArgument);
  auto bad = allocate_numa(4096, {.numa_node = numa_node_count() + 7});
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("does not exist"), std::string::npos) << bad.status();
  EXPECT_EQ(numa_node_of_cpu(-1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(numa_node_of_cpu(1 << 20).status().code(), StatusCode::kInvalidArgument);
}

// With kTry a large buffer gets huge pages from the pool if there are any, else transparent huge
// pages, else normal pages -- but always memory. kRequire fails cleanly when the pool is empty.
TEST(NumaMemory, HugePagesOrCleanFallback) {
  const std::size_t huge = huge_page_size();
  if (huge == 0) GTEST_SKIP() << "the kernel reports no huge page size";
  auto buf = allocate_numa(2 * huge, {.huge_pages = HugePages::kTry});
  ASSERT_TRUE(buf.ok()) << buf.status();
  EXPECT_GE(buf->mapped_size(), 2 * huge);
  if (free_huge_pages() >= 2) {
    EXPECT_EQ(buf->page_kind(), PageKind::kHugeTlb);
  } else {
    EXPECT_NE(buf->page_kind(), PageKind::kHugeTlb);
  }
  buf->data()[buf->size() - 1] = std::byte{1};  // the memory is usable either way

  auto small = allocate_numa(4096, {.huge_pages = HugePages::kTry});
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->page_kind(), PageKind::kNormal) << "no huge page for a 4 KiB buffer";

  auto required = allocate_numa(huge, {.huge_pages = HugePages::kRequire});
  if (free_huge_pages() == 0 && !required.ok()) {
    EXPECT_EQ(required.status().code(), StatusCode::kResourceExhausted) << required.status();
  } else if (required.ok()) {
    EXPECT_EQ(required->page_kind(), PageKind::kHugeTlb);
  }
}

TEST(NumaMemory, PinningMovesTheThread) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  std::thread t([&] {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &allowed)) continue;
      ASSERT_TRUE(pin_current_thread_to_cpu(cpu).ok()) << cpu;
      EXPECT_EQ(current_cpu(), cpu) << "a pinned thread runs on its CPU";
      auto node = current_numa_node();
      ASSERT_TRUE(node.ok()) << node.status();
      EXPECT_EQ(*node, *numa_node_of_cpu(cpu));
    }
    EXPECT_EQ(pin_current_thread_to_cpu(-3).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(pin_current_thread_to_cpu(CPU_SETSIZE - 1).code(), StatusCode::kInvalidArgument);
  });
  t.join();
}

TEST(NumaMemory, RingsLandOnTheirConsumersNode) {
  const int cpu = current_cpu();
  ASSERT_GE(cpu, 0);
  const MemoryOptions placement = placement_for_consumer(cpu);
  EXPECT_EQ(placement.numa_node, *numa_node_of_cpu(cpu));
  EXPECT_EQ(placement_for_consumer(-1).numa_node, kAnyNumaNode);

  auto ring = SpscRing<uint64_t>::create(1 << 12, {.memory = placement});
  ASSERT_TRUE(ring.ok()) << ring.status();
  auto where = numa_node_of_memory(ring->region(), SpscRing<uint64_t>::bytes_for(1 << 12));
  ASSERT_TRUE(where.ok()) << where.status();
  EXPECT_EQ(*where, placement.numa_node);

  auto records = RecordRing::create(1 << 16, {.memory = placement});
  ASSERT_TRUE(records.ok()) << records.status();
  where = numa_node_of_memory(records->region(), RecordRing::bytes_for(1 << 16));
  ASSERT_TRUE(where.ok());
  EXPECT_EQ(*where, placement.numa_node);
}

}  // namespace
}  // namespace myelin
