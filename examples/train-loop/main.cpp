// A minimal data-parallel training loop on myelin's public API. Start it with a launcher that
// sets the bootstrap environment (myelin-run -n 2 ./train_loop) or under srun.
//
//  1. who am I: rank and size from Slurm or the launcher, and the bootstrap store;
//  2. a transport Context and a Communicator over it;
//  3. a registered gradient buffer (registered once, reused every step);
//  4. allreduce of the gradients every step;
//  5. a control message on a broker topic (rank 0 hosts an embedded broker);
//  6. push/pull through the broker's parameter server.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <myelin/broker/client.hpp>
#include <myelin/broker/server.hpp>
#include <myelin/collectives/collectives.hpp>
#include <myelin/collectives/communicator.hpp>
#include <myelin/transport/bootstrap.hpp>
#include <myelin/transport/context.hpp>

using namespace myelin;

static Status run() {
  // 1. Rank, size and store come from the environment (myelin-run or Slurm).
  MYELIN_ASSIGN_OR_RETURN(transport::RankInfo me, transport::discover_rank());
  MYELIN_ASSIGN_OR_RETURN(auto store, transport::connect_store(me.store_spec, me.rank));

  // 2. One Context per progress thread; auto picks shm on this node, the network elsewhere.
  transport::Options options{.backend = transport::Backend::kAuto};
  MYELIN_ASSIGN_OR_RETURN(options, options.with_env_overlay());
  MYELIN_ASSIGN_OR_RETURN(auto ctx, transport::Context::create(options));
  MYELIN_ASSIGN_OR_RETURN(
      auto comm,
      collectives::Communicator::create(
          {.rank = me.rank, .size = me.size, .context = ctx.get(), .store = store.get()}));

  // 3. The gradient buffer, registered once.
  std::vector<float> grad(1 << 16);
  MYELIN_ASSIGN_OR_RETURN(transport::MemoryRegion region,
                          ctx->register_memory(grad.data(), grad.size() * sizeof(float)));
  (void)region;

  // 4. Each rank contributes rank+1 per element; after the allreduce every element is the sum.
  for (int step = 0; step < 3; ++step) {
    for (float& g : grad) g = static_cast<float>(me.rank + 1);
    MYELIN_ASSIGN_OR_RETURN(
        collectives::Algorithm algo,
        collectives::allreduce(*comm, grad.data(), grad.data(), grad.size(),
                               collectives::DataType::kF32, collectives::ReduceOp::kSum));
    const float expected = static_cast<float>(me.size * (me.size + 1) / 2);
    if (grad[0] != expected || grad.back() != expected) {
      return internal_error("allreduce gave ", grad[0], ", expected ", expected);
    }
    if (me.rank == 0) {
      std::printf("step %d: allreduce (%s) of %zu floats ok\n", step,
                  std::string(collectives::algorithm_name(algo)).c_str(), grad.size());
    }
  }

  // 5. Rank 0 embeds a broker with a parameter-server shard; everyone connects to it.
  const std::string secret = "example-job-secret-0123456789";
  std::unique_ptr<broker::Server> server;
  if (me.rank == 0) {
    broker::ServerOptions so;
    so.listen = "127.0.0.1:0";
    so.metrics_listen = "";
    so.secret = secret;
    so.enable_ps = true;
    so.ps.num_workers = static_cast<uint32_t>(me.size);
    so.ps.aggregation = broker::Aggregation::kMean;
    so.ps.optimizer = std::make_shared<broker::SgdOptimizer>(0.1f);
    MYELIN_ASSIGN_OR_RETURN(server, broker::Server::create(std::move(so)));
    MYELIN_RETURN_IF_ERROR(server->start());
    MYELIN_RETURN_IF_ERROR(
        store->set("example/broker", "127.0.0.1:" + std::to_string(server->port())));
  }
  MYELIN_ASSIGN_OR_RETURN(auto address, store->get("example/broker", Deadline::after_ms(10000)));
  broker::ClientOptions co;
  co.address.assign(address.begin(), address.end());
  co.identity = "rank" + std::to_string(me.rank);
  co.secret = secret;
  co.ps_worker = static_cast<uint32_t>(me.rank);
  MYELIN_ASSIGN_OR_RETURN(auto client, broker::Client::connect(co));
  MYELIN_RETURN_IF_ERROR(client->subscribe("ctrl/#").status());
  MYELIN_RETURN_IF_ERROR(collectives::barrier(*comm).status());  // everyone subscribed
  if (me.rank == 0) {
    MYELIN_RETURN_IF_ERROR(client->publish("ctrl/lr", std::string_view("0.05"),
                                           {.lane = broker::Lane::kControl, .batch = false}));
  }
  MYELIN_ASSIGN_OR_RETURN(broker::ReceivedMessage m, client->poll(Deadline::after_ms(10000)));
  std::printf("rank %d: control message on %s: %s\n", me.rank, m.topic.c_str(),
              std::string(m.text()).c_str());

  // 6. Parameter server: push a gradient of ones for step 0, pull version 1 (params -= 0.1 * 1).
  std::vector<float> params(8, 1.0f);
  if (me.rank == 0) MYELIN_RETURN_IF_ERROR(client->ps_init("layer0", params));
  MYELIN_RETURN_IF_ERROR(collectives::barrier(*comm).status());  // the key exists
  const std::vector<float> ones(8, 1.0f);
  MYELIN_RETURN_IF_ERROR(client->ps_push("layer0", ones, /*step=*/0));
  MYELIN_ASSIGN_OR_RETURN(uint64_t version, client->ps_pull("layer0", 1, params));
  if (params[0] < 0.899f || params[0] > 0.901f) {
    return internal_error("parameter server gave ", params[0], ", expected 0.9");
  }
  std::printf("rank %d: pulled version %llu, params[0] = %.3f\n", me.rank,
              static_cast<unsigned long long>(version), static_cast<double>(params[0]));
  MYELIN_RETURN_IF_ERROR(collectives::barrier(*comm).status());  // rank 0's broker outlives all
  return ok_status();
}

int main() {
  const Status s = run();
  if (!s.ok()) {
    std::fprintf(stderr, "train_loop: %s\n", s.to_string().c_str());
    return 1;
  }
  return 0;
}
