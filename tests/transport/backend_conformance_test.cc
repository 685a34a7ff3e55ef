// Backend conformance: every transport backend must pass these, two
// instances (ranks 0 and 1) in one process over loopback. Waits are bounded
// by generous deadlines that only fail a test, never gate behaviour.
#include <gtest/gtest.h>

#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "transport/backend.h"
#ifdef ZIPWIRE_HAVE_VERBS
#include "transport/verbs_backend.h"
#endif

namespace zipwire::transport {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr auto kDeadline = 60s;  // a hang shows up as a failure, not a stuck run

struct Node {
  std::unique_ptr<Backend> backend;
  std::vector<Completion> got;

  // Polls once (bounded) and keeps what arrived.
  size_t Pump(std::chrono::milliseconds timeout = 1ms) {
    Completion buf[128];
    size_t n = backend->Poll(buf, timeout);
    for (size_t i = 0; i < n; ++i) got.push_back(std::move(buf[i]));
    return n;
  }
  size_t Count(CompletionType type) const {
    size_t n = 0;
    for (const auto& c : got) n += c.type == type;
    return n;
  }
  std::vector<Completion> Take(CompletionType type) {
    std::vector<Completion> out, rest;
    for (auto& c : got) (c.type == type ? out : rest).push_back(std::move(c));
    got.swap(rest);
    return out;
  }
};

// Polls every node until `done` holds or the deadline passes.
bool PumpUntil(std::vector<Node*> nodes, const std::function<bool()>& done) {
  const auto deadline = Clock::now() + kDeadline;
  while (!done()) {
    if (Clock::now() > deadline) return false;
    for (Node* n : nodes) n->Pump();
  }
  return true;
}

uint64_t Checksum(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

void FillRandom(std::vector<uint8_t>& v, uint32_t seed) {
  std::mt19937_64 rng(seed);
  size_t i = 0;
  for (; i + 8 <= v.size(); i += 8) {
    uint64_t x = rng();
    std::memcpy(v.data() + i, &x, 8);
  }
  for (; i < v.size(); ++i) v[i] = static_cast<uint8_t>(rng());
}

// A test parameter names a backend, or a backend on a chosen path:
// "ucx" is UCX over tcp (UCX_TLS=tcp), "ucx_shm" UCX over shared memory;
// "verbs_rdmacm" is verbs with its QPs connected through rdma_cm
// (ZIPWIRE_IB_CM=rdmacm) instead of its TCP side channel.
std::string BackendOf(const std::string& param) {
  if (param == "ucx_shm") return "ucx";
  if (param == "verbs_rdmacm") return "verbs";
  return param;
}

// rdma_cm needs an address on an RDMA device's netdev (not loopback): the
// soft-RoCE guest's checks.sh names rxe0's.
const char* RdmaCmHost() { return std::getenv("ZIPWIRE_TEST_RDMACM_HOST"); }

class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::unique_ptr<Backend> Make(PeerId rank, std::chrono::milliseconds connect_timeout = 10000ms) {
    // Keep UCX's tcp transport on loopback unless the caller chose devices.
    if (GetParam() == "ucx") {
      setenv("UCX_NET_DEVICES", "lo", /*overwrite=*/0);
      setenv("UCX_TLS", "tcp", /*overwrite=*/1);
    } else if (GetParam() == "ucx_shm") {
      setenv("UCX_TLS", "posix,sysv,cma,self", /*overwrite=*/1);
    }
    BackendOptions opts;
    if (GetParam() == "verbs_rdmacm") {
      setenv("ZIPWIRE_IB_CM", "rdmacm", /*overwrite=*/1);
      opts.listen_host = RdmaCmHost();
    } else if (GetParam() == "verbs") {
      unsetenv("ZIPWIRE_IB_CM");
    }
    opts.self = rank;
    opts.connect_timeout = connect_timeout;
    auto made = CreateBackend(BackendOf(GetParam()), opts);
    EXPECT_TRUE(made.ok()) << made.status().ToString();
    if (!made.ok()) return nullptr;
    std::unique_ptr<Backend> b = std::move(made).value();
    b->SetLocalRank(rank);
    return b;
  }

  // Rank 0 (a) connects to rank 1 (b), which listens.
  void SetUp() override {
#ifdef ZIPWIRE_HAVE_VERBS
    if ((GetParam() == "verbs" || GetParam() == "verbs_rdmacm") && VerbsDeviceCount() == 0) {
      GTEST_SKIP() << "no RDMA device (ibv_get_device_list is empty); the verbs backend runs in the "
                      "soft-RoCE guest: ctest -L softroce";
    }
    if (GetParam() == "verbs_rdmacm" && RdmaCmHost() == nullptr) {
      GTEST_SKIP() << "ZIPWIRE_TEST_RDMACM_HOST (an address on an RDMA device's netdev) is unset; "
                      "tests/softroce/checks.sh sets it in the soft-RoCE guest";
    }
#endif
    a_.backend = Make(0);
    b_.backend = Make(1);
    ASSERT_TRUE(a_.backend && b_.backend);
    auto addr = b_.backend->Listen();
    ASSERT_TRUE(addr.ok()) << addr.status().ToString();
    b_address_ = *addr;
    Status st = a_.backend->Connect(1, b_address_);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return b_.Count(CompletionType::kPeerConnected) == 1; }));
    auto up = b_.Take(CompletionType::kPeerConnected);
    EXPECT_EQ(up[0].peer, 0u);
    EXPECT_TRUE(up[0].status.ok());
  }

  MemoryRegion Register(Node& n, std::vector<uint8_t>& buf) {
    auto r = n.backend->RegisterMemory(buf.data(), buf.size(), MemoryKind::kHost);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : MemoryRegion{};
  }

  Node a_, b_;
  std::string b_address_;
};

TEST_P(BackendTest, CapabilitiesAreConsistent) {
  const Capabilities& caps = a_.backend->capabilities();
  EXPECT_EQ(caps.name, BackendOf(GetParam()));
  EXPECT_TRUE(caps.supports_write_imm);
  EXPECT_TRUE(caps.SupportsMemory(MemoryKind::kHost));
  EXPECT_GT(caps.max_control_bytes, 0u);
  EXPECT_GE(caps.max_write_bytes, size_t{64} << 20);
}

TEST_P(BackendTest, ImmediatesArriveInOrderExactlyOnce) {
  constexpr int kWrites = 5000;
  std::vector<uint8_t> src(kWrites * 8), dst(kWrites * 8, 0);
  FillRandom(src, 1);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  RemoteRegion remote = ToRemote(rd);
  for (int i = 0; i < kWrites; ++i) {
    Status st = a_.backend->PostWrite(1, ls, i * 8, remote, i * 8, 8, static_cast<uint32_t>(i), 1000 + i);
    ASSERT_TRUE(st.ok()) << st.ToString();
    if (i % 64 == 0) {
      a_.Pump(0ms);
      b_.Pump(0ms);
    }
  }
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return b_.Count(CompletionType::kWriteImm) >= kWrites && a_.Count(CompletionType::kWriteDone) >= kWrites;
  }));
  auto imms = b_.Take(CompletionType::kWriteImm);
  ASSERT_EQ(imms.size(), static_cast<size_t>(kWrites));
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_EQ(imms[i].imm, static_cast<uint32_t>(i)) << "at " << i;
    EXPECT_EQ(imms[i].peer, 0u);
    EXPECT_EQ(imms[i].key, rd.key);
    EXPECT_EQ(imms[i].offset, static_cast<uint64_t>(i) * 8);
    EXPECT_EQ(imms[i].length, 8u);
  }
  std::set<uint64_t> contexts;
  for (const auto& c : a_.Take(CompletionType::kWriteDone)) {
    EXPECT_TRUE(c.status.ok()) << c.status.ToString();
    EXPECT_EQ(c.peer, 1u);
    EXPECT_TRUE(contexts.insert(c.context).second) << "duplicate completion " << c.context;
  }
  EXPECT_EQ(contexts.size(), static_cast<size_t>(kWrites));
  EXPECT_EQ(src, dst);
  // Nothing extra trickles in afterwards.
  for (int i = 0; i < 20; ++i) {
    a_.Pump(1ms);
    b_.Pump(1ms);
  }
  EXPECT_EQ(a_.Count(CompletionType::kWriteDone), 0u);
  EXPECT_EQ(b_.Count(CompletionType::kWriteImm), 0u);
}

TEST_P(BackendTest, LargeWriteLandsIntact) {
  constexpr size_t kBytes = size_t{64} << 20;
  std::vector<uint8_t> src(kBytes), dst(kBytes + 4096, 0xEE);
  FillRandom(src, 2);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  // Land at an odd offset so nothing relies on alignment.
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(rd), 123, kBytes, 77, 9).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return b_.Count(CompletionType::kWriteImm) == 1 && a_.Count(CompletionType::kWriteDone) == 1;
  }));
  auto imm = b_.Take(CompletionType::kWriteImm);
  EXPECT_EQ(imm[0].imm, 77u);
  EXPECT_EQ(imm[0].offset, 123u);
  EXPECT_EQ(imm[0].length, kBytes);
  auto done = a_.Take(CompletionType::kWriteDone);
  EXPECT_TRUE(done[0].status.ok()) << done[0].status.ToString();
  EXPECT_EQ(done[0].context, 9u);
  EXPECT_EQ(Checksum(dst.data() + 123, kBytes), Checksum(src.data(), kBytes));
  EXPECT_EQ(std::memcmp(dst.data() + 123, src.data(), kBytes), 0);
  EXPECT_EQ(dst[122], 0xEE);
  EXPECT_EQ(dst[123 + kBytes], 0xEE);
}

