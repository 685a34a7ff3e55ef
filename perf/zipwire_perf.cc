// zipwire_perf: an ib_write_bw / ib_write_lat style benchmark over a zipwire
// transport backend (transport/backend.h), so that a backend can be compared
// with perftest on RDMA hardware and with iperf3 / qperf on TCP.
//
//   server:  zipwire_perf [options]
//   client:  zipwire_perf [options] HOST
//
// The client connects (rank 1 -> rank 0), both sides register one buffer of
// the largest message size and swap RemoteRegions and parameters over control
// messages (PostSend / kRecvMessage):
//
//   HELLO  client -> server  "ZWPF" u8 version=1 u8 kind=1 u8 test u8 pad
//                            u32 tx_depth u64 iters u64 warmup u32 n_sizes
//                            n_sizes x u64 bytes, 24-byte RemoteRegion
//   REPLY  server -> client  "ZWPF" u8 version u8 kind=2 u8 ok u8 pad,
//                            24-byte RemoteRegion, then an error text if !ok
//   BYE    client -> server  "ZWPF" u8 version u8 kind=3 u16 pad
//
// write_bw: for every size the client keeps up to tx_depth PostWrites
// outstanding (perftest's tx-depth) after `warmup` untimed writes; the server
// counts kWriteImm and checks each length. write_lat: ping-pong of writes with
// immediates, each side writing when it has received; t = round trip / 2 as in
// ib_write_lat. The server exits after one client run, like perftest.
#include <getopt.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/status.h"
#include "transport/backend.h"

