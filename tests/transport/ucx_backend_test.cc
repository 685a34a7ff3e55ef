// ucx backend specifics beyond the conformance suite: the connection
// handshake (ucp worker addresses swapped over the backend's own socket)
// against peers that send garbage, lie about lengths, stall, or die midway.
#include <gtest/gtest.h>

#ifdef ZIPWIRE_HAVE_UCX

#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "transport/backend.h"

namespace zipwire::transport {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace asio = boost::asio;

constexpr uint64_t kMagic = 0x3273686b58435557ull;  // see ucx_backend.cc
constexpr uint32_t kVersion = 3;

std::vector<uint8_t> Header(uint64_t magic, uint32_t version, uint32_t word, uint32_t bytes) {
  std::vector<uint8_t> h(24, 0);
  auto put = [&](size_t at, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) h[at + i] = static_cast<uint8_t>(v >> (8 * i));
  };
  put(0, magic, 8);
  put(8, version, 4);
  put(12, word, 4);
  put(16, bytes, 4);
  return h;
}

std::unique_ptr<Backend> MakeUcx(PeerId rank, std::chrono::milliseconds connect_timeout) {
  setenv("UCX_TLS", "tcp", 1);
  setenv("UCX_NET_DEVICES", "lo", 0);
  BackendOptions opts;
  opts.self = rank;
  opts.connect_timeout = connect_timeout;
  auto made = CreateBackend("ucx", opts);
  EXPECT_TRUE(made.ok()) << made.status().ToString();
  if (!made.ok()) return nullptr;
  std::unique_ptr<Backend> b = std::move(made).value();
  b->SetLocalRank(rank);
  return b;
}

asio::ip::tcp::endpoint EndpointOf(const std::string& address) {
  size_t colon = address.rfind(':');
  return {asio::ip::make_address(address.substr(0, colon)),
          static_cast<uint16_t>(std::stoi(address.substr(colon + 1)))};
}

// Reads until the backend drops the socket; true if it did within 10 s.
bool DroppedByServer(asio::ip::tcp::socket& s) {
  s.non_blocking(true);
  const auto deadline = Clock::now() + 10s;
  while (Clock::now() < deadline) {
    uint8_t junk[256];
    boost::system::error_code ec;
    s.read_some(asio::buffer(junk), ec);
    if (ec == asio::error::would_block) {
      std::this_thread::sleep_for(1ms);
      continue;
    }
    if (ec) return true;
  }
  return false;
}

size_t PumpUntil(Backend& a, Backend& b, CompletionType type, std::vector<Completion>* got) {
  const auto deadline = Clock::now() + 30s;
  Completion buf[32];
  while (Clock::now() < deadline) {
    for (Backend* n : {&a, &b}) {
      size_t k = n->Poll(buf, 1ms);
      for (size_t i = 0; i < k; ++i) got->push_back(buf[i]);
    }
    for (const auto& c : *got) {
      if (c.type == type) return got->size();
    }
  }
  return 0;
}

TEST(UcxHandshakeTest, BadClientsAreDroppedAndServiceContinues) {
  auto server = MakeUcx(1, 500ms);  // bounds each handshake the server serves
  ASSERT_TRUE(server);
  auto addr = server->Listen();
  ASSERT_TRUE(addr.ok()) << addr.status().ToString();
  asio::io_context io;
  const auto ep = EndpointOf(*addr);
  {  // Not a zipwire handshake at all.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    std::string junk = "GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    asio::write(s, asio::buffer(junk));
    EXPECT_TRUE(DroppedByServer(s));
  }
  {  // A wrong wire version.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, 99, 5, 16)));
    EXPECT_TRUE(DroppedByServer(s));
  }
  {  // A worker address of a gigabyte: refused before anything is allocated.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, kVersion, 5, 1u << 30)));
    EXPECT_TRUE(DroppedByServer(s));
  }
  {  // An empty worker address.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, kVersion, 5, 0)));
    EXPECT_TRUE(DroppedByServer(s));
  }
  {  // Promises 200 bytes of address, sends 10 and dies.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, kVersion, 5, 200)));
    std::vector<uint8_t> part(10, 0xAB);
    asio::write(s, asio::buffer(part));
    s.close();
  }
  {  // Promises an address and then says nothing: the server gives up on it.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, kVersion, 6, 200)));
    EXPECT_TRUE(DroppedByServer(s));
  }
  {  // Garbage where the address should be (UCX would abort on it): refused.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, kVersion, 7, 64)));
    std::vector<uint8_t> garbage(64, 0xFF);
    asio::write(s, asio::buffer(garbage));
    EXPECT_TRUE(DroppedByServer(s));
  }
  {  // An address too short to hold even UCX's header.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    asio::write(s, asio::buffer(Header(kMagic, kVersion, 8, 3)));
    std::vector<uint8_t> tiny(3, 0);
    asio::write(s, asio::buffer(tiny));
    EXPECT_TRUE(DroppedByServer(s));
  }
  // None of them became a peer, and a real client still gets through.
  auto client = MakeUcx(0, 10000ms);
  ASSERT_TRUE(client);
  Status st = client->Connect(1, *addr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<Completion> got;
  ASSERT_GT(PumpUntil(*client, *server, CompletionType::kPeerConnected, &got), 0u);
  size_t connected = 0;
  for (const auto& c : got) {
    if (c.type != CompletionType::kPeerConnected) continue;
    ++connected;
    EXPECT_EQ(c.peer, 0u);
  }
  EXPECT_EQ(connected, 1u);
  std::vector<uint8_t> src(4096, 3), dst(4096, 0);
  auto ls = client->RegisterMemory(src.data(), src.size(), MemoryKind::kHost);
  auto rd = server->RegisterMemory(dst.data(), dst.size(), MemoryKind::kHost);
  ASSERT_TRUE(ls.ok() && rd.ok());
  ASSERT_TRUE(client->PostWrite(1, *ls, 0, ToRemote(*rd), 0, 4096, 9, 9).ok());
  got.clear();
  ASSERT_GT(PumpUntil(*client, *server, CompletionType::kWriteDone, &got), 0u);
  EXPECT_EQ(dst, src);
}

// A fake server that accepts one connection, reads the client's header and
// then does `act` with the socket.
class FakeServer {
 public:
  explicit FakeServer(std::function<void(asio::ip::tcp::socket&)> act)
      : acceptor_(io_, {asio::ip::make_address("127.0.0.1"), 0}) {
    thread_ = std::thread([this, act] {
      asio::ip::tcp::socket s(io_);
      boost::system::error_code ec;
      acceptor_.accept(s, ec);
      if (ec) return;
      std::vector<uint8_t> hdr(24);
      asio::read(s, asio::buffer(hdr), ec);
      if (ec) return;
      act(s);
    });
  }
  ~FakeServer() {
    if (thread_.joinable()) thread_.join();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port()); }

 private:
  asio::io_context io_;
  asio::ip::tcp::acceptor acceptor_;
  std::thread thread_;
};