TEST_P(BackendTest, ThousandsOfOutstandingOperationsBothWays) {
  constexpr int kOps = 4000;
  constexpr size_t kChunk = 4096;
  std::vector<uint8_t> a_src(kOps * kChunk), a_dst(kOps * kChunk, 0), b_src(kOps * kChunk),
      b_dst(kOps * kChunk, 0);
  FillRandom(a_src, 3);
  FillRandom(b_src, 4);
  MemoryRegion as = Register(a_, a_src), ad = Register(a_, a_dst);
  MemoryRegion bs = Register(b_, b_src), bd = Register(b_, b_dst);
  // Post everything before anyone polls, interleaving writes and sends.
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, as, i * kChunk, ToRemote(bd), i * kChunk, kChunk, i, i).ok());
    ASSERT_TRUE(b_.backend->PostWrite(0, bs, i * kChunk, ToRemote(ad), i * kChunk, kChunk, i, i).ok());
    if (i % 10 == 0) {
      uint8_t m[4];
      std::memcpy(m, &i, 4);
      ASSERT_TRUE(a_.backend->PostSend(1, m, 100000 + i).ok());
    }
  }
  const size_t sends = (kOps + 9) / 10;
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == kOps && b_.Count(CompletionType::kWriteDone) == kOps &&
           a_.Count(CompletionType::kSendDone) == sends && b_.Count(CompletionType::kWriteImm) == kOps &&
           a_.Count(CompletionType::kWriteImm) == kOps && b_.Count(CompletionType::kRecvMessage) == sends;
  }));
  for (const auto& c : a_.got) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
  for (const auto& c : b_.got) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
  // Writes and sends from one peer arrive in posting order.
  uint32_t next_imm = 0;
  int next_msg = 0;
  for (const auto& c : b_.got) {
    if (c.type == CompletionType::kWriteImm) {
      EXPECT_EQ(c.imm, next_imm++);
    } else if (c.type == CompletionType::kRecvMessage) {
      int v;
      ASSERT_EQ(c.message.size(), 4u);
      std::memcpy(&v, c.message.data(), 4);
      EXPECT_EQ(v, next_msg);
      EXPECT_LE(static_cast<uint32_t>(v), next_imm) << "message overtook a write posted after it";
      next_msg += 10;
    }
  }
  EXPECT_EQ(a_src, b_dst);
  EXPECT_EQ(b_src, a_dst);
}

// Small writes of every size up to a few hundred bytes, many more than any
// small-message ring holds (the verbs mailbox has 128 slots of up to 224 B
// each): every one lands intact, once, in posting order, while the target
// polls concurrently.
TEST_P(BackendTest, SmallWritesOfEverySizeWrapAroundInOrder) {
  constexpr int kWrites = 6000;
  constexpr size_t kStride = 256;
  std::vector<uint8_t> src(kWrites * kStride), dst(kWrites * kStride, 0);
  FillRandom(src, 11);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  auto size_of = [](int i) { return static_cast<uint64_t>(1 + (i * 37) % 256); };
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, ls, i * kStride, ToRemote(rd), i * kStride, size_of(i), i, i).ok());
    if (i % 16 == 0) {
      a_.Pump(0ms);
      b_.Pump(0ms);
    }
  }
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return b_.Count(CompletionType::kWriteImm) == kWrites && a_.Count(CompletionType::kWriteDone) == kWrites;
  }));
  auto imms = b_.Take(CompletionType::kWriteImm);
  std::vector<uint8_t> want(dst.size(), 0);
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_EQ(imms[i].imm, static_cast<uint32_t>(i)) << "at " << i;
    ASSERT_EQ(imms[i].offset, i * kStride);
    ASSERT_EQ(imms[i].length, size_of(i));
    std::memcpy(want.data() + i * kStride, src.data() + i * kStride, size_of(i));
  }
  EXPECT_TRUE(want == dst) << "bytes differ (or were written outside the writes)";
  for (const auto& c : a_.Take(CompletionType::kWriteDone)) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
}

// Small writes, large writes (several message sizes) and control messages
// interleaved: the target sees each write's immediate (after its bytes) and
// each message in exactly the order they were posted.
TEST_P(BackendTest, MixedSmallAndLargeWritesAndSendsKeepPostingOrder) {
  constexpr int kOps = 2500;
  constexpr size_t kStride = 72 * 1024;
  const uint64_t sizes[] = {8, 180, 600, 3000, 70 * 1024};
  std::vector<uint8_t> src((size_t{4} << 20) + kStride), dst(src.size(), 0);
  FillRandom(src, 12);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  // Ops cycle through a write of each size, then a send (len 0). Every write
  // copies src[off, +len) to dst[off, +len), so overlapping writes agree and
  // a write's bytes can be checked when its immediate arrives.
  std::vector<uint64_t> off(kOps), len(kOps);
  for (int i = 0; i < kOps; ++i) {
    off[i] = (static_cast<uint64_t>(i) * 4099) % (src.size() - kStride);
    len[i] = i % 6 == 5 ? 0 : sizes[i % 6];
  }
  std::vector<int> order;  // op index as seen by the target
  bool data_ok = true;
  auto check = [&] {
    for (auto& c : b_.got) {
      if (c.type == CompletionType::kWriteImm) {
        const int i = static_cast<int>(c.imm);
        order.push_back(i);
        if (c.offset != off[i] || c.length != len[i] ||
            std::memcmp(dst.data() + off[i], src.data() + off[i], len[i]) != 0) {
          data_ok = false;
        }
      } else if (c.type == CompletionType::kRecvMessage) {
        int v = -1;
        if (c.message.size() == 4) std::memcpy(&v, c.message.data(), 4);
        order.push_back(v);
      }
    }
    b_.got.clear();
  };
  int next = 0;
  while (next < kOps) {
    const int end = std::min(kOps, next + 40);
    for (; next < end; ++next) {
      if (len[next] == 0) {
        uint8_t m[4];
        std::memcpy(m, &next, 4);
        ASSERT_TRUE(a_.backend->PostSend(1, m, next).ok());
      } else {
        ASSERT_TRUE(
            a_.backend->PostWrite(1, ls, off[next], ToRemote(rd), off[next], len[next], next, next).ok());
      }
    }
    ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
      check();
      return order.size() == static_cast<size_t>(end);
    }));
  }
  EXPECT_TRUE(data_ok);
  for (int i = 0; i < kOps; ++i) ASSERT_EQ(order[i], i) << "posting order broken at " << i;
  ASSERT_TRUE(PumpUntil({&a_}, [&] {
    return a_.Count(CompletionType::kWriteDone) + a_.Count(CompletionType::kSendDone) == kOps;
  }));
  for (const auto& c : a_.got) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
}

TEST_P(BackendTest, ControlMessagesRoundTrip) {
  const size_t max = a_.backend->capabilities().max_control_bytes;
  std::vector<uint8_t> small = {1, 2, 3, 4, 5};
  std::vector<uint8_t> big(max);
  std::iota(big.begin(), big.end(), 0);
  ASSERT_TRUE(a_.backend->PostSend(1, small, 1).ok());
  ASSERT_TRUE(a_.backend->PostSend(1, big, 2).ok());
  ASSERT_TRUE(a_.backend->PostSend(1, {}, 3).ok());
  ASSERT_TRUE(b_.backend->PostSend(0, big, 4).ok());
  std::vector<uint8_t> over(max + 1);
  Status st = a_.backend->PostSend(1, over, 5);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return b_.Count(CompletionType::kRecvMessage) == 3 && a_.Count(CompletionType::kRecvMessage) == 1 &&
           a_.Count(CompletionType::kSendDone) == 3 && b_.Count(CompletionType::kSendDone) == 1;
  }));
  auto at_b = b_.Take(CompletionType::kRecvMessage);
  EXPECT_EQ(at_b[0].message, small);
  EXPECT_EQ(at_b[1].message, big);
  EXPECT_TRUE(at_b[2].message.empty());
  EXPECT_EQ(at_b[0].peer, 0u);
  auto at_a = a_.Take(CompletionType::kRecvMessage);
  EXPECT_EQ(at_a[0].message, big);
  EXPECT_EQ(at_a[0].peer, 1u);
  std::set<uint64_t> ctx;
  for (const auto& c : a_.Take(CompletionType::kSendDone)) {
    EXPECT_TRUE(c.status.ok());
    ctx.insert(c.context);
  }
  EXPECT_EQ(ctx, (std::set<uint64_t>{1, 2, 3}));
}

