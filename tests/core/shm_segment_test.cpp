// Shared-memory segments in one process: creation, opening, header validation, peers, stale
// cleanup, and process liveness.
#include <myelin/core/record_ring.hpp>
#include <myelin/core/shm_segment.hpp>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>

namespace myelin {
namespace {

std::string unique_name(const char* what) {
  return "myelin-test-" + std::string(what) + "-" + std::to_string(getpid());
}

TEST(ShmSegment, MemfdHasAValidHeaderAndAlignedData) {
  auto seg = ShmSegment::create_memfd("ring-test", 100'000);
  ASSERT_TRUE(seg.ok()) << seg.status();
  EXPECT_EQ(seg->data_size(), 100'000u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(seg->data()) % 4096, 0u);
  EXPECT_TRUE(seg->is_creator());
  EXPECT_EQ(seg->header()->creator_pid, getpid());
  EXPECT_TRUE(
      ShmSegment::validate(seg->header(), kSegmentDataOffset + align_up(100'000, 4096)).ok());
  // A second mapping through the fd sees the same bytes.
  auto other = ShmSegment::open_fd(seg->fd());
  ASSERT_TRUE(other.ok()) << other.status();
  seg->data()[123] = std::byte{0x5a};
  EXPECT_EQ(other->data()[123], std::byte{0x5a});
  EXPECT_FALSE(other->is_creator());
}

TEST(ShmSegment, NamedCreateOpenAndUnlinkOnClose) {
  const std::string name = unique_name("named");
  {
    auto seg = ShmSegment::create_named(name, 8192);
    ASSERT_TRUE(seg.ok()) << seg.status();
    auto again = ShmSegment::create_named(name, 8192);
    EXPECT_EQ(again.status().code(), StatusCode::kAlreadyExists) << again.status();
    auto ring = RecordRing::format(seg->data(), seg->data_size(), 4096);
    ASSERT_TRUE(ring.ok()) << ring.status();
    ASSERT_TRUE(ring->try_write("abc", 3, 5));

    auto opened = ShmSegment::open_named(name);
    ASSERT_TRUE(opened.ok()) << opened.status();
    auto attached = RecordRing::attach(opened->data(), opened->data_size());
    ASSERT_TRUE(attached.ok()) << attached.status();
    int seen = 0;
    auto n = attached->consume(
        [&](const RecordRing::Record& r) { seen += r.type == 5 && r.data.size() == 3; });
    ASSERT_TRUE(n.ok());
    EXPECT_EQ(seen, 1);
  }
  EXPECT_EQ(ShmSegment::open_named(name).status().code(), StatusCode::kNotFound)
      << "the creator unlinks its segment when it closes";
}

TEST(ShmSegment, RejectsBadNamesAndSizes) {
  EXPECT_EQ(ShmSegment::create_named("", 10).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmSegment::create_named("a/b", 10).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmSegment::create_named(unique_name("zero"), 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmSegment::create_memfd("x", 0).status().code(), StatusCode::kInvalidArgument);
}

// A foreign object under /dev/shm, and myelin segments whose header was damaged, are refused
// with an error that says what is wrong.
TEST(ShmSegment, RefusesForeignAndDamagedHeaders) {
  const std::string name = unique_name("foreign");
  const std::string path = "/" + name;
  {
    const int fd = shm_open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, 8192), 0);
    const char junk[] = "this is somebody else's shared memory";
    ASSERT_EQ(pwrite(fd, junk, sizeof(junk), 0), static_cast<ssize_t>(sizeof(junk)));
    close(fd);
  }
  auto foreign = ShmSegment::open_named(name);
  EXPECT_EQ(foreign.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(foreign.status().message().find("not a myelin shared-memory segment"),
            std::string::npos)
      << foreign.status();
  shm_unlink(path.c_str());

  {  // too small to hold the header page
    const int fd = shm_open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, 100), 0);
    close(fd);
  }
  EXPECT_EQ(ShmSegment::open_named(name).status().code(), StatusCode::kInvalidArgument);
  shm_unlink(path.c_str());

  auto seg = ShmSegment::create_memfd("damaged", 4096);
  ASSERT_TRUE(seg.ok());
  SegmentHeader* h = seg->header();
  h->version = kSegmentVersion + 1;
  auto newer = ShmSegment::open_fd(seg->fd());
  EXPECT_EQ(newer.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(newer.status().message().find("segment version"), std::string::npos) << newer.status();
  h->version = kSegmentVersion;
  h->layout_check += 1;
  EXPECT_EQ(ShmSegment::open_fd(seg->fd()).status().code(), StatusCode::kUnsupported);
  h->layout_check -= 1;
  h->total_bytes += 4096;
  EXPECT_EQ(ShmSegment::open_fd(seg->fd()).status().code(), StatusCode::kInvalidArgument);
  h->total_bytes -= 4096;
  h->ready.store(0, std::memory_order_relaxed);
  EXPECT_EQ(ShmSegment::open_fd(seg->fd()).status().code(), StatusCode::kUnavailable);
  h->ready.store(kRingReady, std::memory_order_relaxed);
  EXPECT_TRUE(ShmSegment::open_fd(seg->fd()).ok());
}

TEST(ShmSegment, PeersJoinLeaveAndAreChecked) {
  auto seg = ShmSegment::create_memfd("peers", 4096);
  ASSERT_TRUE(seg.ok());
  ASSERT_TRUE(seg->join("consumer").ok());
  EXPECT_EQ(seg->join("again").code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(seg->check_peers(), ok_status());
  {
    auto other = ShmSegment::open_fd(seg->fd());
    ASSERT_TRUE(other.ok());
    ASSERT_TRUE(other->join("producer").ok());
    EXPECT_TRUE(seg->check_peers().ok()) << "a live peer is fine";
  }  // leaves on destruction
  // A peer entry whose process is gone: forge one with a pid that cannot be alive.
  SegmentPeer& p = seg->header()->peers[kSegmentMaxPeers - 1];
  p.pid = 0x7ffffff0;
  p.start_time = 1;
  std::strcpy(p.role, "producer");
  p.state.store(2, std::memory_order_release);
  const Status s = seg->check_peers();
  EXPECT_EQ(s.code(), StatusCode::kPeerFailed);
  EXPECT_NE(s.message().find("producer pid 2147483632 is gone"), std::string::npos) << s;
}

TEST(ShmSegment, ProcessLivenessSeesExitZombiesAndPidReuse) {
  const ProcessIdentity me = current_process_identity();
  EXPECT_EQ(me.pid, getpid());
  EXPECT_GT(me.start_time, 0u);
  EXPECT_TRUE(process_is_alive(me.pid, me.start_time));
  EXPECT_FALSE(process_is_alive(me.pid, me.start_time + 1)) << "another start time: pid reused";
  EXPECT_FALSE(process_is_alive(0, 0));
  EXPECT_FALSE(process_is_alive(-1, 0));

  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(0);
  // Until reaped, the child is a zombie: it must already count as gone.
  const int64_t give_up = monotonic_ns() + 10'000'000'000;
  while (process_is_alive(child, 0) && monotonic_ns() < give_up) cpu_relax();
  EXPECT_FALSE(process_is_alive(child, 0));
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_FALSE(process_is_alive(child, 0));
}

TEST(ShmSegment, RemoveStaleUnlinksOnlyDeadSegments) {
  const std::string prefix = unique_name("stale");
  const std::string live = prefix + "-live", dead = prefix + "-dead", foreign = prefix + "-foreign";
  auto live_seg = ShmSegment::create_named(live, 4096);
  ASSERT_TRUE(live_seg.ok());
  {
    auto dead_seg = ShmSegment::create_named(dead, 4096, {.unlink_on_close = false});
    ASSERT_TRUE(dead_seg.ok());
    dead_seg->header()->creator_pid = 0x7ffffff0;  // as if its creator had crashed
  }
  const int fd = shm_open(("/" + foreign).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 8192), 0);
  close(fd);

  auto removed = ShmSegment::remove_stale(prefix);
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, 1u);
  EXPECT_EQ(ShmSegment::open_named(dead).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(ShmSegment::open_named(live).ok());
  EXPECT_EQ(ShmSegment::open_named(foreign).status().code(), StatusCode::kInvalidArgument)
      << "a foreign object is left alone";
  shm_unlink(("/" + foreign).c_str());
}

}  // namespace
}  // namespace myelin
