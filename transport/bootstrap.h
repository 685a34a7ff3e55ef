// Bootstrap: a small Boost.Asio TCP rendezvous service (the scheduler).
// Nodes register with their role and transport address, receive their rank
// and the peer table once every expected node has registered, and can
// barrier. Messages are length-prefixed and validated: garbage, oversize or
// truncated input closes that connection with a logged reason and never
// crashes the service.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace zipwire::transport {

enum class Role : uint8_t { kWorker = 1, kServer = 2 };
const char* RoleName(Role role);

struct NodeInfo {
  uint32_t rank = 0;  // global rank: workers 0..W-1, then servers W..W+S-1
  Role role = Role::kWorker;
  uint32_t role_rank = 0;  // index within its role
  std::string address;     // transport address ("host:port")
};

struct ClusterView {
  uint32_t self_rank = 0;
  uint32_t num_workers = 0;
  uint32_t num_servers = 0;
  std::vector<NodeInfo> nodes;  // indexed by rank

  const NodeInfo& self() const { return nodes[self_rank]; }
  std::vector<NodeInfo> WithRole(Role role) const;
};

class Scheduler {
 public:
  // Listens on host:port (port 0: ephemeral) and serves one cluster of
  // num_workers + num_servers nodes on a background thread.
  static Result<std::unique_ptr<Scheduler>> Start(const std::string& host, uint16_t port,
                                                  uint32_t num_workers, uint32_t num_servers);
  virtual ~Scheduler() = default;
  virtual uint16_t port() const = 0;
  // Blocks until every node has said goodbye or disconnected, or timeout.
  virtual Status WaitForShutdown(std::chrono::milliseconds timeout) = 0;
  virtual void Stop() = 0;
};

class BootstrapClient {
 public:
  // Connects (retrying until `timeout`), registers, and waits for the peer
  // table. kUnavailable / kTimeout name the scheduler address on failure.
  // `role_rank` asks for a fixed index within the role (as BytePS's
  // DMLC_WORKER_ID); without it the scheduler picks by registration order.
  static Result<std::unique_ptr<BootstrapClient>> Join(const std::string& scheduler_address, Role role,
                                                       const std::string& transport_address,
                                                       std::chrono::milliseconds timeout,
                                                       std::optional<uint32_t> role_rank = std::nullopt);
  virtual ~BootstrapClient() = default;
  virtual const ClusterView& view() const = 0;
  // Returns when every node has entered the barrier; fails if a node died
  // (naming it) or the scheduler went away, or on timeout.
  virtual Status Barrier(std::chrono::milliseconds timeout) = 0;
  // Tells the scheduler this node is done (clean shutdown).
  virtual void Leave() = 0;
};

}  // namespace zipwire::transport