TEST_P(BackendTest, OutOfRangeWritesRefusedAtPost) {
  std::vector<uint8_t> src(4096), dst(4096);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  RemoteRegion remote = ToRemote(rd);
  auto code = [&](uint64_t loff, uint64_t roff, uint64_t len) {
    return a_.backend->PostWrite(1, ls, loff, remote, roff, len, 0, 0).code();
  };
  EXPECT_EQ(code(4000, 0, 100), StatusCode::kOutOfRange);             // past local end
  EXPECT_EQ(code(0, 4000, 100), StatusCode::kOutOfRange);             // past remote end
  EXPECT_EQ(code(4097, 0, 0), StatusCode::kOutOfRange);               // offset past end
  EXPECT_EQ(code(UINT64_MAX - 10, 0, 100), StatusCode::kOutOfRange);  // wraps
  EXPECT_EQ(code(0, UINT64_MAX - 10, 100), StatusCode::kOutOfRange);
  EXPECT_EQ(code(8, 8, UINT64_MAX - 4), StatusCode::kOutOfRange);
  EXPECT_EQ(code(0, 0, 4096), StatusCode::kOk);
  EXPECT_EQ(code(4096, 4096, 0), StatusCode::kOk);  // empty write at the end is fine

  // A local region that is not (or no longer) ours.
  MemoryRegion forged = ls;
  forged.length = 8192;
  EXPECT_NE(a_.backend->PostWrite(1, forged, 0, remote, 0, 8, 0, 0).code(), StatusCode::kOk);
  ASSERT_TRUE(a_.backend->DeregisterMemory(ls).ok());
  EXPECT_NE(a_.backend->PostWrite(1, ls, 0, remote, 0, 8, 0, 0).code(), StatusCode::kOk);
  // Unknown peer.
  MemoryRegion ls2 = Register(a_, src);
  EXPECT_NE(a_.backend->PostWrite(7, ls2, 0, remote, 0, 8, 0, 0).code(), StatusCode::kOk);
  EXPECT_NE(a_.backend->PostSend(7, src, 0).code(), StatusCode::kOk);

  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kWriteDone) == 2; }));
  for (const auto& c : a_.got) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
}

TEST_P(BackendTest, ForgedRemoteRegionRefusedByReceiver) {
  std::vector<uint8_t> src(8192, 0xAB), dst(8192, 0);
  MemoryRegion ls = Register(a_, src);
  // b registers only the first half; the second half must stay untouched.
  auto rd = b_.backend->RegisterMemory(dst.data(), 4096, MemoryKind::kHost);
  ASSERT_TRUE(rd.ok());
  RemoteRegion forged = ToRemote(*rd);
  forged.length = 8192;
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, forged, 2048, 4096, 1, 11).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kWriteDone) == 1; }));
  auto done = a_.Take(CompletionType::kWriteDone);
  EXPECT_EQ(done[0].context, 11u);
  EXPECT_EQ(done[0].status.code(), StatusCode::kOutOfRange) << done[0].status.ToString();
  EXPECT_NE(done[0].status.message().find("peer 1"), std::string::npos) << done[0].status.ToString();
  EXPECT_EQ(b_.Count(CompletionType::kWriteImm), 0u);
  for (size_t i = 0; i < dst.size(); ++i) ASSERT_EQ(dst[i], 0) << "byte " << i << " was written";

  // The connection keeps working, both ways, for in-range writes.
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, forged, 0, 4096, 2, 12).ok());
  ASSERT_TRUE(b_.backend->PostSend(0, src, 13).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 1 && b_.Count(CompletionType::kWriteImm) == 1 &&
           a_.Count(CompletionType::kRecvMessage) == 1 && b_.Count(CompletionType::kSendDone) == 1;
  }));
  EXPECT_TRUE(a_.Take(CompletionType::kWriteDone)[0].status.ok());
  EXPECT_EQ(b_.Take(CompletionType::kWriteImm)[0].imm, 2u);
  EXPECT_EQ(dst[0], 0xAB);
  EXPECT_EQ(dst[4095], 0xAB);
  EXPECT_EQ(dst[4096], 0);
  EXPECT_EQ(a_.Count(CompletionType::kPeerError) + b_.Count(CompletionType::kPeerError), 0u);
}

TEST_P(BackendTest, StaleKeyAfterReregistrationIsRefused) {
  std::vector<uint8_t> src(4096, 0x5A), dst(4096, 0);
  MemoryRegion ls = Register(a_, src);
  MemoryRegion old_region = Register(b_, dst);
  ASSERT_TRUE(b_.backend->DeregisterMemory(old_region).ok());
  EXPECT_EQ(b_.backend->DeregisterMemory(old_region).code(), StatusCode::kNotFound);
  MemoryRegion new_region = Register(b_, dst);
  EXPECT_EQ(new_region.addr, old_region.addr);
  EXPECT_NE(new_region.key, old_region.key);

  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(old_region), 0, 4096, 1, 1).ok());
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(new_region), 0, 16, 2, 2).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 2 && b_.Count(CompletionType::kWriteImm) == 1;
  }));
  auto done = a_.Take(CompletionType::kWriteDone);
  std::map<uint64_t, Status> by_ctx;
  for (auto& c : done) by_ctx[c.context] = c.status;
  EXPECT_EQ(by_ctx[1].code(), StatusCode::kOutOfRange) << by_ctx[1].ToString();
  EXPECT_TRUE(by_ctx[2].ok()) << by_ctx[2].ToString();
  auto imm = b_.Take(CompletionType::kWriteImm);
  EXPECT_EQ(imm[0].imm, 2u);
  EXPECT_EQ(imm[0].key, new_region.key);
  EXPECT_EQ(dst[15], 0x5A);
  EXPECT_EQ(dst[16], 0);  // the stale write never landed
}

TEST_P(BackendTest, ReadSeesEarlierWrites) {
  if (!a_.backend->capabilities().supports_read) GTEST_SKIP() << "backend offers no PostRead";
  constexpr size_t kBytes = size_t{4} << 20;
  std::vector<uint8_t> src(kBytes), remote(kBytes, 0), back(kBytes, 0);
  FillRandom(src, 8);
  MemoryRegion ls = Register(a_, src), lb = Register(a_, back), r = Register(b_, remote);
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(r), 0, kBytes, 1, 1).ok());
  ASSERT_TRUE(a_.backend->PostRead(1, lb, 0, ToRemote(r), 0, kBytes, 2).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kReadDone) == 1; }));
  EXPECT_TRUE(a_.Take(CompletionType::kReadDone)[0].status.ok());
  EXPECT_EQ(back, src);
}

// For tests that need operations to stay pending: the backends' fallback
// progress (which would otherwise ack on a non-polling node's behalf after a
// millisecond of idleness) is pushed out of the test's reach.
class PendingOpsTest : public BackendTest {
 protected:
  void SetUp() override {
    setenv("ZIPWIRE_TCP_IDLE_PROGRESS_US", "600000000", 1);
    setenv("ZIPWIRE_UCX_IDLE_PROGRESS_US", "600000000", 1);
    setenv("ZIPWIRE_IB_IDLE_PROGRESS_US", "600000000", 1);
    BackendTest::SetUp();
  }
  void TearDown() override {
    unsetenv("ZIPWIRE_TCP_IDLE_PROGRESS_US");
    unsetenv("ZIPWIRE_UCX_IDLE_PROGRESS_US");
    unsetenv("ZIPWIRE_IB_IDLE_PROGRESS_US");
  }
};

// The target goes away with the initiator's operations in flight: each one
// completes exactly once with a status, the peer is reported, later posts
// fail at once, and nothing hangs. `cause`, where given, must appear in the
// peer error (how the loss was noticed).
void RunPeerLoss(Node& a, Node& b, bool destroy, const std::string& cause = "") {
  constexpr int kOps = 64;
  constexpr size_t kChunk = 1 << 20;
  std::vector<uint8_t> src(kOps * kChunk, 1), dst(kOps * kChunk);
  auto ls = a.backend->RegisterMemory(src.data(), src.size(), MemoryKind::kHost);
  auto rd = b.backend->RegisterMemory(dst.data(), dst.size(), MemoryKind::kHost);
  ASSERT_TRUE(ls.ok() && rd.ok());
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(a.backend->PostWrite(1, *ls, i * kChunk, ToRemote(*rd), i * kChunk, kChunk, i, i).ok());
  }
  uint8_t m[16] = {};
  ASSERT_TRUE(a.backend->PostSend(1, m, 1000).ok());
  a.Pump(0ms);  // some of it on the wire, none of it acknowledged (b is not polling)
  if (destroy) {
    b.backend.reset();
  } else {
    b.backend->Close();
  }
  ASSERT_TRUE(PumpUntil({&a}, [&] {
    return a.Count(CompletionType::kWriteDone) == kOps && a.Count(CompletionType::kSendDone) == 1 &&
           a.Count(CompletionType::kPeerError) >= 1;
  }));
  std::set<uint64_t> ctx;
  size_t failed = 0;
  for (const auto& c : a.got) {
    if (c.type == CompletionType::kPeerError) {
      EXPECT_EQ(c.peer, 1u);
      EXPECT_EQ(c.status.code(), StatusCode::kPeerClosed) << c.status.ToString();
      EXPECT_NE(c.status.message().find(cause), std::string::npos) << c.status.ToString();
      continue;
    }
    EXPECT_TRUE(ctx.insert(c.context).second) << "completed twice: " << c.context;
    if (!c.status.ok()) {
      ++failed;
      EXPECT_EQ(c.status.code(), StatusCode::kPeerClosed) << c.status.ToString();
      EXPECT_NE(c.status.message().find("peer 1"), std::string::npos) << c.status.ToString();
    }
  }
  EXPECT_EQ(failed, static_cast<size_t>(kOps) + 1);  // b never polled, so never acknowledged
  Status st = a.backend->PostWrite(1, *ls, 0, ToRemote(*rd), 0, 8, 0, 0);
  EXPECT_EQ(st.code(), StatusCode::kPeerClosed) << st.ToString();
  EXPECT_EQ(a.backend->PostSend(1, m, 0).code(), StatusCode::kPeerClosed);
  // Nothing more arrives for the dead peer.
  size_t before = a.got.size();
  for (int i = 0; i < 10; ++i) a.Pump(1ms);
  EXPECT_EQ(a.got.size(), before);
}

