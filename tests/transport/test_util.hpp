// Helpers shared by the transport tests: which backends are usable here, and a connected pair of
// Contexts driven from one thread.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <myelin/transport/context.hpp>

namespace myelin::transport::testing {

// Sets environment variables for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) {
      old_ = old;
      had_ = true;
    }
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) {
      ::setenv(name_, old_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

inline Options options_for(Backend b, const std::string& name) {
  Options o;
  o.backend = b;
  o.name = name;
  o.timeout = std::chrono::seconds(20);
  return o;
}

// Empty when the backend can be used here, else why not.
inline std::string unusable_reason(Backend b) {
  auto ctx = Context::create(options_for(b, "probe"));
  return ctx.ok() ? std::string() : ctx.status().to_string();
}

inline std::string param_name(const ::testing::TestParamInfo<Backend>& info) {
  return std::string(backend_name(info.param));
}

// Two Contexts of one backend in this process, connected both ways.
struct Pair {
  std::unique_ptr<Context> a, b;
  Endpoint* ab = nullptr;  // a's endpoint to b
  Endpoint* ba = nullptr;

  static Result<Pair> make(Backend backend, Options base = {}) {
    Pair p;
    base.backend = backend;
    base.name = "ctx-a";
    MYELIN_ASSIGN_OR_RETURN(p.a, Context::create(base));
    base.name = "ctx-b";
    MYELIN_ASSIGN_OR_RETURN(p.b, Context::create(base));
    MYELIN_ASSIGN_OR_RETURN(p.ab, p.a->connect(p.b->address()));
    MYELIN_ASSIGN_OR_RETURN(p.ba, p.b->connect(p.a->address()));
    return p;
  }
  void progress() {
    a->progress();
    b->progress();
  }
  // Progresses both sides until every request is done; the first error, or a timeout.
  Status wait(std::vector<Request> requests, int64_t timeout_ms = 20000) {
    const Deadline deadline = Deadline::after_ms(timeout_ms);
    for (;;) {
      bool all = true;
      for (const auto& r : requests) all = all && r.done();
      if (all) break;
      if (deadline.expired()) {
        size_t pending = 0;
        std::string first;
        for (const auto& r : requests) {
          if (!r.done()) {
            if (pending++ == 0) first = r.description();
          }
        }
        return timeout_error(pending, " requests still pending, first: ", first);
      }
      progress();
    }
    for (const auto& r : requests) {
      if (!r.status().ok()) return r.status();
    }
    return ok_status();
  }
  Status wait(Request r, int64_t timeout_ms = 20000) {
    std::vector<Request> v;
    v.push_back(std::move(r));
    return wait(std::move(v), timeout_ms);
  }
};

}  // namespace myelin::transport::testing
