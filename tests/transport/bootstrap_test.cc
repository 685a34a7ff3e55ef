// Bootstrap scheduler and client: cluster formation, barriers, dead peers, and
// hostile input from raw sockets. Every wait is bounded; nothing asserts on
// timing.
#include "transport/bootstrap.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "transport/bootstrap_wire.h"

namespace zipwire::transport {
namespace {

namespace wire = bootstrap_wire;
using std::chrono::milliseconds;

constexpr milliseconds kJoinTimeout{10000};

std::unique_ptr<Scheduler> StartScheduler(uint32_t workers, uint32_t servers) {
  auto sched = Scheduler::Start("127.0.0.1", 0, workers, servers);
  EXPECT_TRUE(sched.ok()) << sched.status().ToString();
  return sched.ok() ? std::move(sched).value() : nullptr;
}

std::string SchedAddr(const Scheduler& s) { return "127.0.0.1:" + std::to_string(s.port()); }

std::future<Result<std::unique_ptr<BootstrapClient>>> AsyncJoin(const std::string& sched, Role role,
                                                                const std::string& addr) {
  return std::async(std::launch::async,
                    [=] { return BootstrapClient::Join(sched, role, addr, kJoinTimeout); });
}

// A plain blocking socket for speaking (or not speaking) the protocol by hand.
class RawConn {
 public:
  explicit RawConn(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0;
  }
  ~RawConn() { Close(); }
  bool connected() const { return connected_; }

  bool Send(const std::vector<uint8_t>& bytes) {
    size_t off = 0;
    while (off < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  void ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // Reads until the peer closes (true) or `timeout` passes (false). Whatever
  // arrived is appended to *got.
  bool WaitClosed(milliseconds timeout, std::vector<uint8_t>* got = nullptr) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      int r = ::poll(&p, 1, static_cast<int>(left.count()));
      if (r <= 0) continue;
      uint8_t buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return true;  // EOF or reset
      if (got != nullptr) got->insert(got->end(), buf, buf + n);
    }
  }