// rdma_cm: the peer's DISCONNECTED event is what reports the loss (at once,
// not after RC retries run out).
std::string LossCause(const std::string& param) {
  return param == "verbs_rdmacm" ? "disconnected (rdma_cm" : "";
}

TEST_P(PendingOpsTest, PeerCloseFailsPendingOperations) {
  RunPeerLoss(a_, b_, /*destroy=*/false, LossCause(GetParam()));
}

TEST_P(PendingOpsTest, PeerDestroyFailsPendingOperations) {
  RunPeerLoss(a_, b_, /*destroy=*/true, LossCause(GetParam()));
}

// Many more small writes than the target's small-message ring holds, posted
// while the target does not poll (the verbs mailbox runs out of credits and
// the rest queue behind it): once the target polls, all arrive intact and in
// order.
TEST_P(PendingOpsTest, SmallWritesBeyondRingCreditsWhileTargetIdle) {
  constexpr int kWrites = 1500;
  std::vector<uint8_t> src(kWrites * 64), dst(kWrites * 64, 0);
  FillRandom(src, 13);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  // Learn the remote key's bounds first (the verbs backend asks once).
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(rd), 0, 64, 0, 0).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kWriteDone) == 1; }));
  a_.got.clear();
  b_.got.clear();
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, ls, i * 64, ToRemote(rd), i * 64, 8 + i % 57, i, i).ok());
    a_.Pump(0ms);  // only the initiator makes progress
  }
  EXPECT_EQ(a_.Count(CompletionType::kWriteDone), 0u);
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return b_.Count(CompletionType::kWriteImm) == kWrites && a_.Count(CompletionType::kWriteDone) == kWrites;
  }));
  auto imms = b_.Take(CompletionType::kWriteImm);
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_EQ(imms[i].imm, static_cast<uint32_t>(i)) << "at " << i;
    ASSERT_EQ(0, std::memcmp(src.data() + i * 64, dst.data() + i * 64, 8 + i % 57)) << "at " << i;
  }
  for (const auto& c : a_.got) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
}

// The target dies with small writes pending (more than its small-message
// ring holds): each one completes exactly once with a status.
TEST_P(PendingOpsTest, PeerDestroyFailsPendingSmallWrites) {
  constexpr int kWrites = 600;
  std::vector<uint8_t> src(kWrites * 16, 7), dst(kWrites * 16);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(rd), 0, 16, 0, 0).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kWriteDone) == 1; }));
  a_.got.clear();
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, ls, i * 16, ToRemote(rd), i * 16, 16, i, i).ok());
    if (i % 32 == 0) a_.Pump(0ms);
  }
  b_.backend.reset();
  ASSERT_TRUE(PumpUntil({&a_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == kWrites && a_.Count(CompletionType::kPeerError) >= 1;
  }));
  std::set<uint64_t> ctx;
  for (const auto& c : a_.got) {
    if (c.type == CompletionType::kPeerError) continue;
    EXPECT_TRUE(ctx.insert(c.context).second) << "completed twice: " << c.context;
    // Closing, the target may still acknowledge what it had received.
    if (!c.status.ok()) {
      EXPECT_EQ(c.status.code(), StatusCode::kPeerClosed) << c.status.ToString();
    }
  }
  EXPECT_EQ(ctx.size(), static_cast<size_t>(kWrites));
}

TEST_P(PendingOpsTest, LocalCloseCancelsPendingOperations) {
  constexpr int kOps = 64;
  constexpr size_t kChunk = 1 << 20;
  std::vector<uint8_t> src(kOps * kChunk, 1), dst(kOps * kChunk);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, ls, i * kChunk, ToRemote(rd), i * kChunk, kChunk, i, i).ok());
  }
  a_.backend->Close();
  a_.backend->Close();  // idempotent
  ASSERT_TRUE(PumpUntil({&a_}, [&] { return a_.Count(CompletionType::kWriteDone) == kOps; }));
  size_t cancelled = 0;
  for (const auto& c : a_.got) {
    if (c.type != CompletionType::kWriteDone || c.status.ok()) continue;
    EXPECT_EQ(c.status.code(), StatusCode::kCancelled) << c.status.ToString();
    ++cancelled;
  }
  EXPECT_EQ(cancelled, static_cast<size_t>(kOps));
  EXPECT_FALSE(a_.backend->PostWrite(1, ls, 0, ToRemote(rd), 0, 8, 0, 0).ok());
  EXPECT_EQ(a_.backend->Poll(std::span<Completion>(), 1ms), 0u);
  // The other side learns that rank 0 went away.
  ASSERT_TRUE(PumpUntil({&b_}, [&] { return b_.Count(CompletionType::kPeerError) == 1; }));
  EXPECT_EQ(b_.Take(CompletionType::kPeerError)[0].peer, 0u);
  a_.backend.reset();
  // dst is still registered with b (which may have been receiving into it):
  // it goes only after DeregisterMemory returns, as for any registration.
  ASSERT_TRUE(b_.backend->DeregisterMemory(rd).ok());
}

TEST_P(BackendTest, PostsFromAnotherThreadWhileOwnerPolls) {
  constexpr int kWrites = 2000;
  std::vector<uint8_t> src(kWrites * 8, 3), dst(kWrites * 8);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  std::atomic<bool> stop{false};
  // b is driven by its own thread; a is polled here while another thread posts.
  std::thread b_poller([&] {
    while (!stop.load()) b_.Pump(5ms);
  });
  std::atomic<int> posted{0};
  std::thread poster([&] {
    for (int i = 0; i < kWrites; ++i) {
      Status st = a_.backend->PostWrite(1, ls, i * 8, ToRemote(rd), i * 8, 8, i, i);
      if (!st.ok()) break;
      posted.fetch_add(1);
    }
  });
  const auto deadline = Clock::now() + kDeadline;
  while (a_.Count(CompletionType::kWriteDone) < static_cast<size_t>(kWrites) && Clock::now() < deadline) {
    a_.Pump(5ms);
  }
  poster.join();
  EXPECT_EQ(posted.load(), kWrites);
  EXPECT_EQ(a_.Count(CompletionType::kWriteDone), static_cast<size_t>(kWrites));
  // Every write is acknowledged, so b's backend has processed all of them;
  // the last completions may still wait in it for a Poll (a backend's helper
  // thread can make progress and ack between the owner's polls). b_.got
  // belongs to its poller until the join.
  stop.store(true);
  b_poller.join();
  ASSERT_TRUE(
      PumpUntil({&b_}, [&] { return b_.Count(CompletionType::kWriteImm) >= static_cast<size_t>(kWrites); }));
  auto imms = b_.Take(CompletionType::kWriteImm);
  ASSERT_EQ(imms.size(), static_cast<size_t>(kWrites));
  for (int i = 0; i < kWrites; ++i) ASSERT_EQ(imms[i].imm, static_cast<uint32_t>(i));
  EXPECT_EQ(src, dst);
}

TEST_P(BackendTest, ConnectToDeadPortIsUnavailable) {
  // Find a port nobody listens on: bind an ephemeral one and release it.
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor probe(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  uint16_t port = probe.local_endpoint().port();
  probe.close();
  auto c = Make(2, 300ms);
  ASSERT_TRUE(c);
  // rdma_cm: the same unused port number, in rdma_cm's port space on the device's address.
  const std::string host = GetParam() == "verbs_rdmacm" ? RdmaCmHost() : "127.0.0.1";
  std::string addr = host + ":" + std::to_string(port);
  Status st = c->Connect(1, addr);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find(addr), std::string::npos) << st.ToString();
  EXPECT_EQ(c->Connect(1, "no-port-here").code(), StatusCode::kInvalidArgument);
}

// A node that posts the moment Connect returns, before the listener has
// polled (or reported the peer), loses nothing: the message and the write
// arrive, after the listener's kPeerConnected for that peer.
TEST_P(BackendTest, PostRightAfterConnectArrives) {
  Node c{Make(2), {}};
  ASSERT_TRUE(c.backend);
  std::vector<uint8_t> src(4096, 7), dst(4096, 0);
  auto ls = c.backend->RegisterMemory(src.data(), src.size(), MemoryKind::kHost);
  MemoryRegion rd = Register(b_, dst);
  ASSERT_TRUE(ls.ok());
  ASSERT_TRUE(c.backend->Connect(1, b_address_).ok());
  const uint8_t hello[5] = {'h', 'e', 'l', 'l', 'o'};
  ASSERT_TRUE(c.backend->PostSend(1, hello, 1).ok());
  ASSERT_TRUE(c.backend->PostWrite(1, *ls, 0, ToRemote(rd), 0, src.size(), 77, 2).ok());
  ASSERT_TRUE(PumpUntil({&c, &b_}, [&] {
    return b_.Count(CompletionType::kRecvMessage) == 1 && b_.Count(CompletionType::kWriteImm) == 1 &&
           c.Count(CompletionType::kWriteDone) == 1;
  }));
  bool connected_first = false;
  for (const auto& e : b_.got) {
    if (e.type == CompletionType::kPeerConnected && e.peer == 2) connected_first = true;
    if (e.type == CompletionType::kRecvMessage) {
      EXPECT_TRUE(connected_first) << "a message from peer 2 came before its kPeerConnected";
      EXPECT_EQ(e.peer, 2u);
      EXPECT_EQ(e.message, std::vector<uint8_t>(hello, hello + 5));
    }
  }
  EXPECT_TRUE(c.Take(CompletionType::kWriteDone)[0].status.ok());
  EXPECT_EQ(src, dst);
}