TEST(UcxHandshakeTest, ServerDyingMidHandshakeIsAClearError) {
  FakeServer fake([](asio::ip::tcp::socket& s) { s.close(); });
  auto client = MakeUcx(0, 5000ms);
  ASSERT_TRUE(client);
  const auto t0 = Clock::now();
  Status st = client->Connect(1, fake.address());
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("during the ucx handshake"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find(fake.address()), std::string::npos) << st.ToString();
  EXPECT_LT(Clock::now() - t0, 4s) << "a dead peer is final, not retried until the timeout";
}

TEST(UcxHandshakeTest, SilentServerTimesOut) {
  FakeServer fake([](asio::ip::tcp::socket&) { std::this_thread::sleep_for(1500ms); });
  auto client = MakeUcx(0, 300ms);
  ASSERT_TRUE(client);
  Status st = client->Connect(1, fake.address());
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("no answer"), std::string::npos) << st.ToString();
}

TEST(UcxHandshakeTest, LyingServerIsRefused) {
  {  // Not our magic.
    FakeServer fake(
        [](asio::ip::tcp::socket& s) { asio::write(s, asio::buffer(Header(1, kVersion, 0, 8))); });
    auto client = MakeUcx(0, 2000ms);
    ASSERT_TRUE(client);
    Status st = client->Connect(1, fake.address());
    EXPECT_EQ(st.code(), StatusCode::kCorrupt) << st.ToString();
  }
  {  // An address far too large to be one: refused before it is read.
    FakeServer fake([](asio::ip::tcp::socket& s) {
      asio::write(s, asio::buffer(Header(kMagic, kVersion, 0, 1u << 31)));
    });
    auto client = MakeUcx(0, 2000ms);
    ASSERT_TRUE(client);
    Status st = client->Connect(1, fake.address());
    EXPECT_EQ(st.code(), StatusCode::kCorrupt) << st.ToString();
  }
  {  // Accepted, with garbage for an address (UCX would abort on it).
    FakeServer fake([](asio::ip::tcp::socket& s) {
      asio::write(s, asio::buffer(Header(kMagic, kVersion, 0, 32)));
      std::vector<uint8_t> garbage(32, 0xFF);
      asio::write(s, asio::buffer(garbage));
    });
    auto client = MakeUcx(0, 2000ms);
    ASSERT_TRUE(client);
    Status st = client->Connect(1, fake.address());
    EXPECT_EQ(st.code(), StatusCode::kCorrupt) << st.ToString();
    EXPECT_NE(st.message().find("format version"), std::string::npos) << st.ToString();
  }
  {  // An unknown answer code.
    FakeServer fake(
        [](asio::ip::tcp::socket& s) { asio::write(s, asio::buffer(Header(kMagic, kVersion, 77, 0))); });
    auto client = MakeUcx(0, 2000ms);
    ASSERT_TRUE(client);
    Status st = client->Connect(1, fake.address());
    EXPECT_EQ(st.code(), StatusCode::kCorrupt) << st.ToString();
  }
}

}  // namespace
}  // namespace zipwire::transport

#endif  // ZIPWIRE_HAVE_UCX