  // Reads one whole frame, bounded by `timeout`.
  bool ReadFrame(milliseconds timeout, uint8_t* type, std::vector<uint8_t>* payload) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      std::span<const uint8_t> view;
      std::string error;
      auto st = splitter_.Next(type, &view, &error);
      if (st == wire::FrameSplitter::State::kFrame) {
        payload->assign(view.begin(), view.end());
        return true;
      }
      if (st == wire::FrameSplitter::State::kError) return false;
      auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      uint8_t buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return false;
      splitter_.Append(buf, static_cast<size_t>(n));
    }
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  wire::FrameSplitter splitter_;
};

std::vector<uint8_t> Concat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Forms a 1-worker, 1-server cluster, barriers and leaves: proof the
// scheduler still serves after whatever a test threw at it.
void ExpectServesCluster(Scheduler& sched) {
  auto w = AsyncJoin(SchedAddr(sched), Role::kWorker, "127.0.0.1:7100");
  auto s = AsyncJoin(SchedAddr(sched), Role::kServer, "127.0.0.1:7200");
  auto worker = w.get();
  auto server = s.get();
  ASSERT_TRUE(worker.ok()) << worker.status().ToString();
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  EXPECT_EQ((*worker)->view().self_rank, 0u);
  EXPECT_EQ((*server)->view().self_rank, 1u);
  auto b = std::async(std::launch::async, [&] { return (*worker)->Barrier(kJoinTimeout); });
  Status sb = (*server)->Barrier(kJoinTimeout);
  Status wb = b.get();
  EXPECT_TRUE(sb.ok()) << sb.ToString();
  EXPECT_TRUE(wb.ok()) << wb.ToString();
  (*worker)->Leave();
  (*server)->Leave();
  EXPECT_TRUE(sched.WaitForShutdown(kJoinTimeout).ok());
}

TEST(BootstrapTest, TwoWorkersOneServerGetConsistentTables) {
  auto sched = StartScheduler(2, 1);
  ASSERT_NE(sched, nullptr);
  const std::string addr = SchedAddr(*sched);
  const std::vector<std::pair<Role, std::string>> nodes = {
      {Role::kWorker, "127.0.0.1:7001"}, {Role::kServer, "10.0.0.9:7003"}, {Role::kWorker, "[::1]:7002"}};
  std::vector<std::future<Result<std::unique_ptr<BootstrapClient>>>> futures;
  for (const auto& [role, a] : nodes) futures.push_back(AsyncJoin(addr, role, a));
  std::vector<std::unique_ptr<BootstrapClient>> clients;
  for (auto& f : futures) {
    auto r = f.get();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    clients.push_back(std::move(r).value());
  }
  const ClusterView& first = clients[0]->view();
  ASSERT_EQ(first.nodes.size(), 3u);
  EXPECT_EQ(first.num_workers, 2u);
  EXPECT_EQ(first.num_servers, 1u);
  std::vector<bool> seen(3, false);
  for (size_t i = 0; i < clients.size(); ++i) {
    const ClusterView& v = clients[i]->view();
    ASSERT_EQ(v.nodes.size(), 3u);
    for (size_t r = 0; r < 3; ++r) {  // identical tables everywhere
      EXPECT_EQ(v.nodes[r].rank, r);
      EXPECT_EQ(v.nodes[r].role, first.nodes[r].role);
      EXPECT_EQ(v.nodes[r].role_rank, first.nodes[r].role_rank);
      EXPECT_EQ(v.nodes[r].address, first.nodes[r].address);
    }
    // Each node finds itself at its rank with what it registered.
    EXPECT_EQ(v.self().role, nodes[i].first);
    EXPECT_EQ(v.self().address, nodes[i].second);
    ASSERT_LT(v.self_rank, 3u);
    EXPECT_FALSE(seen[v.self_rank]);
    seen[v.self_rank] = true;
  }
  // Workers first, then servers, role ranks within each role.
  EXPECT_EQ(first.nodes[0].role, Role::kWorker);
  EXPECT_EQ(first.nodes[1].role, Role::kWorker);
  EXPECT_EQ(first.nodes[2].role, Role::kServer);
  EXPECT_EQ(first.nodes[0].role_rank, 0u);
  EXPECT_EQ(first.nodes[1].role_rank, 1u);
  EXPECT_EQ(first.nodes[2].role_rank, 0u);
  EXPECT_EQ(first.nodes[2].address, "10.0.0.9:7003");
  EXPECT_EQ(clients[1]->view().self_rank, 2u);

  auto workers = first.WithRole(Role::kWorker);
  auto servers = first.WithRole(Role::kServer);
  ASSERT_EQ(workers.size(), 2u);
  ASSERT_EQ(servers.size(), 1u);
  EXPECT_EQ(servers[0].rank, 2u);
  EXPECT_STREQ(RoleName(Role::kWorker), "worker");
  EXPECT_STREQ(RoleName(Role::kServer), "server");

  // Not every node has left yet.
  EXPECT_EQ(sched->WaitForShutdown(milliseconds(50)).code(), StatusCode::kTimeout);
  clients.clear();  // destructors leave cleanly
  EXPECT_TRUE(sched->WaitForShutdown(kJoinTimeout).ok());
}

TEST(BootstrapTest, BarrierWithAllNodes) {
  auto sched = StartScheduler(2, 2);
  ASSERT_NE(sched, nullptr);
  std::vector<std::future<Result<std::unique_ptr<BootstrapClient>>>> futures;
  for (int i = 0; i < 4; ++i) {
    futures.push_back(AsyncJoin(SchedAddr(*sched), i < 2 ? Role::kWorker : Role::kServer,
                                "127.0.0.1:" + std::to_string(7000 + i)));
  }
  std::vector<std::unique_ptr<BootstrapClient>> clients;
  for (auto& f : futures) {
    auto r = f.get();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    clients.push_back(std::move(r).value());
  }
  std::vector<std::thread> threads;
  std::vector<Status> results(4 * 5);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int round = 0; round < 5; ++round) results[i * 5 + round] = clients[i]->Barrier(kJoinTimeout);
    });
  }
  for (auto& t : threads) t.join();
  for (const Status& st : results) EXPECT_TRUE(st.ok()) << st.ToString();
  for (auto& c : clients) c->Leave();
  EXPECT_EQ(clients[0]->Barrier(kJoinTimeout).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(sched->WaitForShutdown(kJoinTimeout).ok());
}