// rdma_cm: an address no RDMA device reaches (loopback) is refused with a
// status that says so, within the connect timeout.
TEST_P(BackendTest, RdmaCmAddressWithoutDeviceIsUnavailable) {
  if (GetParam() != "verbs_rdmacm") GTEST_SKIP() << "rdma_cm only";
  auto c = Make(2, 2000ms);
  ASSERT_TRUE(c);
  Status st = c->Connect(1, "127.0.0.1:4791");
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("rdma_cm"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("127.0.0.1:4791"), std::string::npos) << st.ToString();
  std::printf("loopback connect: %s\n", st.ToString().c_str());  // the wording, for the log
}

TEST_P(BackendTest, CudaMemoryNotSupported) {
  if (a_.backend->capabilities().SupportsMemory(MemoryKind::kCuda)) GTEST_SKIP() << "backend has a CUDA path";
  std::vector<uint8_t> buf(64);
  auto r = a_.backend->RegisterMemory(buf.data(), buf.size(), MemoryKind::kCuda);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotSupported) << r.status().ToString();
  EXPECT_NE(r.status().message().find("CUDA"), std::string::npos) << r.status().ToString();
}

TEST_P(BackendTest, DuplicateRankIsRefused) {
  // A second node claiming rank 0 is turned away; the first keeps working.
  auto impostor = Make(0);
  ASSERT_TRUE(impostor);
  ASSERT_TRUE(impostor->Connect(1, b_address_).ok());
  Node imp{std::move(impostor), {}};
  std::vector<uint8_t> buf(64, 9), dst(64);
  auto ib = imp.backend->RegisterMemory(buf.data(), buf.size(), MemoryKind::kHost);
  MemoryRegion rd = Register(b_, dst);
  ASSERT_TRUE(ib.ok());
  ASSERT_TRUE(imp.backend->PostWrite(1, *ib, 0, ToRemote(rd), 0, 64, 5, 5).ok());
  ASSERT_TRUE(PumpUntil({&imp, &b_}, [&] { return imp.Count(CompletionType::kWriteDone) == 1; }));
  EXPECT_EQ(imp.Take(CompletionType::kWriteDone)[0].status.code(), StatusCode::kPeerClosed);
  EXPECT_EQ(b_.Count(CompletionType::kPeerConnected), 0u);
  EXPECT_EQ(b_.Count(CompletionType::kWriteImm), 0u);
  EXPECT_EQ(dst[0], 0);

  MemoryRegion ls = Register(a_, buf);
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(rd), 0, 64, 6, 6).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return b_.Count(CompletionType::kWriteImm) == 1; }));
  EXPECT_EQ(dst[0], 9);
}

// Raw bytes at the listen port: the tcp wire format (see tcp_backend.cc).
std::vector<uint8_t> TcpHeader(uint8_t type, uint32_t imm, uint64_t key, uint64_t offset, uint64_t length) {
  std::vector<uint8_t> h(40, 0);
  h[0] = type;
  auto put = [&](size_t at, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) h[at + i] = static_cast<uint8_t>(v >> (8 * i));
  };
  put(4, imm, 4);
  put(16, key, 8);
  put(24, offset, 8);
  put(32, length, 8);
  return h;
}

bool WaitForEof(boost::asio::ip::tcp::socket& s, Node& serving, std::vector<Node*> others) {
  s.non_blocking(true);
  const auto deadline = Clock::now() + kDeadline;
  while (Clock::now() < deadline) {
    serving.Pump();
    for (Node* n : others) n->Pump(0ms);
    uint8_t junk[256];
    boost::system::error_code ec;
    s.read_some(boost::asio::buffer(junk), ec);
    if (ec == boost::asio::error::would_block) continue;
    if (ec) return true;  // EOF or reset: the backend dropped us
  }
  return false;
}

TEST_P(BackendTest, GarbageOnListenPortIsDroppedAndServiceContinues) {
  if (GetParam() != "tcp") GTEST_SKIP() << "raw TCP wire test";
  namespace asio = boost::asio;
  asio::io_context io;
  std::string host = b_address_.substr(0, b_address_.rfind(':'));
  uint16_t port = static_cast<uint16_t>(std::stoi(b_address_.substr(b_address_.rfind(':') + 1)));
  asio::ip::tcp::endpoint ep(asio::ip::make_address(host), port);

  {  // Plain garbage instead of a hello.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    std::string junk = "GET / HTTP/1.1\r\nHost: example\r\n\r\n0123456789abcdef0123456789abcdef";
    asio::write(s, asio::buffer(junk));
    EXPECT_TRUE(WaitForEof(s, b_, {&a_}));
  }
  {  // A valid hello from rank 5, then a frame of unknown type.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    auto hello = TcpHeader(1, 5, 0x317600504354575aull, 1, 0);
    auto bad = TcpHeader(99, 0, 0, 0, 0);
    asio::write(s, asio::buffer(hello));
    asio::write(s, asio::buffer(bad));
    EXPECT_TRUE(WaitForEof(s, b_, {&a_}));
    ASSERT_TRUE(PumpUntil({&b_}, [&] { return b_.Count(CompletionType::kPeerError) == 1; }));
    auto err = b_.Take(CompletionType::kPeerError);
    EXPECT_EQ(err[0].peer, 5u);
    EXPECT_EQ(err[0].status.code(), StatusCode::kPeerClosed);
  }
  {  // A hello, then a SEND claiming a payload far above the limit.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    auto hello = TcpHeader(1, 6, 0x317600504354575aull, 1, 0);
    auto huge = TcpHeader(3, 0, 0, 0, uint64_t{1} << 40);
    asio::write(s, asio::buffer(hello));
    asio::write(s, asio::buffer(huge));
    EXPECT_TRUE(WaitForEof(s, b_, {&a_}));
  }
  {  // Connect and hang up without a word.
    asio::ip::tcp::socket s(io);
    s.connect(ep);
    s.close();
  }
  // Rank 0's connection was never disturbed.
  std::vector<uint8_t> src(1024, 7), dst(1024);
  MemoryRegion ls = Register(a_, src), rd = Register(b_, dst);
  ASSERT_TRUE(a_.backend->PostWrite(1, ls, 0, ToRemote(rd), 0, 1024, 42, 1).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return b_.Count(CompletionType::kWriteImm) == 1 && a_.Count(CompletionType::kWriteDone) == 1;
  }));
  EXPECT_TRUE(a_.Take(CompletionType::kWriteDone)[0].status.ok());
  EXPECT_EQ(dst, src);
  for (const auto& c : b_.got) {
    EXPECT_FALSE(c.type == CompletionType::kPeerError && c.peer == 0) << c.status.ToString();
  }
}

// ---------------------------------------------------------------------------
// Optional section: PostRead (capabilities().supports_read). Backends without
// it must say so with kNotSupported; the rest must honour the contract.

#define ZW_REQUIRE_READ(node)                                      \
  if (!(node).backend->capabilities().supports_read) {             \
    GTEST_SKIP() << GetParam() << " does not claim supports_read"; \
  }

TEST_P(BackendTest, PostReadWithoutCapabilityIsNotSupported) {
  if (a_.backend->capabilities().supports_read) GTEST_SKIP() << GetParam() << " claims supports_read";
  std::vector<uint8_t> buf(64), remote_buf(64);
  MemoryRegion lr = Register(a_, buf), rr = Register(b_, remote_buf);
  EXPECT_EQ(a_.backend->PostRead(1, lr, 0, ToRemote(rr), 0, 8, 0).code(), StatusCode::kNotSupported);
}

TEST_P(BackendTest, ReadsFetchRemoteBytesWithoutTargetCompletions) {
  ZW_REQUIRE_READ(a_);
  constexpr size_t kBig = size_t{64} << 20;
  std::vector<uint8_t> remote_buf(kBig + 4096), local(kBig + 8192, 0xEE);
  FillRandom(remote_buf, 21);
  MemoryRegion lr = Register(a_, local), rr = Register(b_, remote_buf);
  const RemoteRegion remote = ToRemote(rr);
  // 8 B, a page, and 64 MiB from an odd offset into an odd offset.
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 0, remote, 100, 8, 1).ok());
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 8, remote, 4096, 4096, 2).ok());
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 4104 + 3, remote, 555, kBig, 3).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kReadDone) == 3; }));
  std::set<uint64_t> contexts;
  for (const auto& c : a_.Take(CompletionType::kReadDone)) {
    EXPECT_TRUE(c.status.ok()) << c.status.ToString();
    EXPECT_EQ(c.peer, 1u);
    EXPECT_TRUE(contexts.insert(c.context).second) << "duplicate completion " << c.context;
  }
  EXPECT_EQ(contexts, (std::set<uint64_t>{1, 2, 3}));
  EXPECT_EQ(0, std::memcmp(local.data(), remote_buf.data() + 100, 8));
  EXPECT_EQ(0, std::memcmp(local.data() + 8, remote_buf.data() + 4096, 4096));
  EXPECT_EQ(Checksum(local.data() + 4107, kBig), Checksum(remote_buf.data() + 555, kBig));
  EXPECT_EQ(local[4104], 0xEE);  // bytes between the ranges untouched
  EXPECT_EQ(local[4107 + kBig], 0xEE);
  // The target sees nothing: a read is one-sided.
  for (int i = 0; i < 20; ++i) {
    a_.Pump(1ms);
    b_.Pump(1ms);
  }
  EXPECT_TRUE(b_.got.empty()) << CompletionTypeName(b_.got[0].type);
  EXPECT_EQ(a_.Count(CompletionType::kReadDone), 0u);
}

