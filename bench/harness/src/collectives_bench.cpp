// bench/harness/collectives_bench.cpp
#include "collectives_bench.hpp"

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
    case Collective::kAllreduce: return 2.0 * (dn - 1) / dn;
    case Collective::kReduceScatter:
    case Collective::kAllgather:
    case Collective::kAlltoall: return (dn - 1) / dn;
    default: return 1.0;
  }
}

namespace {

void put(uint8_t* p, DataType t, double v) {
  switch (t) {
    case DataType::kF32: { const float f = static_cast<float>(v); std::memcpy(p, &f, 4); break; }
    case DataType::kF64: std::memcpy(p, &v, 8); break;
    case DataType::kF16: { const uint16_t h = float_to_f16(static_cast<float>(v)); std::memcpy(p, &h, 2); break; }
    case DataType::kBF16: { const uint16_t h = float_to_bf16(static_cast<float>(v)); std::memcpy(p, &h, 2); break; }
    case DataType::kI32: { const auto i = static_cast<int32_t>(static_cast<int64_t>(v)); std::memcpy(p, &i, 4); break; }
    case DataType::kI64: { const auto i = static_cast<int64_t>(v); std::memcpy(p, &i, 8); break; }
    case DataType::kU8: *p = static_cast<uint8_t>(static_cast<uint64_t>(static_cast<int64_t>(v))); break;
  }
}

// The reduction of the values 1..n (rank r contributes r + 1).
double reduced(ReduceOp op, DataType t, int n) {
  double v = 1;
  switch (op) {
    case ReduceOp::kSum: v = n * (n + 1) / 2.0; break;
    case ReduceOp::kAvg:
      v = is_floating(t) ? static_cast<float>(n * (n + 1) / 2.0) / static_cast<float>(n)
                         : static_cast<double>((n * (n + 1) / 2) / n);
      break;
    case ReduceOp::kProd: for (int i = 2; i <= n; ++i) v *= i; break;
    case ReduceOp::kMin: v = 1; break;
    case ReduceOp::kMax: v = n; break;
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
  if (o.collective == Collective::kReduceScatter || o.collective == Collective::kAlltoall) send_elems = count * nn;
  if (o.collective == Collective::kAllgather || o.collective == Collective::kAlltoall) recv_elems = count * nn;
  b.send.assign(send_elems * es, 0);
  b.recv.assign(recv_elems * es, 0);
  for (size_t i = 0; i < send_elems; ++i) put(&b.send[i * es], o.type, rank + 1);
  std::vector<uint8_t> want(recv_elems * es, 0);
  for (size_t i = 0; i < recv_elems; ++i) {
    double v = 0;
    switch (o.collective) {
      case Collective::kAllreduce:
      case Collective::kReduceScatter: v = reduced(o.op, o.type, n); break;
      case Collective::kReduce: v = rank == 0 ? reduced(o.op, o.type, n) : 0; break;
      case Collective::kAllgather:
      case Collective::kAlltoall: v = static_cast<double>(i / count + 1); break;
      case Collective::kBroadcast: v = 1; break;
      case Collective::kBarrier: break;
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
      if (in_place) return reduce_scatter(comm, b.send.data(), b.send.data() + me * count * es, count, o.type, o.op, opts);
      return reduce_scatter(comm, b.send.data(), recv, count, o.type, o.op, opts);
    case Collective::kAllgather:
      return allgather(comm, in_place ? b.recv.data() + me * count * es : b.send.data(), recv, count, o.type, opts);
    case Collective::kBroadcast:
      return broadcast(comm, in_place ? recv : b.send.data(), recv, count, o.type, opts);
    case Collective::kReduce:
      return reduce(comm, in_place ? recv : b.send.data(), recv, count, o.type, o.op, opts);
    case Collective::kBarrier: return barrier(comm, opts);
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
  for (size_t i = 0; i < check; ++i) {
    if (std::memcmp(got + i * es, want.data() + i * es, es) != 0) ++m.wrong;
  }
  for (int i = 0; i < o.warmup; ++i) MYELIN_RETURN_IF_ERROR(run_once(comm, o, count, b, in_place).status());
  MYELIN_RETURN_IF_ERROR(barrier(comm).status());
  const int64_t t0 = monotonic_ns();
  for (int i = 0; i < o.iterations; ++i) MYELIN_RETURN_IF_ERROR(run_once(comm, o, count, b, in_place).status());
  double us = static_cast<double>(monotonic_ns() - t0) / 1e3 / o.iterations;
  // Report the slowest rank's time and the total of wrong elements.
  double wrong = static_cast<double>(m.wrong);
  MYELIN_RETURN_IF_ERROR(allreduce(comm, &us, &us, 1, DataType::kF64, ReduceOp::kMax).status());
  MYELIN_RETURN_IF_ERROR(allreduce(comm, &wrong, &wrong, 1, DataType::kF64, ReduceOp::kSum).status());
  m.time_us = us;
  m.wrong = static_cast<long>(wrong);
  return m;
}

}  // namespace

Status run_collective_bench(Communicator& comm, const CollectiveBenchOptions& o, std::ostream& out) {
  const int n = comm.size();
  const size_t es = dtype_size(o.type);
  const bool print = comm.rank() == 0;
  const std::string_view name = collective_name(o.collective);
  if (print) {
    char line[256];
    std::snprintf(line, sizeof(line), "# %s, %d ranks, transport %s\n#%11s %12s %6s %6s  %9s %8s %8s %6s  %9s %8s %8s %6s  %s\n",
                  std::string(name).c_str(), n, o.transport.c_str(), "size", "count", "type",
                  "redop", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong",
                  "algo");
    out << line << "#" << std::string(46, ' ') << "out-of-place (us, GB/s)        in-place\n";
  }
  const size_t step = o.step_factor < 2 ? 2 : o.step_factor;
  for (size_t bytes = std::max(o.min_bytes, es); bytes <= o.max_bytes; bytes *= step) {
    size_t count = bytes / es;
    if (o.collective == Collective::kReduceScatter || o.collective == Collective::kAllgather ||
        o.collective == Collective::kAlltoall) {
      count = std::max<size_t>(1, count / static_cast<size_t>(n));  // bytes = whole buffer
    }
    if (o.collective == Collective::kBarrier) count = 0;
    const size_t size = o.collective == Collective::kBarrier ? 0
                        : (o.collective == Collective::kReduceScatter ||
                           o.collective == Collective::kAllgather ||
                           o.collective == Collective::kAlltoall)
                            ? count * es * static_cast<size_t>(n)
                            : count * es;
    MYELIN_ASSIGN_OR_RETURN(Measured oop, measure(comm, o, count, false));
    MYELIN_ASSIGN_OR_RETURN(Measured ip, measure(comm, o, count, true));
    const double factor = busbw_factor(o.collective, n);
    auto algbw = [&](double us) { return us > 0 ? static_cast<double>(size) / (us * 1e3) : 0.0; };
    if (print) {
      char line[320];
      std::snprintf(line, sizeof(line),
                    "%12zu %12zu %6s %6s  %9.1f %8.3f %8.3f %6ld  %9.1f %8.3f %8.3f %6ld  %s\n", size,
                    count, std::string(dtype_name(o.type)).c_str(),
                    std::string(reduce_op_name(o.op)).c_str(), oop.time_us, algbw(oop.time_us),
                    algbw(oop.time_us) * factor, oop.wrong, ip.time_us, algbw(ip.time_us),
                    algbw(ip.time_us) * factor, ip.wrong, std::string(algorithm_name(oop.algo)).c_str());
      out << line;
      if (o.json) {
        std::snprintf(line, sizeof(line),
                      "{\"bench\":\"%s\",\"ranks\":%d,\"transport\":\"%s\",\"size\":%zu,\"dtype\":\"%s\","
                      "\"op\":\"%s\",\"algo\":\"%s\",\"time_us\":%.3f,\"algbw_GBps\":%.4f,"
                      "\"busbw_GBps\":%.4f,\"wrong\":%ld}\n",
                      std::string(name).c_str(), n, o.transport.c_str(), size,
                      std::string(dtype_name(o.type)).c_str(), std::string(reduce_op_name(o.op)).c_str(),
                      std::string(algorithm_name(oop.algo)).c_str(), oop.time_us, algbw(oop.time_us),
                      algbw(oop.time_us) * factor, oop.wrong + ip.wrong);
        out << line;
      }
      out.flush();
    }
    if (o.collective == Collective::kBarrier) break;
  }
  return ok_status();
}

}  // namespace myelin::bench
