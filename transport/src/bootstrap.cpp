// Bootstrap: store specs, rank discovery from Slurm or a launcher, Slurm hostlists.
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>

#include <myelin/transport/bootstrap.hpp>

namespace myelin::transport {

std::string address_key(int rank) {
  return "myelin/addr/" + std::to_string(rank);
}

namespace {

// A store that also owns the server it talks to (rank 0 of a tcp:// spec).
class ServingStore final : public Store {
 public:
  ServingStore(std::unique_ptr<TcpStoreServer> server, std::unique_ptr<TcpStore> client)
      : server_(std::move(server)), client_(std::move(client)) {}
  ~ServingStore() override {
    client_.reset();
    server_.reset();
  }
  using Store::set;
  Status set(std::string_view key, std::span<const uint8_t> value) override {
    return client_->set(key, value);
  }
  Result<std::vector<uint8_t>> get(std::string_view key, Deadline deadline) override {
    return client_->get(key, deadline);
  }
  Result<int64_t> add(std::string_view key, int64_t delta) override {
    return client_->add(key, delta);
  }
  Result<bool> contains(std::string_view key) override { return client_->contains(key); }

 private:
  std::unique_ptr<TcpStoreServer> server_;
  std::unique_ptr<TcpStore> client_;
};

Result<long long> parse_int(std::string_view name, const char* text, long long lo, long long hi) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
    return invalid_argument(name, "='", text, "' is not an integer in [", lo, ", ", hi, "]");
  }
  return v;
}

// "2(x3),1" -> {2, 2, 2, 1}
Result<std::vector<int>> expand_tasks_per_node(std::string_view text) {
  std::vector<int> out;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    if (j == i || j - i > 6) return invalid_argument("malformed tasks-per-node '", text, "'");
    const int n = std::atoi(std::string(text.substr(i, j - i)).c_str());
    int repeat = 1;
    if (j < text.size() && text[j] == '(') {
      if (j + 2 >= text.size() || text[j + 1] != 'x') {
        return invalid_argument("malformed tasks-per-node '", text, "'");
      }
      size_t k = j + 2, m = k;
      while (m < text.size() && text[m] >= '0' && text[m] <= '9') ++m;
      if (m == k || m - k > 6 || m >= text.size() || text[m] != ')') {
        return invalid_argument("malformed tasks-per-node '", text, "'");
      }
      repeat = std::atoi(std::string(text.substr(k, m - k)).c_str());
      j = m + 1;
    }
    if (out.size() + static_cast<size_t>(repeat) > 1'000'000) {
      return invalid_argument("tasks-per-node '", text, "' is too long");
    }
    out.insert(out.end(), static_cast<size_t>(repeat), n);
    if (j < text.size()) {
      if (text[j] != ',') return invalid_argument("malformed tasks-per-node '", text, "'");
      ++j;
    }
    i = j;
  }
  if (out.empty()) return invalid_argument("empty tasks-per-node");
  return out;
}

std::string host_name() {
  char host[256] = {};
  (void)gethostname(host, sizeof(host) - 1);
  return host;
}

}  // namespace

Result<std::vector<std::string>> expand_hostlist(std::string_view list) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < list.size()) {
    // One entry: prefix [ranges] suffix, up to a comma outside brackets.
    size_t j = i;
    int depth = 0;
    while (j < list.size() && (depth > 0 || list[j] != ',')) {
      if (list[j] == '[') ++depth;
      if (list[j] == ']') --depth;
      if (depth < 0 || depth > 1) return invalid_argument("malformed hostlist '", list, "'");
      ++j;
    }
    if (depth != 0) return invalid_argument("unbalanced brackets in hostlist '", list, "'");
    std::string_view entry = list.substr(i, j - i);
    if (entry.empty()) return invalid_argument("empty entry in hostlist '", list, "'");
    const size_t open = entry.find('[');
    if (open == std::string_view::npos) {
      out.emplace_back(entry);
    } else {
      const size_t close = entry.find(']');
      const std::string_view prefix = entry.substr(0, open);
      const std::string_view suffix = entry.substr(close + 1);
      std::string_view ranges = entry.substr(open + 1, close - open - 1);
      if (ranges.empty()) return invalid_argument("empty range in hostlist '", list, "'");
      while (!ranges.empty()) {
        const size_t comma = ranges.find(',');
        const std::string_view r = ranges.substr(0, comma);
        ranges = comma == std::string_view::npos ? std::string_view() : ranges.substr(comma + 1);
        const size_t dash = r.find('-');
        const std::string_view lo_s = r.substr(0, dash);
        const std::string_view hi_s = dash == std::string_view::npos ? lo_s : r.substr(dash + 1);
        auto digits = [](std::string_view s) {
          if (s.empty() || s.size() > 9) return false;
          for (char c : s) {
            if (c < '0' || c > '9') return false;
          }
          return true;
        };
        if (!digits(lo_s) || !digits(hi_s)) {
          return invalid_argument("malformed range '", r, "' in hostlist '", list, "'");
        }
        const long lo = std::atol(std::string(lo_s).c_str());
        const long hi = std::atol(std::string(hi_s).c_str());
        if (hi < lo || hi - lo > 100000) {
          return invalid_argument("bad range '", r, "' in hostlist '", list, "'");
        }
        for (long v = lo; v <= hi; ++v) {
          std::string num = std::to_string(v);
          if (num.size() < lo_s.size()) num.insert(0, lo_s.size() - num.size(), '0');
          out.push_back(std::string(prefix) + num + std::string(suffix));
        }
      }
    }
    i = j < list.size() ? j + 1 : j;
    if (j < list.size() && i == list.size()) {
      return invalid_argument("trailing comma in hostlist '", list, "'");
    }
  }
  if (out.empty()) return invalid_argument("empty hostlist");
  return out;
}