TEST_P(BackendTest, ThousandsOfReadsAndWritesInterleaved) {
  ZW_REQUIRE_READ(a_);
  constexpr int kOps = 4000;
  std::vector<uint8_t> a_buf(kOps * 16), b_buf(kOps * 16, 0);
  FillRandom(a_buf, 22);
  MemoryRegion ar = Register(a_, a_buf), br = Register(b_, b_buf);
  const RemoteRegion remote = ToRemote(br);
  // Write [i*16, +8) then read it back into [i*16 + 8, +8): a read after a
  // write to the same peer sees the write (RC ordering at the target).
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, ar, i * 16, remote, i * 16, 8, i, 2 * i).ok());
    ASSERT_TRUE(a_.backend->PostRead(1, ar, i * 16 + 8, remote, i * 16, 8, 2 * i + 1).ok());
    if (i % 64 == 0) {
      a_.Pump(0ms);
      b_.Pump(0ms);
    }
  }
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kReadDone) >= kOps && a_.Count(CompletionType::kWriteDone) >= kOps &&
           b_.Count(CompletionType::kWriteImm) >= kOps;
  }));
  std::set<uint64_t> contexts;
  for (const auto& c : a_.got) {
    EXPECT_TRUE(c.status.ok()) << c.status.ToString();
    EXPECT_TRUE(contexts.insert(c.context).second) << "duplicate completion " << c.context;
  }
  EXPECT_EQ(contexts.size(), static_cast<size_t>(2 * kOps));
  for (int i = 0; i < kOps; ++i) {
    ASSERT_EQ(0, std::memcmp(a_buf.data() + i * 16, a_buf.data() + i * 16 + 8, 8)) << "read " << i;
  }
}

TEST_P(BackendTest, OutOfRangeReadsRefused) {
  ZW_REQUIRE_READ(a_);
  std::vector<uint8_t> local(8192, 0), remote_buf(8192, 0xAB);
  MemoryRegion lr = Register(a_, local);
  // b registers only the first half.
  auto rr = b_.backend->RegisterMemory(remote_buf.data(), 4096, MemoryKind::kHost);
  ASSERT_TRUE(rr.ok());
  const RemoteRegion remote = ToRemote(*rr);
  auto code = [&](uint64_t loff, uint64_t roff, uint64_t len) {
    return a_.backend->PostRead(1, lr, loff, remote, roff, len, 0).code();
  };
  EXPECT_EQ(code(8000, 0, 200), StatusCode::kOutOfRange);             // past local end
  EXPECT_EQ(code(0, 4000, 100), StatusCode::kOutOfRange);             // past remote end
  EXPECT_EQ(code(UINT64_MAX - 10, 0, 100), StatusCode::kOutOfRange);  // wraps
  EXPECT_EQ(code(0, UINT64_MAX - 10, 100), StatusCode::kOutOfRange);
  EXPECT_EQ(a_.Count(CompletionType::kReadDone), 0u);

  // Ranges the initiator believes in but the target does not: refused there.
  RemoteRegion forged = remote;
  forged.length = 8192;
  RemoteRegion unknown = remote;
  unknown.key += 1000;
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 0, forged, 2048, 4096, 11).ok());
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 0, unknown, 0, 16, 12).ok());
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 4096, forged, 0, 4096, 13).ok());  // in range: fine
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kReadDone) == 3; }));
  std::map<uint64_t, Status> by_ctx;
  for (auto& c : a_.Take(CompletionType::kReadDone)) by_ctx[c.context] = c.status;
  EXPECT_EQ(by_ctx[11].code(), StatusCode::kOutOfRange) << by_ctx[11].ToString();
  EXPECT_EQ(by_ctx[12].code(), StatusCode::kOutOfRange) << by_ctx[12].ToString();
  EXPECT_TRUE(by_ctx[13].ok()) << by_ctx[13].ToString();
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(local[i], 0) << "byte " << i << " was written";
  EXPECT_EQ(local[4096], 0xAB);
  EXPECT_EQ(local[8191], 0xAB);
  EXPECT_EQ(a_.Count(CompletionType::kPeerError) + b_.Count(CompletionType::kPeerError), 0u);
}

// The target goes away with reads outstanding (it never polled, so never
// answered): each read completes exactly once with kPeerClosed.
void RunPeerLossWithReads(Node& a, Node& b, bool destroy) {
  constexpr int kReads = 64;
  constexpr size_t kChunk = 1 << 16;
  std::vector<uint8_t> local(kReads * kChunk), remote_buf(kReads * kChunk, 9);
  auto lr = a.backend->RegisterMemory(local.data(), local.size(), MemoryKind::kHost);
  auto rr = b.backend->RegisterMemory(remote_buf.data(), remote_buf.size(), MemoryKind::kHost);
  ASSERT_TRUE(lr.ok() && rr.ok());
  for (int i = 0; i < kReads; ++i) {
    ASSERT_TRUE(a.backend->PostRead(1, *lr, i * kChunk, ToRemote(*rr), i * kChunk, kChunk, i).ok());
  }
  a.Pump(0ms);
  if (destroy) {
    b.backend.reset();
  } else {
    b.backend->Close();
  }
  ASSERT_TRUE(PumpUntil({&a}, [&] {
    return a.Count(CompletionType::kReadDone) == kReads && a.Count(CompletionType::kPeerError) >= 1;
  }));
  std::set<uint64_t> ctx;
  for (const auto& c : a.Take(CompletionType::kReadDone)) {
    EXPECT_TRUE(ctx.insert(c.context).second) << "completed twice: " << c.context;
    EXPECT_EQ(c.status.code(), StatusCode::kPeerClosed) << c.status.ToString();
  }
  EXPECT_EQ(a.backend->PostRead(1, *lr, 0, ToRemote(*rr), 0, 8, 0).code(), StatusCode::kPeerClosed);
  size_t before = a.got.size();
  for (int i = 0; i < 10; ++i) a.Pump(1ms);
  EXPECT_EQ(a.got.size(), before);
}

TEST_P(PendingOpsTest, PeerCloseFailsPendingReads) {
  ZW_REQUIRE_READ(a_);
  RunPeerLossWithReads(a_, b_, /*destroy=*/false);
}

TEST_P(PendingOpsTest, PeerDestroyFailsPendingReads) {
  ZW_REQUIRE_READ(a_);
  RunPeerLossWithReads(a_, b_, /*destroy=*/true);
}

TEST_P(PendingOpsTest, LocalCloseCancelsPendingReads) {
  ZW_REQUIRE_READ(a_);
  std::vector<uint8_t> local(1 << 20), remote_buf(1 << 20);
  MemoryRegion lr = Register(a_, local), rr = Register(b_, remote_buf);
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(a_.backend->PostRead(1, lr, 0, ToRemote(rr), 0, 4096, i).ok());
  a_.backend->Close();
  ASSERT_TRUE(PumpUntil({&a_}, [&] { return a_.Count(CompletionType::kReadDone) == 16; }));
  for (const auto& c : a_.Take(CompletionType::kReadDone)) {
    EXPECT_EQ(c.status.code(), StatusCode::kCancelled) << c.status.ToString();
  }
  // b may still be serving those reads: they can have reached it before a
  // went, and b's own threads (ucx: the socket thread, which takes in what a
  // sent once a's liveness socket closes) answer them while this test only
  // pumps a. Its region's memory must stay valid until DeregisterMemory
  // returns, which waits for (or cuts off) the responses in flight; freeing
  // remote_buf before that was a use-after-free in UCX (it packed a queued
  // response from the freed vector when b's endpoint finished its wireup).
  ASSERT_TRUE(b_.backend->DeregisterMemory(rr).ok());
}

// The target deregisters the region before it gets to a read of it: the read
// is refused, and nothing is gathered from memory the target gave up.
TEST_P(PendingOpsTest, ReadOfRegionDeregisteredMeanwhileIsRefused) {
  ZW_REQUIRE_READ(a_);
  std::vector<uint8_t> local(4096, 0), remote_buf(4096, 0x77);
  MemoryRegion lr = Register(a_, local), rr = Register(b_, remote_buf);
  ASSERT_TRUE(a_.backend->PostRead(1, lr, 0, ToRemote(rr), 0, 4096, 5).ok());
  a_.Pump(0ms);
  ASSERT_TRUE(b_.backend->DeregisterMemory(rr).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kReadDone) == 1; }));
  auto done = a_.Take(CompletionType::kReadDone);
  EXPECT_FALSE(done[0].status.ok());
  EXPECT_EQ(done[0].context, 5u);
  for (size_t i = 0; i < local.size(); ++i) ASSERT_EQ(local[i], 0) << "byte " << i;
}