namespace zipwire::perf {
namespace {

using transport::Backend;
using transport::Completion;
using transport::CompletionType;
using transport::MemoryRegion;
using transport::PeerId;
using transport::RemoteRegion;
using Clock = std::chrono::steady_clock;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr PeerId kServerRank = 0;
constexpr PeerId kClientRank = 1;
// perftest reports MB/sec with MB = 2^20 bytes unless asked otherwise.
constexpr double kMB = 1048576.0;
constexpr uint64_t kMaxSizes = 64;

enum class Test : uint8_t { kWriteBw = 1, kWriteLat = 2 };

const char* TestName(Test t) { return t == Test::kWriteBw ? "write_bw" : "write_lat"; }

struct Options {
  std::string transport = "tcp";
  uint16_t port = 18515;
  uint64_t size = 0;  // 0: the test's default
  bool all = false;
  uint64_t iters = 0;  // 0: the test's default
  Test test = Test::kWriteBw;
  std::string json;
  uint32_t tx_depth = 128;
  uint64_t timeout_ms = 10000;
  std::string bind = "0.0.0.0";
  bool events = false;  // block in Poll instead of spinning (perftest -e)
  std::string host;     // empty: server
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "Usage:\n"
               "  zipwire_perf [options]        start a server and wait for one client run\n"
               "  zipwire_perf [options] HOST   run the client against the server on HOST\n"
               "\n"
               "Options:\n"
               "  -t, --transport NAME   transport backend (default tcp; the only one built now)\n"
               "  -p, --port N           server port (default 18515)\n"
               "  -s, --size BYTES       message size, e.g. 65536, 64K, 1M (default 65536 for\n"
               "                         write_bw, 2 for write_lat)\n"
               "  -a, --all              sizes 2 B .. 8 MiB in powers of two\n"
               "  -n, --iters N          timed iterations per size (default 5000 write_bw,\n"
               "                         1000 write_lat)\n"
               "      --test NAME        write_bw (default) or write_lat\n"
               "      --tx-depth N       outstanding writes in write_bw (default 128)\n"
               "      --timeout SEC      give up after SEC seconds without progress, and bound\n"
               "                         the client's connect retries (default 10)\n"
               "      --bind HOST        server listen address (default 0.0.0.0)\n"
               "  -e, --events           block in Poll instead of busy-polling (perftest -e)\n"
               "      --json FILE        client: also write the results as JSON to FILE\n"
               "  -h, --help             this text\n"
               "\n"
               "Output follows perftest. MB/sec uses MB = 2^20 bytes (perftest's default);\n"
               "the JSON *_MBps fields use the same unit. BW average = bytes / (last\n"
               "completion - first post); BW peak = best rate over any max(8 x tx-depth,\n"
               "iters/10) consecutive writes (post of the first to completion of the last);\n"
               "MsgRate = writes / elapsed in 10^6 per second. write_lat reports\n"
               "t = round trip / 2 in usec; t_typical is the median.\n"
               "Exit status: 0 success, 1 run failure (no server, peer lost, timeout),\n"
               "2 usage error.\n");
}

int UsageError(const std::string& why) {
  std::fprintf(stderr, "zipwire_perf: %s\nTry 'zipwire_perf --help'.\n", why.c_str());
  return kExitUsage;
}

bool ParseUint(const char* text, uint64_t max, uint64_t* out) {
  if (text == nullptr || *text == '\0') return false;
  uint64_t v = 0;
  for (const char* p = text; *p; ++p) {
    if (*p < '0' || *p > '9') return false;
    if (v > (max - static_cast<uint64_t>(*p - '0')) / 10) return false;
    v = v * 10 + static_cast<uint64_t>(*p - '0');
  }
  *out = v;
  return true;
}

// Returns -1 to go on, or the exit status.
int ParseArgs(int argc, char** argv, Options* opt) {
  enum { kTest = 1000, kJson, kTxDepth, kTimeout, kBind };
  static const option kLong[] = {{"transport", required_argument, nullptr, 't'},
                                 {"port", required_argument, nullptr, 'p'},
                                 {"size", required_argument, nullptr, 's'},
                                 {"all", no_argument, nullptr, 'a'},
                                 {"iters", required_argument, nullptr, 'n'},
                                 {"test", required_argument, nullptr, kTest},
                                 {"json", required_argument, nullptr, kJson},
                                 {"tx-depth", required_argument, nullptr, kTxDepth},
                                 {"timeout", required_argument, nullptr, kTimeout},
                                 {"bind", required_argument, nullptr, kBind},
                                 {"events", no_argument, nullptr, 'e'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  opterr = 0;  // we print our own messages
  bool size_given = false;
  while (true) {
    int idx = 0;
    int c = getopt_long(argc, argv, ":t:p:s:an:eh", kLong, &idx);
    if (c == -1) break;
    uint64_t v = 0;
    switch (c) {
      case 't':
        opt->transport = optarg;
        break;
      case 'p':
        if (!ParseUint(optarg, 65535, &v) || v == 0)
          return UsageError("bad --port '" + std::string(optarg) + "'");
        opt->port = static_cast<uint16_t>(v);
        break;
      case 's': {
        auto bytes = ParseBytes(optarg);
        if (!bytes.ok() || *bytes == 0) return UsageError("bad --size '" + std::string(optarg) + "'");
        opt->size = *bytes;
        size_given = true;
        break;
      }
      case 'a':
        opt->all = true;
        break;
      case 'n':
        if (!ParseUint(optarg, uint64_t{1} << 40, &v) || v == 0) {
          return UsageError("bad --iters '" + std::string(optarg) + "'");
        }
        opt->iters = v;
        break;
      case kTest:
        if (std::strcmp(optarg, "write_bw") == 0) {
          opt->test = Test::kWriteBw;
        } else if (std::strcmp(optarg, "write_lat") == 0) {
          opt->test = Test::kWriteLat;
        } else {
          return UsageError("unknown --test '" + std::string(optarg) + "' (write_bw or write_lat)");
        }
        break;
      case kJson:
        opt->json = optarg;
        break;
      case kTxDepth:
        if (!ParseUint(optarg, 1 << 16, &v) || v == 0)
          return UsageError("bad --tx-depth '" + std::string(optarg) + "'");
        opt->tx_depth = static_cast<uint32_t>(v);
        break;
      case kTimeout:
        if (!ParseUint(optarg, 86400, &v) || v == 0)
          return UsageError("bad --timeout '" + std::string(optarg) + "'");
        opt->timeout_ms = v * 1000;
        break;
      case kBind:
        opt->bind = optarg;
        break;
      case 'e':
        opt->events = true;
        break;
      case 'h':
        PrintUsage(stdout);
        return 0;
      case ':':
        return UsageError(std::string("option ") + argv[optind - 1] + " needs a value");
      default:
        return UsageError(std::string("unknown option ") + argv[optind - 1]);
    }
  }
  if (optind < argc) opt->host = argv[optind++];
  if (optind < argc) return UsageError(std::string("unexpected argument '") + argv[optind] + "'");
  if (opt->all && size_given) return UsageError("--all and --size exclude each other");
  if (opt->size == 0) opt->size = opt->test == Test::kWriteBw ? 65536 : 2;
  if (opt->iters == 0) opt->iters = opt->test == Test::kWriteBw ? 5000 : 1000;
  return -1;
}

// ---------------------------------------------------------------------------
// Control messages

constexpr uint8_t kMagic[4] = {'Z', 'W', 'P', 'F'};
constexpr uint8_t kVersion = 1;
enum MsgKind : uint8_t { kHello = 1, kReply = 2, kBye = 3 };

struct Hello {
  Test test = Test::kWriteBw;
  uint32_t tx_depth = 0;
  uint64_t iters = 0;
  uint64_t warmup = 0;
  std::vector<uint64_t> sizes;
  RemoteRegion region;
};

void Put(std::vector<uint8_t>* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t Get(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

std::vector<uint8_t> Header(MsgKind kind, uint8_t arg) {
  std::vector<uint8_t> out(kMagic, kMagic + 4);
  out.push_back(kVersion);
  out.push_back(kind);
  out.push_back(arg);
  out.push_back(0);
  return out;
}

void PutRegion(std::vector<uint8_t>* out, const RemoteRegion& r) {
  uint8_t buf[transport::kRemoteRegionWireBytes];
  transport::EncodeRemoteRegion(r, buf);
  out->insert(out->end(), buf, buf + sizeof(buf));
}

Status CheckHeader(const std::vector<uint8_t>& m, MsgKind kind) {
  if (m.size() < 8 || std::memcmp(m.data(), kMagic, 4) != 0) {
    return Corrupt("not a zipwire_perf control message (is the peer zipwire_perf?)");
  }
  if (m[4] != kVersion) return Corrupt("peer speaks zipwire_perf protocol version " + std::to_string(m[4]));
  if (m[5] != kind) return Corrupt("unexpected control message kind " + std::to_string(m[5]));
  return Status::Ok();
}

std::vector<uint8_t> EncodeHello(const Hello& h) {
  std::vector<uint8_t> out = Header(kHello, static_cast<uint8_t>(h.test));
  Put(&out, h.tx_depth, 4);
  Put(&out, h.iters, 8);
  Put(&out, h.warmup, 8);
  Put(&out, h.sizes.size(), 4);
  for (uint64_t s : h.sizes) Put(&out, s, 8);
  PutRegion(&out, h.region);
  return out;
}

Result<Hello> DecodeHello(const std::vector<uint8_t>& m, uint64_t max_write) {
  ZW_RETURN_IF_ERROR(CheckHeader(m, kHello));
  Hello h;
  if (m[6] != static_cast<uint8_t>(Test::kWriteBw) && m[6] != static_cast<uint8_t>(Test::kWriteLat)) {
    return Corrupt("unknown test " + std::to_string(m[6]));
  }
  h.test = static_cast<Test>(m[6]);
  if (m.size() < 8 + 24) return Corrupt("short HELLO");
  h.tx_depth = static_cast<uint32_t>(Get(&m[8], 4));
  h.iters = Get(&m[12], 8);
  h.warmup = Get(&m[20], 8);
  uint64_t n = Get(&m[28], 4);
  if (n == 0 || n > kMaxSizes) return Corrupt("HELLO lists " + std::to_string(n) + " sizes");
  if (m.size() != 32 + n * 8 + transport::kRemoteRegionWireBytes)
    return Corrupt("HELLO has the wrong length");
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t s = Get(&m[32 + i * 8], 8);
    if (s == 0 || s > max_write)
      return Corrupt("size " + std::to_string(s) + " is not 1.." + std::to_string(max_write));
    h.sizes.push_back(s);
  }
  if (h.iters == 0 || h.iters > (uint64_t{1} << 40) || h.warmup > h.iters || h.tx_depth == 0) {
    return Corrupt("bad iteration parameters in HELLO");
  }
  h.region = transport::DecodeRemoteRegion(&m[32 + n * 8]);
  return h;
}

// ---------------------------------------------------------------------------
// Completion pump with an inactivity deadline.

class Pump {
 public:
  Pump(Backend* backend, std::chrono::milliseconds idle_timeout)
      : backend_(backend), idle_timeout_(idle_timeout), last_progress_(Clock::now()) {}

  // Polls once (up to `slice`) and hands every completion to `on`. Fails on
  // kPeerError, on a failed completion, on `on` failing, and when nothing has
  // happened for idle_timeout.
  template <typename F>
  Status Once(F&& on, std::chrono::milliseconds slice = std::chrono::milliseconds(100)) {
    size_t n = backend_->Poll(buf_, slice);
    auto now = Clock::now();
    if (n == 0) {
      if (now - last_progress_ > idle_timeout_) {
        return Timeout("no progress for " + std::to_string(idle_timeout_.count() / 1000) + " s");
      }
      return Status::Ok();
    }
    last_progress_ = now;
    for (size_t i = 0; i < n; ++i) {
      Completion& c = buf_[i];
      if (c.type == CompletionType::kPeerError) return c.status.WithContext("peer " + std::to_string(c.peer));
      if (!c.status.ok()) {
        return c.status.WithContext(std::string(transport::CompletionTypeName(c.type)) + " failed");
      }
      ZW_RETURN_IF_ERROR(on(c));
    }
    return Status::Ok();
  }

  void Touch() { last_progress_ = Clock::now(); }

 private:
  Backend* backend_;
  std::chrono::milliseconds idle_timeout_;
  Clock::time_point last_progress_;
  Completion buf_[64];
};

// Waits for a control message from `peer`, letting `other` see the rest.
Result<std::vector<uint8_t>> WaitMessage(Pump& pump, PeerId peer) {
  std::vector<uint8_t> got;
  bool done = false;
  while (!done) {
    ZW_RETURN_IF_ERROR(pump.Once([&](Completion& c) {
      if (c.type == CompletionType::kRecvMessage && c.peer == peer && !done) {
        got = std::move(c.message);
        done = true;
      }
      return Status::Ok();
    }));
  }
  return got;
}

// A page-aligned registered buffer.
struct Buffer {
  std::unique_ptr<uint8_t, void (*)(void*)> mem{nullptr, std::free};
  MemoryRegion region;
};

Result<Buffer> MakeBuffer(Backend& backend, uint64_t bytes) {
  Buffer b;
  uint64_t rounded = (bytes + 4095) / 4096 * 4096;
  b.mem.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, rounded)));
  if (!b.mem)
    return Status(StatusCode::kResourceExhausted, "cannot allocate " + std::to_string(bytes) + " bytes");
  // Touch every page so that first-touch faults are not measured.
  for (uint64_t i = 0; i < rounded; ++i) b.mem.get()[i] = static_cast<uint8_t>(i * 131);
  ZW_ASSIGN_OR_RETURN(b.region, backend.RegisterMemory(b.mem.get(), rounded, transport::MemoryKind::kHost));
  return b;
}

std::vector<uint64_t> Sizes(const Options& opt) {
  std::vector<uint64_t> out;
  if (opt.all) {
    for (uint64_t s = 2; s <= (uint64_t{8} << 20); s *= 2) out.push_back(s);
  } else {
    out.push_back(opt.size);
  }
  return out;
}

// Untimed iterations before each size: lets TCP open its window and the
// caches warm, as perftest's warm-up does.
uint64_t Warmup(Test test, uint64_t iters, uint32_t tx_depth) {
  return test == Test::kWriteBw ? std::min<uint64_t>(iters, tx_depth) : std::min<uint64_t>(iters / 10, 100);
}

const char* kRule =
    "---------------------------------------------------------------------------------------\n";

// ---------------------------------------------------------------------------
// Server

int RunServer(const Options& opt, Backend& backend) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "zipwire_perf server: error: %s\n", st.ToString().c_str());
    return kExitError;
  };
  auto addr = backend.Listen();
  if (!addr.ok()) return fail(addr.status());
  std::printf("zipwire_perf server on %s (transport %s); waiting for one client run\n", addr->c_str(),
              opt.transport.c_str());
  std::fflush(stdout);

  // Like perftest, the server waits for its client without a deadline.
  PeerId peer = transport::kInvalidPeer;
  // One completion at a time: the client's parameters may arrive right
  // behind kPeerConnected and must stay queued for WaitMessage below.
  Completion buf[1];
  while (peer == transport::kInvalidPeer) {
    size_t n = backend.Poll(buf, std::chrono::milliseconds(1000));
    for (size_t i = 0; i < n; ++i) {
      if (buf[i].type == CompletionType::kPeerConnected) {
        peer = buf[i].peer;
        break;
      }
    }
  }
  Pump pump(&backend, std::chrono::milliseconds(opt.timeout_ms));
  auto hello_msg = WaitMessage(pump, peer);
  if (!hello_msg.ok()) return fail(hello_msg.status().WithContext("waiting for the client's parameters"));
  auto hello = DecodeHello(*hello_msg, backend.capabilities().max_write_bytes);
  if (!hello.ok()) {
    std::vector<uint8_t> reply = Header(kReply, 0);
    PutRegion(&reply, RemoteRegion{});
    std::string why = hello.status().message();
    reply.insert(reply.end(), why.begin(), why.end());
    static_cast<void>(backend.PostSend(peer, reply, 0));
    // Give the refusal a moment to leave before the connection closes.
    static_cast<void>(pump.Once([](Completion&) { return Status::Ok(); }));
    return fail(hello.status().WithContext("client parameters"));
  }
  uint64_t max_size = *std::max_element(hello->sizes.begin(), hello->sizes.end());
  if (hello->region.length < max_size) return fail(Corrupt("client region is smaller than its largest size"));
  auto buffer = MakeBuffer(backend, max_size);
  if (!buffer.ok()) return fail(buffer.status());
  std::vector<uint8_t> reply = Header(kReply, 1);
  PutRegion(&reply, transport::ToRemote(buffer->region));
  if (Status st = backend.PostSend(peer, reply, 0); !st.ok()) return fail(st);
  std::printf("client rank %u: %s, %zu size(s), %" PRIu64 " iterations (+%" PRIu64 " warm-up)\n", peer,
              TestName(hello->test), hello->sizes.size(), hello->iters, hello->warmup);
  std::fflush(stdout);

  // Expected writes, in order: for each size, warmup + iters of that length.
  const uint64_t per_size = hello->warmup + hello->iters;
  const uint64_t expected = per_size * hello->sizes.size();
  uint64_t received = 0, bytes = 0, echo_ctx = 0;
  bool bye = false;
  // write_lat busy-polls like perftest so the echo is not delayed by a wakeup.
  const auto slice = std::chrono::milliseconds(hello->test == Test::kWriteLat && !opt.events ? 0 : 100);
  while (!bye) {
    Status st = pump.Once(
        [&](Completion& c) -> Status {
          if (c.peer != peer) return Status::Ok();
          if (c.type == CompletionType::kWriteImm) {
            if (received >= expected) return Corrupt("more writes than announced");
            uint64_t want = hello->sizes[received / per_size];
            if (c.length != want) {
              return Corrupt("write " + std::to_string(received) + " has " + std::to_string(c.length) +
                             " bytes, expected " + std::to_string(want));
            }
            ++received;
            bytes += c.length;
            if (hello->test == Test::kWriteLat) {
              return backend.PostWrite(peer, buffer->region, 0, hello->region, 0, c.length, c.imm,
                                       echo_ctx++);
            }
          } else if (c.type == CompletionType::kRecvMessage) {
            ZW_RETURN_IF_ERROR(CheckHeader(c.message, kBye));
            bye = true;
          }
          return Status::Ok();
        },
        slice);
    if (!st.ok()) return fail(st.WithContext("after " + std::to_string(received) + " writes"));
  }
  if (received != expected) {
    return fail(Corrupt("client said goodbye after " + std::to_string(received) + " of " +
                        std::to_string(expected) + " writes"));
  }
  std::printf("done: %" PRIu64 " writes, %" PRIu64 " bytes received\n", received, bytes);
  return 0;
}

