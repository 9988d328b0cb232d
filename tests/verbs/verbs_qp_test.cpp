// tests/verbs/verbs_qp_test.cpp — the RAII layer and QP-level faults on a real device, below the
// backend: RNR with rnr_retry = 0, and that tearing down leaves no QP, CQ, MR or PD behind
// (checked with the `rdma` tool's resource view, which lists objects per pid).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "verbs/verbs_device.hpp"
#include "verbs/verbs_handles.hpp"
#include "verbs_test_util.hpp"

namespace myelin::transport::verbs_test {
namespace {

using namespace myelin::transport::internal::verbs;

std::shared_ptr<Device> open_or_skip() {
  auto d = Device::open("", false);
  if (!d.ok()) return nullptr;
  return *d;
}

// One RC QP in the given device's PD, on its own CQ, moved to RTS towards `dest_qpn`.
struct RcQp {
  CqPtr cq;
  QpPtr qp;
};

RcQp make_qp(Device& dev) {
  RcQp q;
  q.cq.reset(ibv_create_cq(dev.context(), 16, nullptr, nullptr, 0));
  ibv_qp_init_attr a{};
  a.send_cq = a.recv_cq = q.cq.get();
  a.qp_type = IBV_QPT_RC;
  a.cap.max_send_wr = a.cap.max_recv_wr = 8;
  a.cap.max_send_sge = a.cap.max_recv_sge = 1;
  q.qp.reset(ibv_create_qp(dev.pd(), &a));
  return q;
}

int to_rts(Device& dev, ibv_qp* qp, uint32_t dest_qpn, uint8_t rnr_retry) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.port_num = dev.port().port;
  a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
  if (int rc = ibv_modify_qp(
          qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
    return rc;
  }
  a = ibv_qp_attr{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = dev.port().active_mtu;
  a.dest_qp_num = dest_qpn;
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = 1;
  a.ah_attr.port_num = dev.port().port;
  if (dev.port().is_roce()) {
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = dev.port().gid;
    a.ah_attr.grh.sgid_index = static_cast<uint8_t>(dev.port().gid_index);
    a.ah_attr.grh.hop_limit = 1;
  } else {
    a.ah_attr.dlid = dev.port().lid;
  }
  if (int rc =
          ibv_modify_qp(qp, &a,
                        IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                            IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)) {
    return rc;
  }
  a = ibv_qp_attr{};
  a.qp_state = IBV_QPS_RTS;
  a.timeout = 10;
  a.retry_cnt = 2;
  a.rnr_retry = rnr_retry;
  a.max_rd_atomic = 1;
  return ibv_modify_qp(qp, &a,
                       IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                           IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
}

bool poll_one(ibv_cq* cq, ibv_wc& wc, Deadline d) {
  while (!d.expired()) {
    const int n = ibv_poll_cq(cq, 1, &wc);
    if (n < 0) return false;
    if (n == 1) return true;
  }
  return false;
}

TEST(VerbsQp, SendWithoutReceiveAndRnrRetryZeroIsRnrRetryExceeded) {
  auto dev = open_or_skip();
  if (!dev) GTEST_SKIP() << "no verbs device with an ACTIVE port";
  RcQp a = make_qp(*dev), b = make_qp(*dev);
  ASSERT_TRUE(a.qp && b.qp);
  ASSERT_EQ(0, to_rts(*dev, a.qp.get(), b.qp->qp_num, /*rnr_retry=*/0));
  ASSERT_EQ(0, to_rts(*dev, b.qp.get(), a.qp->qp_num, 0));
  std::vector<uint8_t> buf(64, 7);
  MrPtr mr(ibv_reg_mr(dev->pd(), buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE));
  ASSERT_TRUE(mr);
  ibv_sge sge{reinterpret_cast<uintptr_t>(buf.data()), 16, mr->lkey};
  ibv_send_wr wr{};
  wr.wr_id = 1;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr second = wr;
  second.wr_id = 2;
  wr.next = &second;
  ibv_send_wr* bad = nullptr;
  ASSERT_EQ(0, ibv_post_send(a.qp.get(), &wr, &bad));
  ibv_wc wc{};
  ASSERT_TRUE(poll_one(a.cq.get(), wc, Deadline::after(std::chrono::seconds(30)))) << "hang";
  EXPECT_EQ(wc.status, IBV_WC_RNR_RETRY_EXC_ERR) << ibv_wc_status_str(wc.status);
  EXPECT_EQ(wc.wr_id, 1u);
  ASSERT_TRUE(poll_one(a.cq.get(), wc, Deadline::after(std::chrono::seconds(30)))) << "hang";
  EXPECT_EQ(wc.status, IBV_WC_WR_FLUSH_ERR) << ibv_wc_status_str(wc.status);
}

// Counts the lines of `rdma resource show <kind>` that belong to this process, or -1.
int count_own(const char* kind) {
  const std::string cmd = std::string("rdma resource show ") + kind + " 2>/dev/null";
  FILE* f = ::popen(cmd.c_str(), "r");
  if (f == nullptr) return -1;
  const std::string needle = "pid " + std::to_string(::getpid()) + " ";
  char line[1024];
  int n = 0;
  bool any = false;
  while (std::fgets(line, sizeof line, f) != nullptr) {
    any = true;
    if (std::strstr(line, needle.c_str()) != nullptr) ++n;
  }
  const int rc = ::pclose(f);
  return (rc == 0 && any) ? n : -1;
}

TEST(VerbsQp, BackendTeardownLeavesNoQpCqMrOrPd) {
  if (!open_or_skip()) GTEST_SKIP() << "no verbs device with an ACTIVE port";
  if (count_own("pd") < 0) GTEST_SKIP() << "the `rdma` tool cannot list resources here";
  const char* kinds[] = {"qp", "cq", "mr", "pd"};
  for (const char* mode : {"exchange", "rdmacm"}) {
    ::setenv("MYELIN_VERBS_CM", mode, 1);
    // librdmacm keeps one PD per device for the whole process once it is initialised: create
    // and drop one backend first so that PD is part of the baseline, not counted as ours.
    { ASSERT_TRUE(make_backend("warm-up").ok()); }
    int before[4];
    for (int i = 0; i < 4; ++i) before[i] = count_own(kinds[i]);
    {
      auto a = make_backend("A");
      auto b = make_backend("B");
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
      const Deadline d = Deadline::after(std::chrono::seconds(20));
      auto ea = (*a)->connect((*b)->local_address(), "B", d);
      auto eb = (*b)->connect((*a)->local_address(), "A", d);
      ASSERT_TRUE(ea.ok() && eb.ok());
      auto reg = register_buffer(**a, 1 << 20, 1);
      ASSERT_TRUE(reg.ok());
      std::vector<uint8_t> big(1 << 20, 1), got(1 << 20);
      Request r = (*eb)->recv(0, got.data(), got.size(), nullptr);
      Request s = (*ea)->send(0, big.data(), big.size(), nullptr);
      ASSERT_TRUE(wait_request(r, **a, b->get()).ok()) << r.status();
      ASSERT_TRUE(wait_request(s, **a, b->get()).ok()) << s.status();
      EXPECT_GT(count_own("qp"), before[0]) << "the resource view does not see our QPs";
      EXPECT_GT(count_own("mr"), before[2]);
      // Destroy in the order a careless owner might: backends before endpoints.
      a.value().reset();
      b.value().reset();
    }
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(count_own(kinds[i]), before[i]) << mode << ": leaked " << kinds[i];
    }
  }
  ::unsetenv("MYELIN_VERBS_CM");
}

}  // namespace
}  // namespace myelin::transport::verbs_test