Result<RankInfo> make_rank_info(int rank, int size, int local_rank, int local_size) {
  if (size < 1) return invalid_argument("size ", size, " must be at least 1");
  if (rank < 0 || rank >= size)
    return invalid_argument("rank ", rank, " is not in [0, ", size, ")");
  if (local_rank < 0 && local_size < 0) {
    local_rank = rank;
    local_size = size;
  }
  if (local_size < 1 || local_size > size) {
    return invalid_argument("local size ", local_size, " is not in [1, ", size, "]");
  }
  if (local_rank < 0 || local_rank >= local_size) {
    return invalid_argument("local rank ", local_rank, " is not in [0, ", local_size, ")");
  }
  RankInfo info;
  info.rank = rank;
  info.size = size;
  info.local_rank = local_rank;
  info.local_size = local_size;
  info.node_id = host_name();
  info.source = "explicit";
  return info;
}

namespace {
Result<std::string> store_spec_from(const char* text) {
  if (text == nullptr) return std::string();
  std::string_view s(text);
  if (s.starts_with("tcp://") || s.starts_with("file://")) return std::string(s);
  const size_t colon = s.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == s.size()) {
    return invalid_argument("MYELIN_STORE='", s, "' is not host:port, tcp://host:port or file://");
  }
  return "tcp://" + std::string(s);
}
}  // namespace