// Registers a node by hand and reads its ASSIGN, so that the test can then
// kill it without a LEAVE.
std::unique_ptr<RawConn> RawNode(uint16_t port, Role role, const std::string& address) {
  auto conn = std::make_unique<RawConn>(port);
  EXPECT_TRUE(conn->connected());
  EXPECT_TRUE(conn->Send(wire::EncodeRegister({role, address})));
  return conn;
}

TEST(BootstrapTest, DeadNodeFailsBarrierNamingIt) {
  auto sched = StartScheduler(2, 1);
  ASSERT_NE(sched, nullptr);
  auto w0 = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7001");
  auto w1 = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7002");
  auto doomed = RawNode(sched->port(), Role::kServer, "127.0.0.1:7999");
  auto a = w0.get();
  auto b = w1.get();
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  uint8_t type = 0;
  std::vector<uint8_t> payload;
  ASSERT_TRUE(doomed->ReadFrame(kJoinTimeout, &type, &payload));
  ASSERT_EQ(type, static_cast<uint8_t>(wire::MsgType::kAssign));

  // The workers enter the barrier (most likely before the kill; either order
  // must fail the same way), then the server dies without LEAVE.
  auto ba = std::async(std::launch::async, [&] { return (*a)->Barrier(kJoinTimeout); });
  auto bb = std::async(std::launch::async, [&] { return (*b)->Barrier(kJoinTimeout); });
  std::this_thread::sleep_for(milliseconds(100));
  doomed->Close();
  for (Status st : {ba.get(), bb.get()}) {
    EXPECT_EQ(st.code(), StatusCode::kPeerClosed) << st.ToString();
    EXPECT_NE(st.message().find("server 0 (rank 2, 127.0.0.1:7999)"), std::string::npos) << st.ToString();
    EXPECT_NE(st.message().find("without LEAVE"), std::string::npos) << st.ToString();
  }
  // A barrier entered after the death fails at once too.
  Status later = (*a)->Barrier(kJoinTimeout);
  EXPECT_EQ(later.code(), StatusCode::kPeerClosed) << later.ToString();
  EXPECT_NE(later.message().find("127.0.0.1:7999"), std::string::npos);
  (*a)->Leave();
  (*b)->Leave();
  EXPECT_TRUE(sched->WaitForShutdown(kJoinTimeout).ok());
}

TEST(BootstrapTest, NodeLeavingFailsOthersBarrier) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  auto w = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7001");
  auto s = AsyncJoin(SchedAddr(*sched), Role::kServer, "127.0.0.1:7002");
  auto worker = w.get();
  auto server = s.get();
  ASSERT_TRUE(worker.ok() && server.ok());
  (*server)->Leave();
  Status st = (*worker)->Barrier(kJoinTimeout);
  EXPECT_EQ(st.code(), StatusCode::kPeerClosed) << st.ToString();
  EXPECT_NE(st.message().find("server 0 (rank 1, 127.0.0.1:7002) left"), std::string::npos) << st.ToString();
}

struct BadInput {
  const char* name;
  std::vector<uint8_t> bytes;
  bool then_shutdown;  // half-close after sending (a frame cut short)
};

