// Fuzzes the tcp backend's frame parser the way a peer reaches it: a real
// loopback connection says a valid HELLO, then sends the input as its byte
// stream (WRITE / SEND / ACK / NACK / READ / READ_RESP frames or garbage) and
// hangs up. The backend has one registered 64 KiB region (key 1), so frames
// naming it reach the data paths (writes landing, READs answered straight
// from the region).
//
// Beyond "no crash, no UB, no hang": every connection ends in exactly one
// kPeerError for its rank within a bound (the stream always ends), and every
// kWriteImm the backend reports lies inside the registered region.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz/fuzz_check.h"
#include "transport/backend_util.h"
#include "transport/tcp_backend.h"

namespace zt = zipwire::transport;

namespace {

constexpr size_t kRegionBytes = 64 << 10;
constexpr uint64_t kHelloMagic = 0x317600504354575aull;  // "ZWTCP\0v1"
constexpr int kInputsPerBackend = 256;  // closed connections stay listed: start afresh now and then

struct State {
  std::unique_ptr<zt::Backend> backend;
  uint16_t port = 0;
  std::vector<uint8_t> region = std::vector<uint8_t>(kRegionBytes);
  uint64_t key = 0;
  int inputs = 0;
  uint32_t next_rank = 1;
};

State& Get() {
  static State* s = new State();  // never freed: the fuzzer exits without tearing down
  if (!s->backend || s->inputs >= kInputsPerBackend) {
    if (s->backend) s->backend->Close();
    s->backend.reset();
    zt::BackendOptions opts;
    opts.self = 0;
    auto made = zt::CreateTcpBackend(opts);
    ZW_FUZZ_CHECK(made.ok(), "cannot create the tcp backend");
    s->backend = std::move(made).value();
    s->backend->SetLocalRank(0);
    auto addr = s->backend->Listen();
    ZW_FUZZ_CHECK(addr.ok(), "cannot listen");
    s->port = static_cast<uint16_t>(std::stoi(addr->substr(addr->rfind(':') + 1)));
    auto r = s->backend->RegisterMemory(s->region.data(), s->region.size(), zt::MemoryKind::kHost);
    ZW_FUZZ_CHECK(r.ok(), "cannot register");
    s->key = r->key;
    s->inputs = 0;
  }
  ++s->inputs;
  return *s;
}

// Drives the backend and drains what it sends us until `done` or the bound.
template <typename F>
bool PumpUntil(State& s, int fd, F&& done, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  zt::Completion buf[32];
  uint8_t sink[16384];
  while (std::chrono::steady_clock::now() < deadline) {
    size_t n = s.backend->Poll(buf, std::chrono::milliseconds(1));
    for (size_t i = 0; i < n; ++i) {
      if (done(buf[i])) return true;
    }
    while (fd >= 0 && ::recv(fd, sink, sizeof(sink), MSG_DONTWAIT) > 0) {
    }
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  State& s = Get();
  const uint32_t rank = s.next_rank;
  s.next_rank = s.next_rank % 1000000 + 1;

  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ZW_FUZZ_CHECK(fd >= 0, "socket");
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(s.port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ZW_FUZZ_CHECK(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0, "connect");
  std::vector<uint8_t> stream(zt::internal::kMessageHeaderBytes, 0);
  zt::internal::MessageHeader hello;
  hello.type = 1;  // HELLO
  hello.imm = rank;
  hello.key = kHelloMagic;
  hello.offset = 1;  // wire version
  zt::internal::EncodeHeader(hello, stream.data());
  stream.insert(stream.end(), data, data + size);
  bool connected = false, ended = false;
  auto observe = [&](const zt::Completion& c) {
    if (c.peer != rank) return false;
    if (c.type == zt::CompletionType::kPeerConnected) connected = true;
    if (c.type == zt::CompletionType::kWriteImm) {
      ZW_FUZZ_CHECK(c.key == s.key, "a write landed in an unregistered region");
      ZW_FUZZ_CHECK(c.offset <= kRegionBytes && c.length <= kRegionBytes - c.offset,
                    "a write landed outside its region");
    }
    if (c.type == zt::CompletionType::kRecvMessage) {
      ZW_FUZZ_CHECK(c.message.size() <= zt::kTcpMaxControlBytes, "oversize control message");
    }
    if (c.type == zt::CompletionType::kPeerError) {
      ZW_FUZZ_CHECK(!ended, "two kPeerError for one connection");
      ended = true;
    }
    return ended;
  };
  size_t sent = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(4);
  while (sent < stream.size() && !ended) {
    ssize_t w = ::send(fd, stream.data() + sent, stream.size() - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w > 0) {
      sent += static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) break;  // the backend hung up on us: fine
    ZW_FUZZ_CHECK(std::chrono::steady_clock::now() < deadline, "backend stopped reading the stream");
    PumpUntil(s, fd, observe, std::chrono::milliseconds(1));
  }
  ::shutdown(fd, SHUT_WR);
  if (!ended) PumpUntil(s, fd, observe, std::chrono::seconds(4));
  ::close(fd);
  ZW_FUZZ_CHECK(ended, "the connection did not end in kPeerError within 4 s after the peer hung up");
  ZW_FUZZ_CHECK(connected, "kPeerError without kPeerConnected first");
  return 0;
}