// A peer that asks for far more than its socket drains: the target's
// DeregisterMemory still returns (bounded), and the memory is not touched
// afterwards.
TEST_P(PendingOpsTest, DeregisterWhileResponsesStreamReturns) {
  ZW_REQUIRE_READ(a_);
  constexpr size_t kBytes = size_t{64} << 20;
  std::vector<uint8_t> local(kBytes), remote_buf(kBytes, 0x42);
  MemoryRegion lr = Register(a_, local), rr = Register(b_, remote_buf);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(a_.backend->PostRead(1, lr, 0, ToRemote(rr), 0, kBytes, i).ok());
  // b answers (its socket fills: a does not poll), then deregisters.
  for (int i = 0; i < 50; ++i) b_.Pump(1ms);
  const auto t0 = Clock::now();
  ASSERT_TRUE(b_.backend->DeregisterMemory(rr).ok());
  EXPECT_LT(Clock::now() - t0, kDeadline);
  std::fill(remote_buf.begin(), remote_buf.end(), 0);  // b may reuse the memory now
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kReadDone) == 4; }));
  // A read that succeeded got the bytes as they were before the deregistration.
  bool any_ok = false;
  for (const auto& c : a_.Take(CompletionType::kReadDone)) any_ok |= c.status.ok();
  if (any_ok) {
    for (size_t i = 0; i < kBytes; i += 4096) ASSERT_EQ(local[i], 0x42) << i;
  }
}

// ---------------------------------------------------------------------------
// The optional AllocateMemory section: backend-owned registered memory (ucx:
// shared memory that a same-host peer writes directly, with its immediates
// through a mailbox). Skipped for backends without supports_alloc.

#define SKIP_WITHOUT_ALLOC()                                                       \
  if (!a_.backend->capabilities().supports_alloc) {                                \
    EXPECT_EQ(a_.backend->AllocateMemory(4096, MemoryKind::kHost).status().code(), \
              StatusCode::kNotSupported);                                          \
    GTEST_SKIP() << GetParam() << " does not claim supports_alloc";                \
  }

MemoryRegion Allocate(Node& n, size_t bytes) {
  auto r = n.backend->AllocateMemory(bytes, MemoryKind::kHost);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  if (!r.ok()) return MemoryRegion{};
  EXPECT_NE(r->addr, nullptr);
  EXPECT_EQ(r->length, bytes);
  EXPECT_EQ(r->kind, MemoryKind::kHost);
  return *r;
}

// One write from a to `remote`, waited for: afterwards the initiator knows
// how to reach the region (ucx: maps it), so what follows takes the fast path.
void WarmUp(Node& a, Node& b, const MemoryRegion& local, const RemoteRegion& remote) {
  ASSERT_TRUE(a.backend->PostWrite(1, local, 0, remote, 0, 8, 0xfffffff0u, 0xfff0).ok());
  ASSERT_TRUE(PumpUntil({&a, &b}, [&] {
    return a.Count(CompletionType::kWriteDone) == 1 && b.Count(CompletionType::kWriteImm) == 1;
  }));
  EXPECT_TRUE(a.Take(CompletionType::kWriteDone)[0].status.ok());
  b.Take(CompletionType::kWriteImm);
  // The rkey answer may trail the first write's ack: give it a few rounds.
  for (int i = 0; i < 20; ++i) {
    a.Pump(1ms);
    b.Pump(0ms);
  }
}

TEST_P(BackendTest, AllocatedMemoryIsWritableLikeRegistered) {
  SKIP_WITHOUT_ALLOC();
  constexpr int kWrites = 3000;
  constexpr size_t kChunk = 256;
  MemoryRegion src = Allocate(a_, kWrites * kChunk);
  MemoryRegion dst = Allocate(b_, kWrites * kChunk);
  EXPECT_NE(src.key, 0u);
  std::vector<uint8_t> pattern(kWrites * kChunk);
  FillRandom(pattern, 21);
  std::memcpy(src.addr, pattern.data(), pattern.size());
  std::memset(dst.addr, 0, dst.length);
  WarmUp(a_, b_, src, ToRemote(dst));
  // Writes of every size (0 .. kChunk) with sends in between: order and
  // exactly-once across whatever paths the backend mixes.
  for (int i = 0; i < kWrites; ++i) {
    const uint64_t len = (i % 7 == 0) ? 0 : kChunk - (i % 3);
    ASSERT_TRUE(a_.backend->PostWrite(1, src, i * kChunk, ToRemote(dst), i * kChunk, len, i, i).ok());
    if (i % 10 == 0) {
      uint8_t m[4];
      std::memcpy(m, &i, 4);
      ASSERT_TRUE(a_.backend->PostSend(1, m, 100000 + i).ok());
    }
    if (i % 128 == 0) {
      a_.Pump(0ms);
      b_.Pump(0ms);
    }
  }
  const size_t sends = (kWrites + 9) / 10;
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == kWrites && a_.Count(CompletionType::kSendDone) == sends &&
           b_.Count(CompletionType::kWriteImm) == kWrites && b_.Count(CompletionType::kRecvMessage) == sends;
  }));
  for (const auto& c : a_.got) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
  uint32_t next_imm = 0;
  int next_msg = 0;
  for (const auto& c : b_.got) {
    if (c.type == CompletionType::kWriteImm) {
      ASSERT_EQ(c.imm, next_imm) << "immediates out of order";
      EXPECT_EQ(c.key, dst.key);
      EXPECT_EQ(c.offset, uint64_t{next_imm} * kChunk);
      EXPECT_EQ(c.length, (next_imm % 7 == 0) ? 0u : kChunk - (next_imm % 3));
      // The bytes are there when the immediate is.
      if (c.length > 0) {
        ASSERT_EQ(
            std::memcmp(static_cast<uint8_t*>(dst.addr) + c.offset, pattern.data() + c.offset, c.length), 0)
            << "write " << next_imm;
      }
      ++next_imm;
    } else if (c.type == CompletionType::kRecvMessage) {
      int v;
      ASSERT_EQ(c.message.size(), 4u);
      std::memcpy(&v, c.message.data(), 4);
      EXPECT_EQ(v, next_msg);
      // Message v was posted right after write v.
      EXPECT_EQ(static_cast<uint32_t>(v) + 1, next_imm) << "a message and the writes around it out of order";
      next_msg += 10;
    }
  }
  a_.got.clear();
  b_.got.clear();
  // A large write into allocated memory, from registered memory.
  constexpr size_t kBig = size_t{16} << 20;
  std::vector<uint8_t> big(kBig);
  FillRandom(big, 22);
  MemoryRegion lbig = Register(a_, big);
  MemoryRegion rbig = Allocate(b_, kBig + 64);
  std::memset(rbig.addr, 0xEE, rbig.length);
  WarmUp(a_, b_, lbig, ToRemote(rbig));
  ASSERT_TRUE(a_.backend->PostWrite(1, lbig, 0, ToRemote(rbig), 32, kBig, 5, 5).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 1 && b_.Count(CompletionType::kWriteImm) == 1;
  }));
  EXPECT_TRUE(a_.Take(CompletionType::kWriteDone)[0].status.ok());
  const auto* landed = static_cast<const uint8_t*>(rbig.addr);
  EXPECT_EQ(Checksum(landed + 32, kBig), Checksum(big.data(), kBig));
  EXPECT_EQ(landed[31], 0xEE);
  EXPECT_EQ(landed[32 + kBig], 0xEE);
  for (const MemoryRegion& r : {src, lbig}) EXPECT_TRUE(a_.backend->DeregisterMemory(r).ok());
  for (const MemoryRegion& r : {dst, rbig}) EXPECT_TRUE(b_.backend->DeregisterMemory(r).ok());
}

TEST_P(BackendTest, AllocatedMemoryWritesLandInPostingOrder) {
  SKIP_WITHOUT_ALLOC();
  MemoryRegion src = Allocate(a_, 4096);
  MemoryRegion dst = Allocate(b_, 4096);
  auto* s = static_cast<uint8_t*>(src.addr);
  auto* d = static_cast<uint8_t*>(dst.addr);
  std::memset(d, 0, dst.length);
  WarmUp(a_, b_, src, ToRemote(dst));
  // Overlapping writes posted back to back, small (ucx: inline in the
  // mailbox slot) and large, in both orders: the later one wins.
  std::memset(s, 0x11, 64);        // [0, 64): small then large
  std::memset(s + 64, 0x22, 64);   // [64, 128)
  std::memset(s + 128, 0x33, 8);   // [128, 136): large then small
  std::memset(s + 136, 0x44, 64);  // [136, 200)
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, ToRemote(dst), 0, 8, 1, 1).ok());
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 64, ToRemote(dst), 0, 64, 2, 2).ok());
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 136, ToRemote(dst), 256, 64, 3, 3).ok());
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 128, ToRemote(dst), 256, 8, 4, 4).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 4 && b_.Count(CompletionType::kWriteImm) == 4;
  }));
  for (const auto& c : a_.Take(CompletionType::kWriteDone)) EXPECT_TRUE(c.status.ok()) << c.status.ToString();
  for (int i = 0; i < 64; ++i) ASSERT_EQ(d[i], 0x22) << "byte " << i;
  for (int i = 0; i < 8; ++i) ASSERT_EQ(d[256 + i], 0x33) << "byte " << 256 + i;
  for (int i = 8; i < 64; ++i) ASSERT_EQ(d[256 + i], 0x44) << "byte " << 256 + i;
  // A read posted right after a small write sees it.
  if (a_.backend->capabilities().supports_read) {
    MemoryRegion back = Allocate(a_, 4096);
    std::memset(back.addr, 0, back.length);
    std::memset(s + 512, 0x5C, 8);
    ASSERT_TRUE(a_.backend->PostWrite(1, src, 512, ToRemote(dst), 1024, 8, 5, 5).ok());
    ASSERT_TRUE(a_.backend->PostRead(1, back, 0, ToRemote(dst), 1024, 8, 6).ok());
    ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kReadDone) == 1; }));
    EXPECT_TRUE(a_.Take(CompletionType::kReadDone)[0].status.ok());
    for (int i = 0; i < 8; ++i) EXPECT_EQ(static_cast<uint8_t*>(back.addr)[i], 0x5C) << i;
  }
}