std::vector<BadInput> BadInputs() {
  std::vector<BadInput> out;
  auto text = [](const char* s) { return std::vector<uint8_t>(s, s + std::strlen(s)); };
  out.push_back({"garbage", text("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false});
  out.push_back({"oversize length", {0x01, 0x00, 0x01, 0x00, 1, 2, 3}, false});  // 65537
  out.push_back({"huge length", {0xff, 0xff, 0xff, 0xff}, false});
  out.push_back({"zero length", {0, 0, 0, 0}, false});
  // REGISTER whose address string claims 200 bytes but carries 5.
  out.push_back({"truncated payload",
                 wire::EncodeFrame(1, std::vector<uint8_t>{1, 200, 0, 'a', ':', '1', '2', '3'}), false});
  auto reg = wire::EncodeRegister({Role::kWorker, "127.0.0.1:7001"});
  out.push_back({"truncated frame", std::vector<uint8_t>(reg.begin(), reg.end() - 4), true});
  out.push_back({"unknown type", wire::EncodeFrame(0x7f, std::vector<uint8_t>{1, 2, 3}), false});
  out.push_back({"type zero", wire::EncodeFrame(0, {}), false});
  auto bad_role = wire::EncodeRegister({Role::kWorker, "127.0.0.1:7001"});
  bad_role[5] = 3;
  out.push_back({"bad role", bad_role, false});
  bad_role[5] = 0;
  out.push_back({"role zero", bad_role, false});
  out.push_back({"address without port", wire::EncodeRegister({Role::kWorker, "localhost"}), false});
  out.push_back({"address port 0", wire::EncodeRegister({Role::kServer, "h:0"}), false});
  out.push_back({"address port 99999", wire::EncodeRegister({Role::kServer, "h:99999"}), false});
  out.push_back({"address with space", wire::EncodeRegister({Role::kServer, "a b:1"}), false});
  out.push_back({"address control char", wire::EncodeRegister({Role::kServer, "a\x1b[2J:1"}), false});
  auto trailing = wire::EncodeRegister({Role::kWorker, "127.0.0.1:7001"});
  trailing.push_back(0);
  trailing[0] += 1;  // keep the length prefix honest
  out.push_back({"trailing bytes", trailing, false});
  out.push_back({"ASSIGN from a node", wire::EncodeFrame(2, std::vector<uint8_t>(16, 0)), false});
  out.push_back({"ERROR from a node", wire::EncodeError({StatusCode::kInternal, "x"}), false});
  out.push_back({"BARRIER before REGISTER", wire::EncodeBarrier(wire::MsgType::kBarrier, 1), false});
  out.push_back({"LEAVE before REGISTER", wire::EncodeLeave(), false});
  out.push_back({"LEAVE with payload", Concat(reg, wire::EncodeFrame(5, std::vector<uint8_t>{9})), false});
  out.push_back({"second REGISTER", Concat(reg, reg), false});
  out.push_back(
      {"BARRIER before ASSIGN", Concat(reg, wire::EncodeBarrier(wire::MsgType::kBarrier, 1)), false});
  return out;
}

TEST(BootstrapTest, MalformedInputIsDroppedAndServiceSurvives) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  for (const BadInput& bad : BadInputs()) {
    SCOPED_TRACE(bad.name);
    RawConn conn(sched->port());
    ASSERT_TRUE(conn.connected());
    conn.Send(bad.bytes);  // may fail if the scheduler already hung up
    if (bad.then_shutdown) conn.ShutdownWrite();
    std::vector<uint8_t> got;
    EXPECT_TRUE(conn.WaitClosed(kJoinTimeout, &got)) << "scheduler kept the connection open";
    // Whatever came back is at most an ERROR frame, never an ASSIGN.
    if (got.size() > wire::kLengthBytes) {
      EXPECT_EQ(got[wire::kLengthBytes], static_cast<uint8_t>(wire::MsgType::kError));
    }
  }
  ExpectServesCluster(*sched);
}

TEST(BootstrapTest, SilentConnectionDoesNotBlockOthersAndIsDropped) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  // Half a length prefix, then silence: the cluster forms regardless.
  RawConn slow(sched->port());
  ASSERT_TRUE(slow.Send({0x10, 0x00}));
  ExpectServesCluster(*sched);
  // Then it is dropped (slowloris guard); bounded well above the 10 s.
  std::vector<uint8_t> got;
  EXPECT_TRUE(slow.WaitClosed(milliseconds(30000), &got));
  ASSERT_GT(got.size(), wire::kLengthBytes);
  EXPECT_EQ(got[wire::kLengthBytes], static_cast<uint8_t>(wire::MsgType::kError));
}

TEST(BootstrapTest, TooManyWorkersRefusesTheExtra) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  auto w = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7001");
  auto s = AsyncJoin(SchedAddr(*sched), Role::kServer, "127.0.0.1:7002");
  auto worker = w.get();
  auto server = s.get();
  ASSERT_TRUE(worker.ok() && server.ok());
  auto extra = BootstrapClient::Join(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7003", kJoinTimeout);
  ASSERT_FALSE(extra.ok());
  EXPECT_EQ(extra.status().code(), StatusCode::kFailedPrecondition) << extra.status().ToString();
  EXPECT_NE(extra.status().message().find("too many workers"), std::string::npos)
      << extra.status().ToString();
  EXPECT_NE(extra.status().message().find(SchedAddr(*sched)), std::string::npos);
  // The formed cluster is unaffected.
  auto b = std::async(std::launch::async, [&] { return (*worker)->Barrier(kJoinTimeout); });
  EXPECT_TRUE((*server)->Barrier(kJoinTimeout).ok());
  EXPECT_TRUE(b.get().ok());
}

std::future<Result<std::unique_ptr<BootstrapClient>>> AsyncJoinAt(const std::string& sched, Role role,
                                                                  const std::string& addr, uint32_t index) {
  return std::async(std::launch::async,
                    [=] { return BootstrapClient::Join(sched, role, addr, kJoinTimeout, index); });
}

TEST(BootstrapTest, RequestedIndicesAreHonoured) {
  auto sched = StartScheduler(3, 2);
  ASSERT_NE(sched, nullptr);
  const std::string addr = SchedAddr(*sched);
  // Registration order is up to the threads; the outcome must not be.
  auto w2 = AsyncJoinAt(addr, Role::kWorker, "127.0.0.1:7001", 2);
  auto wa = AsyncJoin(addr, Role::kWorker, "127.0.0.1:7002");
  auto w0 = AsyncJoinAt(addr, Role::kWorker, "127.0.0.1:7003", 0);
  auto s1 = AsyncJoinAt(addr, Role::kServer, "127.0.0.1:7004", 1);
  auto sa = AsyncJoin(addr, Role::kServer, "127.0.0.1:7005");
  struct Want {
    std::future<Result<std::unique_ptr<BootstrapClient>>>* f;
    Role role;
    uint32_t role_rank;
    uint32_t rank;
  };
  std::vector<std::unique_ptr<BootstrapClient>> keep;
  for (Want w :
       {Want{&w2, Role::kWorker, 2, 2}, Want{&wa, Role::kWorker, 1, 1}, Want{&w0, Role::kWorker, 0, 0},
        Want{&s1, Role::kServer, 1, 4}, Want{&sa, Role::kServer, 0, 3}}) {
    auto r = w.f->get();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    const ClusterView& v = (*r)->view();
    EXPECT_EQ(v.self_rank, w.rank);
    EXPECT_EQ(v.self().role, w.role);
    EXPECT_EQ(v.self().role_rank, w.role_rank);
    keep.push_back(std::move(r).value());
  }
  EXPECT_EQ(keep[0]->view().nodes[0].address, "127.0.0.1:7003");
  EXPECT_EQ(keep[0]->view().nodes[4].address, "127.0.0.1:7004");
}

TEST(BootstrapTest, RequestedIndexOutOfRangeIsRefused) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  auto bad = BootstrapClient::Join(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7009", kJoinTimeout, 1u);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument) << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("outside the cluster's 1 workers"), std::string::npos)
      << bad.status().ToString();
  auto reserved =
      BootstrapClient::Join(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7009", kJoinTimeout, 0xffffffffu);
  EXPECT_EQ(reserved.status().code(), StatusCode::kInvalidArgument);
  ExpectServesCluster(*sched);
}

TEST(BootstrapTest, DuplicateRequestedIndexIsRefused) {
  auto sched = StartScheduler(2, 1);
  ASSERT_NE(sched, nullptr);
  const std::string addr = SchedAddr(*sched);
  auto a = AsyncJoinAt(addr, Role::kWorker, "127.0.0.1:7001", 0);
  auto b = AsyncJoinAt(addr, Role::kWorker, "127.0.0.1:7002", 0);
  // Whichever registers second is refused at once; the first keeps waiting.
  auto* refused = &a;
  auto* kept = &b;
  const auto deadline = std::chrono::steady_clock::now() + kJoinTimeout;
  while (true) {
    if (a.wait_for(milliseconds(10)) == std::future_status::ready) break;
    if (b.wait_for(milliseconds(10)) == std::future_status::ready) {
      std::swap(refused, kept);
      break;
    }
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "neither duplicate was refused";
  }
  auto r = refused->get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kAlreadyExists) << r.status().ToString();
  EXPECT_NE(r.status().message().find("worker index 0"), std::string::npos) << r.status().ToString();
  auto w = AsyncJoin(addr, Role::kWorker, "127.0.0.1:7003");
  auto s = AsyncJoin(addr, Role::kServer, "127.0.0.1:7004");
  auto first = kept->get();
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ((*first)->view().self().role_rank, 0u);
  auto other = w.get();
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  EXPECT_EQ((*other)->view().self().role_rank, 1u);
  ASSERT_TRUE(s.get().ok());
}

TEST(BootstrapTest, TooManyServersBeforeFormationGetsError) {
  // Two raw servers for one slot: whichever registers second is refused
  // while the cluster is still incomplete.
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  auto s1 = RawNode(sched->port(), Role::kServer, "127.0.0.1:7001");
  auto s2 = RawNode(sched->port(), Role::kServer, "127.0.0.1:7002");
  auto worker = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7000").get();
  ASSERT_TRUE(worker.ok()) << worker.status().ToString();
  int errors = 0, assigns = 0;
  for (RawConn* c : {s1.get(), s2.get()}) {
    uint8_t type = 0;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(c->ReadFrame(kJoinTimeout, &type, &payload));
    if (type == static_cast<uint8_t>(wire::MsgType::kError)) {
      ++errors;
      auto err = wire::DecodeError(payload);
      ASSERT_TRUE(err.ok());
      EXPECT_EQ(err->code, StatusCode::kFailedPrecondition);
      EXPECT_NE(err->reason.find("too many servers"), std::string::npos) << err->reason;
      EXPECT_TRUE(c->WaitClosed(kJoinTimeout));
    } else {
      ++assigns;
      EXPECT_EQ(type, static_cast<uint8_t>(wire::MsgType::kAssign));
    }
  }
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(assigns, 1);
}

TEST(BootstrapTest, DuplicateTransportAddressIsRefused) {
  auto sched = StartScheduler(2, 0);
  ASSERT_NE(sched, nullptr);
  auto a = RawNode(sched->port(), Role::kWorker, "127.0.0.1:7001");
  auto b = RawNode(sched->port(), Role::kWorker, "127.0.0.1:7001");
  auto worker = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7002").get();
  ASSERT_TRUE(worker.ok()) << worker.status().ToString();
  int errors = 0;
  for (RawConn* c : {a.get(), b.get()}) {
    uint8_t type = 0;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(c->ReadFrame(kJoinTimeout, &type, &payload));
    if (type != static_cast<uint8_t>(wire::MsgType::kError)) continue;
    ++errors;
    auto err = wire::DecodeError(payload);
    ASSERT_TRUE(err.ok());
    EXPECT_EQ(err->code, StatusCode::kAlreadyExists) << err->reason;
  }
  EXPECT_EQ(errors, 1);
}

TEST(BootstrapTest, JoinWithoutSchedulerIsUnavailable) {
  // A bound but not listening socket: connects are refused and nobody else
  // can grab the port meanwhile.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  socklen_t len = sizeof(sa);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len), 0);
  std::string addr = "127.0.0.1:" + std::to_string(ntohs(sa.sin_port));
  auto r = BootstrapClient::Join(addr, Role::kWorker, "127.0.0.1:7001", milliseconds(300));
  ::close(fd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status().ToString();
  EXPECT_NE(r.status().message().find(addr), std::string::npos) << r.status().ToString();
}

TEST(BootstrapTest, JoinRetriesUntilSchedulerStarts) {
  // Reserve a port, release it, and start the scheduler on it a little after
  // the client began retrying.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  socklen_t len = sizeof(sa);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len), 0);
  uint16_t port = ntohs(sa.sin_port);
  auto join = std::async(std::launch::async, [port] {
    return BootstrapClient::Join("127.0.0.1:" + std::to_string(port), Role::kWorker, "127.0.0.1:7001",
                                 kJoinTimeout);
  });
  std::this_thread::sleep_for(milliseconds(200));
  ::close(fd);
  auto sched = Scheduler::Start("127.0.0.1", port, 1, 0);
  if (!sched.ok()) GTEST_SKIP() << "port was taken meanwhile: " << sched.status().ToString();
  auto r = join.get();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->view().nodes.size(), 1u);
  EXPECT_TRUE((*r)->Barrier(kJoinTimeout).ok());  // a one-node barrier releases at once
}

TEST(BootstrapTest, JoinTimesOutWhenClusterIncomplete) {
  auto sched = StartScheduler(2, 0);
  ASSERT_NE(sched, nullptr);
  auto r = BootstrapClient::Join(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7001", milliseconds(300));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kTimeout) << r.status().ToString();
  EXPECT_NE(r.status().message().find(SchedAddr(*sched)), std::string::npos);
  // Its slot was freed when it hung up: a full cluster still forms.
  auto a = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7002");
  auto b = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7003");
  auto ra = a.get();
  auto rb = b.get();
  ASSERT_TRUE(ra.ok()) << ra.status().ToString();
  ASSERT_TRUE(rb.ok()) << rb.status().ToString();
  for (const NodeInfo& n : (*ra)->view().nodes) EXPECT_NE(n.address, "127.0.0.1:7001");
}

TEST(BootstrapTest, StopFailsWaitingClients) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  auto w = AsyncJoin(SchedAddr(*sched), Role::kWorker, "127.0.0.1:7001");
  auto s = AsyncJoin(SchedAddr(*sched), Role::kServer, "127.0.0.1:7002");
  auto worker = w.get();
  auto server = s.get();
  ASSERT_TRUE(worker.ok() && server.ok());
  auto b = std::async(std::launch::async, [&] { return (*worker)->Barrier(kJoinTimeout); });
  std::this_thread::sleep_for(milliseconds(50));
  sched->Stop();
  Status st = b.get();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_EQ(sched->WaitForShutdown(milliseconds(10)).code(), StatusCode::kCancelled);
}

TEST(BootstrapTest, RejectsBadArguments) {
  EXPECT_EQ(Scheduler::Start("127.0.0.1", 0, 0, 0).status().code(), StatusCode::kInvalidArgument);
  auto sched = StartScheduler(1, 0);
  ASSERT_NE(sched, nullptr);
  EXPECT_EQ(
      BootstrapClient::Join(SchedAddr(*sched), Role::kWorker, "no-port", milliseconds(100)).status().code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(BootstrapClient::Join("nonsense", Role::kWorker, "h:1", milliseconds(100)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(BootstrapClient::Join(SchedAddr(*sched), static_cast<Role>(7), "h:1", milliseconds(100))
                .status()
                .code(),
            StatusCode::kInvalidArgument);
}

TEST(BootstrapWireTest, AssignRoundTripsAndRejectsInconsistentCounts) {
  ClusterView view;
  view.num_workers = 2;
  view.num_servers = 1;
  view.self_rank = 1;
  view.nodes = {
      {0, Role::kWorker, 0, "a:1"}, {1, Role::kWorker, 1, "b:2"}, {2, Role::kServer, 0, "[fe80::1%eth0]:3"}};
  auto frame = wire::EncodeAssign(view);
  std::span<const uint8_t> payload(frame.data() + 5, frame.size() - 5);
  auto back = wire::DecodeAssign(payload);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->self_rank, 1u);
  ASSERT_EQ(back->nodes.size(), 3u);
  EXPECT_EQ(back->nodes[2].address, "[fe80::1%eth0]:3");

  ClusterView bad = view;
  bad.num_servers = 2;  // count says 3, W + S says 4
  frame = wire::EncodeAssign(bad);
  EXPECT_EQ(wire::DecodeAssign({frame.data() + 5, frame.size() - 5}).status().code(), StatusCode::kCorrupt);
  bad = view;
  bad.nodes[2].role = Role::kWorker;  // a worker at a server rank
  frame = wire::EncodeAssign(bad);
  EXPECT_EQ(wire::DecodeAssign({frame.data() + 5, frame.size() - 5}).status().code(), StatusCode::kCorrupt);
  bad = view;
  bad.self_rank = 3;
  frame = wire::EncodeAssign(bad);
  EXPECT_EQ(wire::DecodeAssign({frame.data() + 5, frame.size() - 5}).status().code(), StatusCode::kCorrupt);
  // Every strict prefix of a valid payload is rejected, never read past.
  frame = wire::EncodeAssign(view);
  for (size_t n = 0; n + 5 < frame.size(); ++n) {
    EXPECT_FALSE(wire::DecodeAssign({frame.data() + 5, n}).ok()) << n;
  }
}

TEST(BootstrapWireTest, RegisterCarriesAnOptionalIndex) {
  auto any = wire::EncodeRegister({Role::kWorker, "127.0.0.1:7001"});
  auto fixed = wire::EncodeRegister({Role::kServer, "127.0.0.1:7001", 7});
  ASSERT_EQ(fixed.size(), any.size() + 4);
  auto payload = [](const std::vector<uint8_t>& frame) {
    return std::span<const uint8_t>(frame).subspan(wire::kLengthBytes + 1);
  };
  auto a = wire::DecodeRegister(payload(any));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->requested_role_rank, wire::kAnyRoleRank);
  auto f = wire::DecodeRegister(payload(fixed));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->role, Role::kServer);
  EXPECT_EQ(f->requested_role_rank, 7u);
  // A partial index (1..3 trailing bytes) and anything after it are corrupt.
  for (size_t cut = 1; cut <= 3; ++cut) {
    std::vector<uint8_t> partial(fixed.begin(), fixed.end() - cut);
    EXPECT_EQ(wire::DecodeRegister(payload(partial)).status().code(), StatusCode::kCorrupt) << cut;
  }
  fixed.push_back(0);
  EXPECT_EQ(wire::DecodeRegister(payload(fixed)).status().code(), StatusCode::kCorrupt);
  // An explicit 0xffffffff would be a second encoding of "any index" (found
  // by fuzz_bootstrap_wire: it decoded, then re-encoded without the field).
  std::vector<uint8_t> explicit_any(any);
  for (int i = 0; i < 4; ++i) explicit_any.push_back(0xff);
  auto e = wire::DecodeRegister(payload(explicit_any));
  EXPECT_EQ(e.status().code(), StatusCode::kCorrupt) << e.status().ToString();
}

TEST(BootstrapWireTest, Addresses) {
  for (const char* good : {"127.0.0.1:1", "host-a.example_1:65535", "[::1]:80"}) {
    EXPECT_TRUE(wire::ValidateAddress(good).ok()) << good;
  }
  for (const char* bad : {"", ":1", "h:", "h:0", "h:65536", "h:1x", "::1:80", "[::1:80", "h :1", "h:+1"}) {
    EXPECT_FALSE(wire::ValidateAddress(bad).ok()) << bad;
  }
  EXPECT_FALSE(wire::ValidateAddress(std::string(300, 'a') + ":1").ok());
}

TEST(BootstrapTest, FuzzRandomBytesThenRealCluster) {
  auto sched = StartScheduler(1, 1);
  ASSERT_NE(sched, nullptr);
  std::mt19937 rng(12345);
  auto reg = wire::EncodeRegister({Role::kWorker, "127.0.0.1:7001"});
  int stuck = 0;
  for (int i = 0; i < 500; ++i) {
    std::vector<uint8_t> buf;
    switch (i % 3) {
      case 0: {  // pure noise
        buf.resize(rng() % 300);
        for (auto& b : buf) b = static_cast<uint8_t>(rng());
        break;
      }
      case 1: {  // plausible header, random type and payload
        std::vector<uint8_t> payload(rng() % 64);
        for (auto& b : payload) b = static_cast<uint8_t>(rng());
        buf = wire::EncodeFrame(static_cast<uint8_t>(rng() % 8), payload);
        if (rng() % 2) buf.resize(rng() % (buf.size() + 1));
        break;
      }
      default: {  // a valid REGISTER with a few flipped bytes
        buf = reg;
        for (int k = 0; k < 3; ++k) buf[rng() % buf.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      }
    }
    RawConn conn(sched->port());
    ASSERT_TRUE(conn.connected()) << "iteration " << i;
    conn.Send(buf);
    // Half-closing makes the scheduler see EOF whatever state the bytes left
    // it in; its own close proves it has processed (and forgotten) us.
    conn.ShutdownWrite();
    if (!conn.WaitClosed(kJoinTimeout)) ++stuck;
  }
  EXPECT_EQ(stuck, 0);
  ExpectServesCluster(*sched);
}

}  // namespace
}  // namespace zipwire::transport