Result<RankInfo> discover_rank(const EnvLookup& lookup) {
  auto env = [&](const char* name) -> const char* {
    return lookup ? lookup(name) : std::getenv(name);
  };
  const char* store = env("MYELIN_STORE");
  if (const char* r = env("MYELIN_RANK")) {
    const char* s = env("MYELIN_SIZE");
    if (s == nullptr) return invalid_argument("MYELIN_RANK is set but MYELIN_SIZE is not");
    MYELIN_ASSIGN_OR_RETURN(long long size, parse_int("MYELIN_SIZE", s, 1, INT_MAX));
    MYELIN_ASSIGN_OR_RETURN(long long rank, parse_int("MYELIN_RANK", r, 0, INT_MAX));
    if (rank >= size) return invalid_argument("MYELIN_RANK=", r, " is not below MYELIN_SIZE=", s);
    long long local_rank = rank, local_size = size;
    const char* lr = env("MYELIN_LOCAL_RANK");
    const char* ls = env("MYELIN_LOCAL_SIZE");
    if (lr != nullptr) {
      MYELIN_ASSIGN_OR_RETURN(local_rank, parse_int("MYELIN_LOCAL_RANK", lr, 0, INT_MAX));
    }
    if (ls != nullptr) {
      MYELIN_ASSIGN_OR_RETURN(local_size, parse_int("MYELIN_LOCAL_SIZE", ls, 1, INT_MAX));
    }
    auto info = make_rank_info(static_cast<int>(rank), static_cast<int>(size),
                               static_cast<int>(local_rank), static_cast<int>(local_size));
    if (!info.ok()) return std::move(info).status().with_context("from MYELIN_* variables");
    info->source = "launcher";
    MYELIN_ASSIGN_OR_RETURN(info->store_spec, store_spec_from(store));
    return info;
  }
  if (const char* p = env("SLURM_PROCID")) {
    const char* n = env("SLURM_NTASKS");
    if (n == nullptr) n = env("SLURM_NPROCS");
    if (n == nullptr) return invalid_argument("SLURM_PROCID is set but SLURM_NTASKS is not");
    MYELIN_ASSIGN_OR_RETURN(long long size, parse_int("SLURM_NTASKS", n, 1, INT_MAX));
    MYELIN_ASSIGN_OR_RETURN(long long rank, parse_int("SLURM_PROCID", p, 0, INT_MAX));
    if (rank >= size) return invalid_argument("SLURM_PROCID=", p, " is not below SLURM_NTASKS=", n);
    const char* l = env("SLURM_LOCALID");
    if (l == nullptr) return invalid_argument("SLURM_PROCID is set but SLURM_LOCALID is not");
    MYELIN_ASSIGN_OR_RETURN(long long local_rank, parse_int("SLURM_LOCALID", l, 0, INT_MAX));
    long long node = 0;
    if (const char* nid = env("SLURM_NODEID")) {
      MYELIN_ASSIGN_OR_RETURN(node, parse_int("SLURM_NODEID", nid, 0, INT_MAX));
    }
    std::string node_id;
    if (const char* list = env("SLURM_JOB_NODELIST")) {
      MYELIN_ASSIGN_OR_RETURN(auto nodes, expand_hostlist(list));
      if (node >= static_cast<long long>(nodes.size())) {
        return invalid_argument("SLURM_NODEID=", node, " but SLURM_JOB_NODELIST='", list, "' has ",
                                nodes.size(), " nodes");
      }
      node_id = nodes[static_cast<size_t>(node)];
    } else if (const char* name = env("SLURMD_NODENAME")) {
      node_id = name;
    } else {
      node_id = host_name();
    }
    long long local_size = -1;
    if (const char* tpn = env("SLURM_TASKS_PER_NODE")) {
      MYELIN_ASSIGN_OR_RETURN(auto per_node, expand_tasks_per_node(tpn));
      if (node >= static_cast<long long>(per_node.size())) {
        return invalid_argument("SLURM_NODEID=", node, " but SLURM_TASKS_PER_NODE='", tpn,
                                "' lists ", per_node.size(), " nodes");
      }
      local_size = per_node[static_cast<size_t>(node)];
    } else if (const char* ntpn = env("SLURM_NTASKS_PER_NODE")) {
      MYELIN_ASSIGN_OR_RETURN(local_size, parse_int("SLURM_NTASKS_PER_NODE", ntpn, 1, INT_MAX));
    } else {
      local_size = local_rank + 1;  // a lower bound is all Slurm tells us
    }
    auto info = make_rank_info(static_cast<int>(rank), static_cast<int>(size),
                               static_cast<int>(local_rank), static_cast<int>(local_size));
    if (!info.ok()) return std::move(info).status().with_context("from SLURM_* variables");
    info->node_id = node_id;
    info->source = "slurm";
    MYELIN_ASSIGN_OR_RETURN(info->store_spec, store_spec_from(store));
    return info;
  }
  MYELIN_ASSIGN_OR_RETURN(RankInfo info, make_rank_info(0, 1));
  info.source = "single";
  MYELIN_ASSIGN_OR_RETURN(info.store_spec, store_spec_from(store));
  return info;
}

Result<std::unique_ptr<Store>> connect_store(std::string_view spec, int rank, Deadline deadline) {
  if (spec.starts_with("file://")) {
    const std::string_view path = spec.substr(7);
    if (path.empty() || path[0] != '/') {
      return invalid_argument("store spec '", spec, "': file:// needs an absolute path");
    }
    MYELIN_ASSIGN_OR_RETURN(auto fs, FileStore::open(std::string(path)));
    return std::unique_ptr<Store>(std::move(fs));
  }
  if (!spec.starts_with("tcp://")) {
    return invalid_argument("store spec '", spec, "' is neither tcp://host:port nor file:///path");
  }
  const std::string_view hp = spec.substr(6);
  const size_t colon = hp.rfind(':');
  if (colon == std::string_view::npos || colon == 0) {
    return invalid_argument("store spec '", spec, "' lacks host:port");
  }
  const std::string host(hp.substr(0, colon));
  MYELIN_ASSIGN_OR_RETURN(
      long long port, parse_int("store port", std::string(hp.substr(colon + 1)).c_str(), 1, 65535));
  if (rank < 0) return invalid_argument("connect_store: rank ", rank, " is negative");
  if (rank == 0) {
    MYELIN_ASSIGN_OR_RETURN(auto server, TcpStoreServer::start(host, static_cast<uint16_t>(port)));
    MYELIN_ASSIGN_OR_RETURN(auto client,
                            TcpStore::connect(host, static_cast<uint16_t>(port), deadline));
    return std::unique_ptr<Store>(new ServingStore(std::move(server), std::move(client)));
  }
  MYELIN_ASSIGN_OR_RETURN(auto client,
                          TcpStore::connect(host, static_cast<uint16_t>(port), deadline));
  return std::unique_ptr<Store>(std::move(client));
}

}  // namespace myelin::transport