TEST_P(BackendTest, AllocatedMemoryRangesAreEnforced) {
  SKIP_WITHOUT_ALLOC();
  MemoryRegion src = Allocate(a_, 8192);
  std::memset(src.addr, 0xAB, src.length);
  MemoryRegion dst = Allocate(b_, 4096);
  auto* d = static_cast<uint8_t*>(dst.addr);
  std::memset(d, 0, dst.length);
  WarmUp(a_, b_, src, ToRemote(dst));
  std::memset(d, 0, dst.length);
  // Refused at post.
  EXPECT_EQ(a_.backend->PostWrite(1, src, 0, ToRemote(dst), 4000, 100, 0, 0).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(a_.backend->PostWrite(1, src, 8100, ToRemote(dst), 0, 100, 0, 0).code(), StatusCode::kOutOfRange);
  // A forged RemoteRegion (longer than the allocation) is refused as a
  // whole, and nothing of it lands.
  RemoteRegion forged = ToRemote(dst);
  forged.length = 8192;
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, forged, 2048, 4096, 1, 11).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] { return a_.Count(CompletionType::kWriteDone) == 1; }));
  auto done = a_.Take(CompletionType::kWriteDone);
  EXPECT_EQ(done[0].status.code(), StatusCode::kOutOfRange) << done[0].status.ToString();
  EXPECT_EQ(b_.Count(CompletionType::kWriteImm), 0u);
  for (size_t i = 0; i < dst.length; ++i) ASSERT_EQ(d[i], 0) << "byte " << i << " was written";
  // The connection goes on working.
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, forged, 0, 4096, 2, 12).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 1 && b_.Count(CompletionType::kWriteImm) == 1;
  }));
  EXPECT_TRUE(a_.Take(CompletionType::kWriteDone)[0].status.ok());
  EXPECT_EQ(b_.Take(CompletionType::kWriteImm)[0].imm, 2u);
  EXPECT_EQ(d[0], 0xAB);
  EXPECT_EQ(d[4095], 0xAB);
  EXPECT_EQ(a_.Count(CompletionType::kPeerError) + b_.Count(CompletionType::kPeerError), 0u);
}

TEST_P(BackendTest, FreedAllocationRefusesWritesAndKeysAreNotReused) {
  SKIP_WITHOUT_ALLOC();
  MemoryRegion src = Allocate(a_, 4096);
  std::memset(src.addr, 0x5A, src.length);
  MemoryRegion old_region = Allocate(b_, 4096);
  WarmUp(a_, b_, src, ToRemote(old_region));  // a knows (ucx: maps) the old region
  ASSERT_TRUE(b_.backend->DeregisterMemory(old_region).ok());
  EXPECT_EQ(b_.backend->DeregisterMemory(old_region).code(), StatusCode::kNotFound);
  MemoryRegion new_region = Allocate(b_, 4096);
  EXPECT_NE(new_region.key, old_region.key);
  std::memset(new_region.addr, 0, new_region.length);
  // A write through the stale key is refused; the new allocation (which may
  // sit where the old one was) sees none of it.
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, ToRemote(old_region), 0, 4096, 1, 1).ok());
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, ToRemote(new_region), 0, 16, 2, 2).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 2 && b_.Count(CompletionType::kWriteImm) == 1;
  }));
  std::map<uint64_t, Status> by_ctx;
  for (auto& c : a_.Take(CompletionType::kWriteDone)) by_ctx[c.context] = c.status;
  EXPECT_EQ(by_ctx[1].code(), StatusCode::kOutOfRange) << by_ctx[1].ToString();
  EXPECT_TRUE(by_ctx[2].ok()) << by_ctx[2].ToString();
  auto imm = b_.Take(CompletionType::kWriteImm);
  EXPECT_EQ(imm[0].imm, 2u);
  EXPECT_EQ(imm[0].key, new_region.key);
  const auto* n = static_cast<const uint8_t*>(new_region.addr);
  EXPECT_EQ(n[15], 0x5A);
  for (size_t i = 16; i < new_region.length; ++i) ASSERT_EQ(n[i], 0) << "stale write landed at " << i;
  // Writes go on after the refusal (the stale mapping is dropped).
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, ToRemote(old_region), 0, 8, 3, 3).ok());
  ASSERT_TRUE(a_.backend->PostWrite(1, src, 0, ToRemote(new_region), 16, 16, 4, 4).ok());
  ASSERT_TRUE(PumpUntil({&a_, &b_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == 2 && b_.Count(CompletionType::kWriteImm) == 1;
  }));
  by_ctx.clear();
  for (auto& c : a_.Take(CompletionType::kWriteDone)) by_ctx[c.context] = c.status;
  EXPECT_EQ(by_ctx[3].code(), StatusCode::kOutOfRange) << by_ctx[3].ToString();
  EXPECT_TRUE(by_ctx[4].ok()) << by_ctx[4].ToString();
  // Many allocations and frees: keys stay unique.
  std::set<uint64_t> keys = {src.key, old_region.key, new_region.key};
  for (int i = 0; i < 50; ++i) {
    MemoryRegion r = Allocate(b_, 4096 * (1 + i % 3));
    EXPECT_TRUE(keys.insert(r.key).second) << "key " << r.key << " reused";
    ASSERT_TRUE(b_.backend->DeregisterMemory(r).ok());
  }
}

TEST_P(PendingOpsTest, PeerCloseFailsPendingWritesToAllocatedMemory) {
  SKIP_WITHOUT_ALLOC();
  constexpr int kOps = 64;
  constexpr size_t kChunk = 64 << 10;
  MemoryRegion src = Allocate(a_, kOps * kChunk);
  MemoryRegion dst = Allocate(b_, kOps * kChunk);
  WarmUp(a_, b_, src, ToRemote(dst));
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(a_.backend->PostWrite(1, src, i * kChunk, ToRemote(dst), i * kChunk, kChunk, i, i).ok());
  }
  a_.Pump(0ms);  // b does not poll: nothing is acknowledged
  b_.backend->Close();
  ASSERT_TRUE(PumpUntil({&a_}, [&] {
    return a_.Count(CompletionType::kWriteDone) == kOps && a_.Count(CompletionType::kPeerError) >= 1;
  }));
  std::set<uint64_t> ctx;
  for (const auto& c : a_.Take(CompletionType::kWriteDone)) {
    EXPECT_TRUE(ctx.insert(c.context).second) << "completed twice: " << c.context;
    EXPECT_EQ(c.status.code(), StatusCode::kPeerClosed) << c.status.ToString();
  }
  EXPECT_EQ(a_.backend->PostWrite(1, src, 0, ToRemote(dst), 0, 8, 0, 0).code(), StatusCode::kPeerClosed);
  EXPECT_TRUE(a_.backend->DeregisterMemory(src).ok());
}

// The backends built into this binary. verbs tests skip where no RDMA device
// exists (the host); they run for real in the soft-RoCE guest (ctest -L
// softroce). Tests are named by backend ("/verbs") so filters can pick one.
std::vector<std::string> TestBackends() {
  std::vector<std::string> names = {"tcp"};
#ifdef ZIPWIRE_HAVE_UCX
  names.push_back("ucx");
  names.push_back("ucx_shm");
#endif
#ifdef ZIPWIRE_HAVE_VERBS
  names.push_back("verbs");
#endif
#ifdef ZIPWIRE_HAVE_RDMACM
  names.push_back("verbs_rdmacm");
#endif
  return names;
}
std::string BackendName(const ::testing::TestParamInfo<std::string>& info) { return info.param; }
INSTANTIATE_TEST_SUITE_P(Backends, BackendTest, ::testing::ValuesIn(TestBackends()), BackendName);
INSTANTIATE_TEST_SUITE_P(Backends, PendingOpsTest, ::testing::ValuesIn(TestBackends()), BackendName);

TEST(BackendFactoryTest, UnknownBackendListsBuiltOnes) {
  auto made = CreateBackend("carrier-pigeon", BackendOptions{});
  ASSERT_FALSE(made.ok());
  EXPECT_EQ(made.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(made.status().message().find("tcp"), std::string::npos) << made.status().ToString();
}

TEST(RemoteRegionTest, WireEncodingIsLittleEndianAndRoundTrips) {
  RemoteRegion r{0x0102030405060708ull, 0x1112131415161718ull, 0x2122232425262728ull};
  uint8_t wire[kRemoteRegionWireBytes];
  EncodeRemoteRegion(r, wire);
  EXPECT_EQ(wire[0], 0x08);
  EXPECT_EQ(wire[7], 0x01);
  EXPECT_EQ(wire[8], 0x18);
  EXPECT_EQ(wire[23], 0x21);
  RemoteRegion back = DecodeRemoteRegion(wire);
  EXPECT_EQ(back.key, r.key);
  EXPECT_EQ(back.addr, r.addr);
  EXPECT_EQ(back.length, r.length);
}

TEST(NamesTest, EnumsHaveNames) {
  EXPECT_STREQ(MemoryKindName(MemoryKind::kHost), "host");
  EXPECT_STREQ(MemoryKindName(MemoryKind::kCuda), "cuda");
  EXPECT_STREQ(CompletionTypeName(CompletionType::kWriteImm), "WRITE_IMM");
  EXPECT_STREQ(CompletionTypeName(CompletionType::kPeerError), "PEER_ERROR");
}

}  // namespace
}  // namespace zipwire::transport
