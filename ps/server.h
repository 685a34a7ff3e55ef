// The server role: aggregates the chunks it owns on CPU threads. For each
// chunk and step it waits for every worker's push, forms the mean
// a = (1/n) sum decode(p_i) (+ the server's residual e_s), compresses it once
// (two-way compression) and writes the same bytes back to every worker.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "core/status.h"

namespace zipwire::ps {

struct ServerOptions {
  std::string scheduler = "127.0.0.1:9000";  // ZIPWIRE_SCHEDULER
  std::string transport = "tcp";             // ZIPWIRE_TRANSPORT
  std::string host = "127.0.0.1";
  size_t threads = 2;  // ZIPWIRE_SERVER_THREADS
  uint64_t seed = 0;
  std::chrono::milliseconds timeout{30000};
  std::optional<uint32_t> server_id;  // ZIPWIRE_SERVER_ID: fixed index among servers; else registration order
};

class Server {
 public:
  static Result<std::unique_ptr<Server>> Create(ServerOptions options);
  virtual ~Server() = default;
  // Serves until every worker has said goodbye (OK) or a worker failed
  // (an error naming it).
  virtual Status Run() = 0;
  virtual void Stop() = 0;
};

// Runs a server in this process until done (for the launcher's child).
Status RunServer(const ServerOptions& options);

}  // namespace zipwire::ps
