// Collective measurement in the nccl-tests manner.
#include <myelin/bench/collectives_bench.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include <myelin/collectives/half.hpp>
#include <myelin/core/clock.hpp>

namespace myelin::bench {

using namespace myelin::collectives;

double busbw_factor(Collective c, int n) noexcept {
  const double dn = n;
  switch (c) {
    case Collective::kAllreduce:
      return 2.0 * (dn - 1) / dn;
    case Collective::kReduceScatter:
    case Collective::kAllgather:
    case Collective::kAlltoall:
      return (dn - 1) / dn;
    default:
      return 1.0;
  }
}

namespace {

void put(uint8_t* p, DataType t, double v) {
  switch (t) {
    case DataType::kF32: {
      const float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
      break;
    }
    case DataType::kF64:
      std::memcpy(p, &v, 8);
      break;
    case DataType::kF16: {
      const uint16_t h = float_to_f16(static_cast<float>(v));
      std::memcpy(p, &h, 2);
      break;
    }
    case DataType::kBF16: {
      const uint16_t h = float_to_bf16(static_cast<float>(v));
      std::memcpy(p, &h, 2);
      break;
    }
    case DataType::kI32: {
      const auto i = static_cast<int32_t>(static_cast<int64_t>(v));
      std::memcpy(p, &i, 4);
      break;
    }
    case DataType::kI64: {
      const auto i = static_cast<int64_t>(v);
      std::memcpy(p, &i, 8);
      break;
    }
    case DataType::kU8:
      *p = static_cast<uint8_t>(static_cast<uint64_t>(static_cast<int64_t>(v)));
      break;
  }
}

// The reduction of the values 1..n (rank r contributes r + 1).
double reduced(ReduceOp op, DataType t, int n) {
  double v = 1;
  switch (op) {
    case ReduceOp::kSum:
      v = n * (n + 1) / 2.0;
      break;
    case ReduceOp::kAvg:
      v = is_floating(t) ? static_cast<float>(n * (n + 1) / 2.0) / static_cast<float>(n)
                         : static_cast<double>((n * (n + 1) / 2) / n);
      break;
    case ReduceOp::kProd:
      for (int i = 2; i <= n; ++i) v *= i;
      break;
    case ReduceOp::kMin:
      v = 1;
      break;
    case ReduceOp::kMax:
      v = n;
      break;
  }
  return v;
}

struct Buffers {
  std::vector<uint8_t> send, recv;
};

// Fills inputs and returns the expected output (of `recv`, as this rank sees it).
std::vector<uint8_t> prepare(const CollectiveBenchOptions& o, int rank, int n, size_t count,
                             Buffers& b) {
  const size_t es = dtype_size(o.type);
  const size_t nn = static_cast<size_t>(n);
  size_t send_elems = count, recv_elems = count;
  if (o.collective == Collective::kReduceScatter || o.collective == Collective::kAlltoall)
    send_elems = count * nn;
  if (o.collective == Collective::kAllgather || o.collective == Collective::kAlltoall)
    recv_elems = count * nn;
  b.send.assign(send_elems * es, 0);
  b.recv.assign(recv_elems * es, 0);
  for (size_t i = 0; i < send_elems; ++i) put(&b.send[i * es], o.type, rank + 1);
  std::vector<uint8_t> want(recv_elems * es, 0);
  for (size_t i = 0; i < recv_elems; ++i) {
    double v = 0;
    switch (o.collective) {
      case Collective::kAllreduce:
      case Collective::kReduceScatter:
        v = reduced(o.op, o.type, n);
        break;
      case Collective::kReduce:
        v = rank == 0 ? reduced(o.op, o.type, n) : 0;
        break;
      case Collective::kAllgather:
      case Collective::kAlltoall:
        v = static_cast<double>(i / count + 1);
        break;
      case Collective::kBroadcast:
        v = 1;
        break;
      case Collective::kBarrier:
        break;
    }
    put(&want[i * es], o.type, v);
  }
  return want;
}

Result<Algorithm> run_once(Communicator& comm, const CollectiveBenchOptions& o, size_t count,
                           Buffers& b, bool in_place) {
  const Options opts{.algorithm = o.algorithm};
  void* recv = b.recv.data();
  const size_t es = dtype_size(o.type);
  const size_t me = static_cast<size_t>(comm.rank());
  switch (o.collective) {
    case Collective::kAllreduce:
      return allreduce(comm, in_place ? recv : b.send.data(), recv, count, o.type, o.op, opts);
    case Collective::kReduceScatter:
      if (in_place)
        return reduce_scatter(comm, b.send.data(), b.send.data() + me * count * es, count, o.type,
                              o.op, opts);
      return reduce_scatter(comm, b.send.data(), recv, count, o.type, o.op, opts);
    case Collective::kAllgather:
      return allgather(comm, in_place ? b.recv.data() + me * count * es : b.send.data(), recv,
                       count, o.type, opts);
    case Collective::kBroadcast:
      return broadcast(comm, in_place ? recv : b.send.data(), recv, count, o.type, opts);
    case Collective::kReduce:
      return reduce(comm, in_place ? recv : b.send.data(), recv, count, o.type, o.op, opts);
    case Collective::kBarrier:
      return barrier(comm, opts);
    case Collective::kAlltoall:
      return alltoall(comm, in_place ? recv : b.send.data(), recv, count, o.type, opts);
  }
  return internal_error("unknown collective");
}

struct Measured {
  double time_us = 0;
  long wrong = 0;
  Algorithm algo = Algorithm::kAuto;
};

Result<Measured> measure(Communicator& comm, const CollectiveBenchOptions& o, size_t count,
                         bool in_place) {
  Buffers b;
  const auto want = prepare(o, comm.rank(), comm.size(), count, b);
  const size_t es = dtype_size(o.type);
  const size_t me = static_cast<size_t>(comm.rank());
  // In place, the input lives in the output buffer (where the collective expects it).
  if (in_place) {
    if (o.collective == Collective::kAllreduce || o.collective == Collective::kAlltoall ||
        o.collective == Collective::kBroadcast || o.collective == Collective::kReduce) {
      std::memcpy(b.recv.data(), b.send.data(), std::min(b.recv.size(), b.send.size()));
    } else if (o.collective == Collective::kAllgather) {
      std::memcpy(b.recv.data() + me * count * es, b.send.data(), count * es);
    }
  }
  Measured m;
  MYELIN_ASSIGN_OR_RETURN(m.algo, run_once(comm, o, count, b, in_place));
  const uint8_t* got = b.recv.data();
  size_t check = want.size() / es;
  if (o.collective == Collective::kReduceScatter && in_place) got = b.send.data() + me * count * es;
  if (o.collective == Collective::kReduce && comm.rank() != 0) check = 0;
  if (o.corrupt && !in_place && comm.rank() == 0 && check > 0) {
    b.recv[(check / 2) * es] ^= 0x5A;  // out-of-place results always land in recv
  }
  for (size_t i = 0; i < check; ++i) {
    if (std::memcmp(got + i * es, want.data() + i * es, es) != 0) ++m.wrong;
  }
  for (int i = 0; i < o.warmup; ++i)
    MYELIN_RETURN_IF_ERROR(run_once(comm, o, count, b, in_place).status());
  MYELIN_RETURN_IF_ERROR(barrier(comm).status());
  const int64_t t0 = monotonic_ns();
  for (int i = 0; i < o.iterations; ++i)
    MYELIN_RETURN_IF_ERROR(run_once(comm, o, count, b, in_place).status());
  double us = static_cast<double>(monotonic_ns() - t0) / 1e3 / o.iterations;
  // Report the slowest rank's time and the total of wrong elements.
  double wrong = static_cast<double>(m.wrong);
  MYELIN_RETURN_IF_ERROR(allreduce(comm, &us, &us, 1, DataType::kF64, ReduceOp::kMax).status());
  MYELIN_RETURN_IF_ERROR(
      allreduce(comm, &wrong, &wrong, 1, DataType::kF64, ReduceOp::kSum).status());
  m.time_us = us;
  m.wrong = static_cast<long>(wrong);
  return m;
}

}  // namespace

Result<CollectiveResult> measure_collective(Communicator& comm, const CollectiveBenchOptions& o,
                                            size_t bytes) {
  const int n = comm.size();
  const size_t es = dtype_size(o.type);
  const bool per_rank_slices = o.collective == Collective::kReduceScatter ||
                               o.collective == Collective::kAllgather ||
                               o.collective == Collective::kAlltoall;
  size_t count = std::max(bytes, es) / es;
  if (per_rank_slices) count = std::max<size_t>(1, count / static_cast<size_t>(n));
  if (o.collective == Collective::kBarrier) count = 0;
  CollectiveResult r;
  r.count = count;
  r.size = o.collective == Collective::kBarrier ? 0
           : per_rank_slices                    ? count * es * static_cast<size_t>(n)
                                                : count * es;
  MYELIN_ASSIGN_OR_RETURN(Measured oop, measure(comm, o, count, false));
  MYELIN_ASSIGN_OR_RETURN(Measured ip, measure(comm, o, count, true));
  const double factor = busbw_factor(o.collective, n);
  auto algbw = [&](double us) { return us > 0 ? static_cast<double>(r.size) / (us * 1e3) : 0.0; };
  r.algorithm = oop.algo;
  r.time_us = oop.time_us;
  r.algbw_gbps = algbw(oop.time_us);
  r.busbw_gbps = r.algbw_gbps * factor;
  r.wrong = static_cast<uint64_t>(oop.wrong);
  r.ip_time_us = ip.time_us;
  r.ip_algbw_gbps = algbw(ip.time_us);
  r.ip_busbw_gbps = r.ip_algbw_gbps * factor;
  r.ip_wrong = static_cast<uint64_t>(ip.wrong);
  return r;
}

std::vector<Column> collective_columns() {
  return {{"bench", "", 0, 0},
          {"ranks", "", 0, 0},
          {"transport", "", 0, 0},
          {"size", "size(B)", 12, 0},
          {"count", "count", 12, 0},
          {"dtype", "type", 6, 0},
          {"op", "redop", 6, 0},
          {"algo", "algo", 17, 0},
          {"time_us", "time(us)", 10, 1},
          {"algbw_GBps", "algbw", 8, 3},
          {"busbw_GBps", "busbw", 8, 3},
          {"wrong", "#wrong", 6, 0},
          {"ip_time_us", "time(us)", 10, 1},
          {"ip_algbw_GBps", "algbw", 8, 3},
          {"ip_busbw_GBps", "busbw", 8, 3},
          {"ip_wrong", "#wrong", 6, 0}};
}

std::vector<Value> collective_row(const CollectiveBenchOptions& o, int ranks,
                                  const CollectiveResult& r) {
  return {std::string(collective_name(o.collective)),
          static_cast<uint64_t>(ranks),
          o.transport,
          static_cast<uint64_t>(r.size),
          static_cast<uint64_t>(r.count),
          std::string(dtype_name(o.type)),
          std::string(reduce_op_name(o.op)),
          std::string(algorithm_name(r.algorithm)),
          r.time_us,
          r.algbw_gbps,
          r.busbw_gbps,
          r.wrong,
          r.ip_time_us,
          r.ip_algbw_gbps,
          r.ip_busbw_gbps,
          r.ip_wrong};
}

Status run_collective_bench(Communicator& comm, const CollectiveBenchOptions& o,
                            std::ostream& out) {
  const bool print = comm.rank() == 0;
  const Format format = o.json ? Format::kJson : o.csv ? Format::kCsv : Format::kTable;
  Report report(out, format, collective_columns());
  if (print) {
    report.comment(std::string(collective_name(o.collective)) + ", " + std::to_string(comm.size()) +
                   " ranks, transport " + o.transport +
                   "; columns: out-of-place, then in-place (us, GB/s)");
    report.begin();
  }
  const size_t step = o.step_factor < 2 ? 2 : o.step_factor;
  for (size_t bytes = std::max<size_t>(o.min_bytes, 1); bytes <= o.max_bytes; bytes *= step) {
    MYELIN_ASSIGN_OR_RETURN(CollectiveResult r, measure_collective(comm, o, bytes));
    if (print) report.row(collective_row(o, comm.size(), r));
    if (o.collective == Collective::kBarrier) break;
  }
  return ok_status();
}

}  // namespace myelin::bench