// ---------------------------------------------------------------------------
// Client

struct BwRow {
  uint64_t bytes = 0, iters = 0;
  double peak = 0, avg = 0, mpps = 0;
};
struct LatRow {
  uint64_t bytes = 0, iters = 0;
  double t_min = 0, t_max = 0, t_typical = 0, t_avg = 0, t999 = 0;
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

Result<BwRow> RunBw(Backend& backend, Pump& pump, const Buffer& buf, const RemoteRegion& remote,
                    uint64_t size, uint64_t iters, uint64_t warmup, uint32_t tx_depth,
                    std::chrono::milliseconds slice) {
  const uint64_t total = warmup + iters;
  std::vector<Clock::time_point> posted(total), completed(total);
  uint64_t n_posted = 0, n_done = 0;
  pump.Touch();
  // Posts [n_posted, end) keeping at most tx_depth outstanding, until all of
  // them completed (completions arrive in posting order).
  auto run = [&](uint64_t end) -> Status {
    while (n_done < end) {
      while (n_posted < end && n_posted - n_done < tx_depth) {
        posted[n_posted] = Clock::now();
        ZW_RETURN_IF_ERROR(backend.PostWrite(kServerRank, buf.region, 0, remote, 0, size,
                                             static_cast<uint32_t>(n_posted), n_posted));
        ++n_posted;
      }
      ZW_RETURN_IF_ERROR(pump.Once(
          [&](Completion& c) -> Status {
            if (c.type != CompletionType::kWriteDone) return Status::Ok();
            if (c.context >= total)
              return Internal("completion for unknown write " + std::to_string(c.context));
            completed[c.context] = Clock::now();
            ++n_done;
            return Status::Ok();
          },
          slice));
    }
    return Status::Ok();
  };
  ZW_RETURN_IF_ERROR(run(warmup));  // untimed, drained before the timed part
  ZW_RETURN_IF_ERROR(run(total));
  BwRow row;
  row.bytes = size;
  row.iters = iters;
  const double elapsed = Seconds(completed[total - 1] - posted[warmup]);
  row.avg = static_cast<double>(size) * static_cast<double>(iters) / elapsed / kMB;
  row.mpps = static_cast<double>(iters) / elapsed / 1e6;
  // Peak as perftest defines it, (completed[j] - posted[i]) / (j - i + 1)
  // minimised, but over windows of a fixed m writes so that it stays O(n)
  // and one batch of completions cannot fake a burst: m is large against
  // tx_depth, so the window's one queueing delay costs at most ~1/8.
  const uint64_t m = std::min<uint64_t>(iters, std::max<uint64_t>(uint64_t{8} * tx_depth, iters / 10));
  double best = 0;
  for (uint64_t j = warmup + m - 1; j < total; ++j) {
    double dt = Seconds(completed[j] - posted[j + 1 - m]);
    if (dt > 0) best = std::max(best, static_cast<double>(size) * static_cast<double>(m) / dt / kMB);
  }
  row.peak = std::max(best, row.avg);
  return row;
}

Result<LatRow> RunLat(Backend& backend, Pump& pump, const Buffer& buf, const RemoteRegion& remote,
                      uint64_t size, uint64_t iters, uint64_t warmup, std::chrono::milliseconds slice) {
  std::vector<double> samples;
  samples.reserve(iters);
  pump.Touch();
  for (uint64_t i = 0; i < warmup + iters; ++i) {
    auto t0 = Clock::now();
    ZW_RETURN_IF_ERROR(
        backend.PostWrite(kServerRank, buf.region, 0, remote, 0, size, static_cast<uint32_t>(i), i));
    bool echoed = false;
    while (!echoed) {
      ZW_RETURN_IF_ERROR(pump.Once(
          [&](Completion& c) -> Status {
            if (c.type != CompletionType::kWriteImm) return Status::Ok();
            if (c.imm != static_cast<uint32_t>(i) || c.length != size) {
              return Corrupt("echo " + std::to_string(c.imm) + " of " + std::to_string(c.length) +
                             " bytes, expected " + std::to_string(i));
            }
            echoed = true;
            return Status::Ok();
          },
          slice));
    }
    auto t1 = Clock::now();
    if (i >= warmup) samples.push_back(Seconds(t1 - t0) * 1e6 / 2);
  }
  std::vector<double> sorted = samples;
  std::sort(sorted.begin(), sorted.end());
  LatRow row;
  row.bytes = size;
  row.iters = iters;
  row.t_min = sorted.front();
  row.t_max = sorted.back();
  row.t_typical = sorted[sorted.size() / 2];
  double sum = 0;
  for (double s : sorted) sum += s;
  row.t_avg = sum / static_cast<double>(sorted.size());
  size_t idx = static_cast<size_t>(std::ceil(0.999 * static_cast<double>(sorted.size()))) - 1;
  row.t999 = sorted[std::min(idx, sorted.size() - 1)];
  return row;
}

Status WriteJson(const Options& opt, const std::vector<BwRow>& bw, const std::vector<LatRow>& lat) {
  FILE* f = std::fopen(opt.json.c_str(), "w");
  if (f == nullptr) return IoError("cannot write " + opt.json + ": " + std::strerror(errno));
  std::fprintf(f, "{\"transport\": \"%s\", \"test\": \"%s\", \"mb_bytes\": 1048576, \"results\": [",
               opt.transport.c_str(), TestName(opt.test));
  for (size_t i = 0; i < bw.size(); ++i) {
    std::fprintf(f,
                 "%s\n  {\"bytes\": %" PRIu64 ", \"iterations\": %" PRIu64
                 ", \"bw_peak_MBps\": %.2f, \"bw_avg_MBps\": %.2f, \"msg_rate_Mpps\": %.6f}",
                 i ? "," : "", bw[i].bytes, bw[i].iters, bw[i].peak, bw[i].avg, bw[i].mpps);
  }
  for (size_t i = 0; i < lat.size(); ++i) {
    std::fprintf(f,
                 "%s\n  {\"bytes\": %" PRIu64 ", \"iterations\": %" PRIu64
                 ", \"t_min_us\": %.3f, \"t_max_us\": %.3f, \"t_typical_us\": %.3f, \"t_avg_us\": %.3f"
                 ", \"t999_us\": %.3f}",
                 i ? "," : "", lat[i].bytes, lat[i].iters, lat[i].t_min, lat[i].t_max, lat[i].t_typical,
                 lat[i].t_avg, lat[i].t999);
  }
  std::fprintf(f, "\n]}\n");
  if (std::fclose(f) != 0) return IoError("cannot write " + opt.json + ": " + std::strerror(errno));
  return Status::Ok();
}

int RunClient(const Options& opt, Backend& backend) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "zipwire_perf client: error: %s\n", st.ToString().c_str());
    return kExitError;
  };
  const bool v6 = opt.host.find(':') != std::string::npos && opt.host.front() != '[';
  const std::string server = (v6 ? "[" + opt.host + "]" : opt.host) + ":" + std::to_string(opt.port);
  if (Status st = backend.Connect(kServerRank, server); !st.ok()) {
    return fail(st.WithContext("no zipwire_perf server reachable at " + server));
  }
  const std::vector<uint64_t> sizes = Sizes(opt);
  const uint64_t max_size = *std::max_element(sizes.begin(), sizes.end());
  if (max_size > backend.capabilities().max_write_bytes) {
    return fail(InvalidArgument("size " + std::to_string(max_size) + " exceeds the backend's max write of " +
                                std::to_string(backend.capabilities().max_write_bytes)));
  }
  auto buffer = MakeBuffer(backend, max_size);
  if (!buffer.ok()) return fail(buffer.status());
  Hello hello;
  hello.test = opt.test;
  hello.tx_depth = opt.tx_depth;
  hello.iters = opt.iters;
  hello.warmup = Warmup(opt.test, opt.iters, opt.tx_depth);
  hello.sizes = sizes;
  hello.region = transport::ToRemote(buffer->region);
  if (Status st = backend.PostSend(kServerRank, EncodeHello(hello), 0); !st.ok()) return fail(st);

  Pump pump(&backend, std::chrono::milliseconds(opt.timeout_ms));
  auto reply = WaitMessage(pump, kServerRank);
  if (!reply.ok()) return fail(reply.status().WithContext("waiting for the server's reply"));
  if (Status st = CheckHeader(*reply, kReply); !st.ok()) return fail(st);
  if (reply->size() < 8 + transport::kRemoteRegionWireBytes) return fail(Corrupt("short REPLY"));
  if ((*reply)[6] != 1) {
    std::string why(reply->begin() + 8 + transport::kRemoteRegionWireBytes, reply->end());
    return fail(FailedPrecondition("server refused the run: " + why));
  }
  const RemoteRegion remote = transport::DecodeRemoteRegion(reply->data() + 8);
  if (remote.length < max_size) return fail(Corrupt("server region is smaller than the largest size"));

  std::printf("%s", kRule);
  std::printf("                    RDMA_Write %s Test (zipwire, transport %s)\n",
              opt.test == Test::kWriteBw ? "BW" : "Latency", opt.transport.c_str());
  std::printf(" Server: %s   Iterations: %" PRIu64 "   Warm-up: %" PRIu64, server.c_str(), opt.iters,
              hello.warmup);
  if (opt.test == Test::kWriteBw) std::printf("   TX depth: %u", opt.tx_depth);
  std::printf("\n%s", kRule);
  if (opt.test == Test::kWriteBw) {
    std::printf(" #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n");
  } else {
    std::printf(
        " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    "
        "t99.9[usec]\n");
  }
  std::fflush(stdout);

  // Busy-polling (a zero slice) as perftest does unless --events.
  const auto slice = std::chrono::milliseconds(opt.events ? 100 : 0);
  std::vector<BwRow> bw_rows;
  std::vector<LatRow> lat_rows;
  for (uint64_t size : sizes) {
    if (opt.test == Test::kWriteBw) {
      auto row = RunBw(backend, pump, *buffer, remote, size, opt.iters, hello.warmup, opt.tx_depth, slice);
      if (!row.ok()) return fail(row.status().WithContext("write_bw " + std::to_string(size) + " B"));
      std::printf(" %-7" PRIu64 "    %-7" PRIu64 "          %-7.2f            %-7.2f            %-7.6f\n",
                  row->bytes, row->iters, row->peak, row->avg, row->mpps);
      bw_rows.push_back(*row);
    } else {
      auto row = RunLat(backend, pump, *buffer, remote, size, opt.iters, hello.warmup, slice);
      if (!row.ok()) return fail(row.status().WithContext("write_lat " + std::to_string(size) + " B"));
      std::printf(" %-7" PRIu64 " %-7" PRIu64
                  "        %-7.2f        %-7.2f      %-7.2f          %-7.2f        %-7.2f\n",
                  row->bytes, row->iters, row->t_min, row->t_max, row->t_typical, row->t_avg, row->t999);
      lat_rows.push_back(*row);
    }
    std::fflush(stdout);
  }
  std::printf("%s", kRule);

  // Goodbye, and wait until it has left so the server sees it.
  if (Status st = backend.PostSend(kServerRank, Header(kBye, 0), ~uint64_t{0}); !st.ok()) return fail(st);
  bool sent = false;
  while (!sent) {
    Status st = pump.Once([&](Completion& c) {
      if (c.type == CompletionType::kSendDone && c.context == ~uint64_t{0}) sent = true;
      return Status::Ok();
    });
    // The server exits once it has the goodbye: its going away may arrive in
    // the same batch as the goodbye's completion, and is no failure then.
    if (!st.ok() && !sent) return fail(st.WithContext("saying goodbye"));
  }
  if (!opt.json.empty()) {
    if (Status st = WriteJson(opt, bw_rows, lat_rows); !st.ok()) return fail(st);
  }
  return 0;
}

int Main(int argc, char** argv) {
  Options opt;
  int rc = ParseArgs(argc, argv, &opt);
  if (rc >= 0) return rc;
  transport::BackendOptions bopt;
  bopt.self = opt.host.empty() ? kServerRank : kClientRank;
  bopt.listen_host = opt.bind;
  bopt.listen_port = opt.port;
  bopt.connect_timeout = std::chrono::milliseconds(opt.timeout_ms);
  auto backend = transport::CreateBackend(opt.transport, bopt);
  if (!backend.ok()) {
    if (backend.status().code() == StatusCode::kNotSupported) {
      return UsageError("--transport " + opt.transport + ": " + backend.status().message());
    }
    std::fprintf(stderr, "zipwire_perf: error: %s\n", backend.status().ToString().c_str());
    return kExitError;
  }
  (*backend)->SetLocalRank(bopt.self);
  rc = opt.host.empty() ? RunServer(opt, **backend) : RunClient(opt, **backend);
  (*backend)->Close();
  return rc;
}

}  // namespace
}  // namespace zipwire::perf

int main(int argc, char** argv) { return zipwire::perf::Main(argc, argv); }
