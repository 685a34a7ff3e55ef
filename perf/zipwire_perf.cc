// zipwire_perf: a perftest-style benchmark (ib_write_bw, ib_read_bw,
// ib_send_bw, ib_write_lat, ib_send_lat) over a zipwire transport backend
// (transport/backend.h), so that a backend can be compared with perftest on
// RDMA devices, with ucx_perftest, and with iperf3 / qperf on TCP.
//
//   server:  zipwire_perf [options]
//   client:  zipwire_perf [options] HOST
//
// The client connects (rank 1 -> rank 0), both sides register one buffer and
// swap RemoteRegions and parameters over control messages (PostSend /
// kRecvMessage), all integers little-endian:
//
//   HELLO   client -> server  "ZWPF" u8 version=2 u8 kind=1 u8 test u8 flags
//                             (bit 0: bidir), u32 tx_depth u64 iters u64 warmup
//                             u32 n_sizes, n_sizes x u64 bytes, 24-byte
//                             RemoteRegion, u32 codec_len, codec spec text
//   REPLY   server -> client  "ZWPF" u8 version u8 kind=2 u8 ok u8 pad,
//                             24-byte RemoteRegion, then an error text if !ok
//   BYE     client -> server  "ZWPF" u8 version u8 kind=3 u16 pad
//   RESULT  server -> client  "ZWPF" u8 version u8 kind=4 u16 pad, u32 rows,
//                             rows x {f64 peak, f64 avg, f64 mpps} (--bidir)
//   CREDIT  server -> client  "ZWPF" u8 version u8 kind=5 u16 pad, u64 decoded
//                             (--codec write_bw: messages decoded so far)
//
// *_bw: for every size the initiator keeps up to tx_depth operations
// outstanding (perftest's tx-depth) after `warmup` untimed ones; the target
// counts what arrives and checks each length. With --bidir the server runs
// the same loop toward the client at the same time and reports its rows in
// RESULT; the client prints the sums (perftest -b). *_lat: ping-pong, each
// side answering when it has received; t = round trip / 2 as in ib_write_lat.
// write_lat writes from a send area of the buffer into the peer's receive
// area at offset 0 (separate pages, as perftest's and ucx_perftest's latency
// tests keep separate send and receive buffers), so an answer does not read
// the bytes that just landed; with --codec the answer echoes the encoded
// message from where it landed and the client decodes it.
// read_bw uses the contract's optional PostRead; send_* use PostSend (at most
// capabilities().max_control_bytes per message).
//
// --codec SPEC (write_bw, write_lat): the client compresses every message
// (kernels' codec, fp32 input of size/4 floats) into a slot of its registered
// buffer and writes the encoded bytes; the server decodes each one from its
// region into a float buffer. The server returns CREDITs so that a slot is
// written again only after the server has decoded it. Reported: wire MB/s
// (encoded bytes) beside effective MB/s (fp32 bytes they stand for).
// The server exits after one client run, like perftest.
#include <getopt.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#ifdef ZIPWIRE_PERF_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "core/config.h"
#include "core/status.h"
#include "kernels/codec.h"
#include "perf/transport_choice.h"
#include "transport/backend.h"

namespace zipwire::perf {
namespace {

using transport::Backend;
using transport::Completion;
using transport::CompletionType;
using transport::MemoryKind;
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
constexpr uint64_t kMaxAllBytes = uint64_t{8} << 20;
constexpr size_t kMaxCodecSpec = 256;

enum class Test : uint8_t { kWriteBw = 1, kWriteLat = 2, kReadBw = 3, kSendBw = 4, kSendLat = 5 };
constexpr Test kTests[] = {Test::kWriteBw, Test::kWriteLat, Test::kReadBw, Test::kSendBw, Test::kSendLat};

const char* TestName(Test t) {
  switch (t) {
    case Test::kWriteBw:
      return "write_bw";
    case Test::kWriteLat:
      return "write_lat";
    case Test::kReadBw:
      return "read_bw";
    case Test::kSendBw:
      return "send_bw";
    case Test::kSendLat:
      return "send_lat";
  }
  return "?";
}
bool IsBw(Test t) { return t == Test::kWriteBw || t == Test::kReadBw || t == Test::kSendBw; }
bool IsSend(Test t) { return t == Test::kSendBw || t == Test::kSendLat; }
bool IsKnownTest(uint8_t v) {
  return std::any_of(std::begin(kTests), std::end(kTests),
                     [v](Test t) { return static_cast<uint8_t>(t) == v; });
}

struct Options {
  std::string transport = "tcp";
  std::string auto_reason;  // -t auto: why this backend
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
  bool bidir = false;
  bool gpu = false;
  bool caller_memory = false;  // register our own buffers even where the backend can allocate them
  std::string codec;           // empty: plain bytes
  std::string ib_device, ib_gid_index, ib_qps;  // -d / -x / -q (verbs only)
  bool rdma_cm = false;                         // -R (verbs only)
  std::string host;                             // empty: server
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "Usage:\n"
               "  zipwire_perf [options]        start a server and wait for one client run\n"
               "  zipwire_perf [options] HOST   run the client against the server on HOST\n"
               "\n"
               "Options:\n"
               "  -t, --transport NAME   tcp (default), ucx, verbs, or auto: verbs when an\n"
               "                         ibverbs device has an ACTIVE port, else ucx when built,\n"
               "                         else tcp (it prints which and why)\n"
               "  -d, --ib-dev DEV       verbs: RDMA device (ZIPWIRE_IB_DEVICE)\n"
               "  -x, --gid-index N      verbs: GID index (ZIPWIRE_IB_GID_INDEX)\n"
               "  -q, --qp N             verbs: RC QPs per peer, writes striped (ZIPWIRE_IB_QPS)\n"
               "  -R, --rdma_cm          verbs: connect the QPs through rdma_cm (perftest -R;\n"
               "                         ZIPWIRE_IB_CM=rdmacm); the server's --bind and the\n"
               "                         client's HOST are then addresses on RDMA devices\n"
               "  -p, --port N           server port (default 18515)\n"
               "  -s, --size BYTES       message size, e.g. 65536, 64K, 1M (default 65536 for\n"
               "                         *_bw, 2 for *_lat; with --codec 4096 for write_lat)\n"
               "  -a, --all              sizes 2 B .. 8 MiB in powers of two (send_*: up to the\n"
               "                         backend's max_control_bytes; --codec: from 4 B)\n"
               "  -n, --iters N          timed iterations per size (default 5000 *_bw,\n"
               "                         1000 *_lat)\n"
               "      --test NAME        write_bw (default), write_lat, read_bw, send_bw, send_lat\n"
               "  -b, --bidir            *_bw: both sides post at once; the client reports\n"
               "                         the sum of both directions (perftest -b)\n"
               "      --gpu              register CUDA device memory (write_*, read_bw; needs a\n"
               "                         CUDA build, a device, and a backend that takes it)\n"
               "      --caller-memory    register buffers we allocate ourselves (RegisterMemory)\n"
               "                         even where the backend can allocate registered memory\n"
               "                         (capabilities().supports_alloc, e.g. ucx: shared memory\n"
               "                         a same-host peer writes directly, as ucx_perftest's)\n"
               "      --codec SPEC       write_bw / write_lat: compress each message with this\n"
               "                         codec (e.g. onebit, fp16, topk:0.01) before the write;\n"
               "                         the target decodes it into fp32. Reports wire and\n"
               "                         effective (uncompressed fp32) MB/s side by side\n"
               "      --tx-depth N       outstanding operations in *_bw (default 128)\n"
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
               "iters/10) consecutive operations (post of the first to completion of the\n"
               "last); MsgRate = operations / elapsed in 10^6 per second. *_lat report\n"
               "t = round trip / 2 in usec; t_typical is the median. With --codec, BW is\n"
               "wire bytes; \"wire_MBps\" and \"effective_MBps\" join the JSON rows.\n"
               "Exit status: 0 success, 1 run failure (no server, peer lost, timeout),\n"
               "2 usage error (bad flags, or a combination the backend cannot run).\n");
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
  enum { kTest = 1000, kJson, kTxDepth, kTimeout, kBind, kGpu, kCodec, kCallerMemory };
  static const option kLong[] = {{"transport", required_argument, nullptr, 't'},
                                 {"ib-dev", required_argument, nullptr, 'd'},
                                 {"gid-index", required_argument, nullptr, 'x'},
                                 {"qp", required_argument, nullptr, 'q'},
                                 {"rdma_cm", no_argument, nullptr, 'R'},
                                 {"port", required_argument, nullptr, 'p'},
                                 {"size", required_argument, nullptr, 's'},
                                 {"all", no_argument, nullptr, 'a'},
                                 {"iters", required_argument, nullptr, 'n'},
                                 {"test", required_argument, nullptr, kTest},
                                 {"bidir", no_argument, nullptr, 'b'},
                                 {"gpu", no_argument, nullptr, kGpu},
                                 {"caller-memory", no_argument, nullptr, kCallerMemory},
                                 {"codec", required_argument, nullptr, kCodec},
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
    int c = getopt_long(argc, argv, ":t:d:x:q:Rp:s:an:beh", kLong, &idx);
    if (c == -1) break;
    uint64_t v = 0;
    switch (c) {
      case 't':
        opt->transport = optarg;
        if (opt->transport != "tcp" && opt->transport != "ucx" && opt->transport != "verbs" &&
            opt->transport != "auto") {
          return UsageError("unknown --transport '" + opt->transport + "' (tcp, ucx, verbs or auto)");
        }
        break;
      case 'd':
        if (*optarg == '\0') return UsageError("empty --ib-dev");
        opt->ib_device = optarg;
        break;
      case 'x':
        if (!ParseUint(optarg, 255, &v)) return UsageError("bad --gid-index '" + std::string(optarg) + "'");
        opt->ib_gid_index = std::to_string(v);
        break;
      case 'q':
        if (!ParseUint(optarg, 1024, &v) || v == 0)
          return UsageError("bad --qp '" + std::string(optarg) + "'");
        opt->ib_qps = std::to_string(v);
        break;
      case 'R':
        opt->rdma_cm = true;
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
      case kTest: {
        bool found = false;
        for (Test t : kTests) {
          if (std::strcmp(optarg, TestName(t)) == 0) {
            opt->test = t;
            found = true;
          }
        }
        if (!found) {
          return UsageError("unknown --test '" + std::string(optarg) +
                            "' (write_bw, write_lat, read_bw, send_bw or send_lat)");
        }
        break;
      }
      case 'b':
        opt->bidir = true;
        break;
      case kCallerMemory:
        opt->caller_memory = true;
        break;
      case kGpu:
        opt->gpu = true;
        break;
      case kCodec: {
        auto codec = kernels::CreateCodec(std::string(optarg));
        if (!codec.ok()) {
          return UsageError("bad --codec '" + std::string(optarg) + "': " + codec.status().message());
        }
        if (std::strlen(optarg) > kMaxCodecSpec) return UsageError("--codec spec longer than 256 characters");
        opt->codec = optarg;
        break;
      }
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
  if (opt->bidir && !IsBw(opt->test)) {
    return UsageError(std::string("--bidir applies to the *_bw tests, not ") + TestName(opt->test));
  }
  if (!opt->codec.empty()) {
    if (opt->test != Test::kWriteBw && opt->test != Test::kWriteLat) {
      return UsageError(std::string("--codec applies to write_bw and write_lat, not ") + TestName(opt->test));
    }
    if (opt->bidir) return UsageError("--codec and --bidir cannot be combined (the server only decodes)");
    if (opt->gpu) return UsageError("--codec compresses on the host; it cannot be combined with --gpu");
    if (size_given && (opt->size % 4 != 0)) {
      return UsageError("--codec: --size " + std::to_string(opt->size) +
                        " is not a whole number of fp32 values");
    }
  }
  if (opt->gpu && IsSend(opt->test)) {
    return UsageError(std::string("--gpu: ") + TestName(opt->test) +
                      " copies host messages (PostSend); use write_* or read_bw");
  }
#ifndef ZIPWIRE_PERF_HAVE_CUDA
  if (opt->gpu) return UsageError("--gpu: this zipwire_perf was built without CUDA (CUDAToolkit not found)");
#endif
  if (opt->size == 0) {
    opt->size = IsBw(opt->test) ? 65536 : (opt->codec.empty() ? 2 : 4096);
  }
  if (opt->iters == 0) opt->iters = IsBw(opt->test) ? 5000 : 1000;
  return -1;
}

// ---------------------------------------------------------------------------
// Control messages

constexpr uint8_t kMagic[4] = {'Z', 'W', 'P', 'F'};
constexpr uint8_t kVersion = 2;
enum MsgKind : uint8_t { kHello = 1, kReply = 2, kBye = 3, kResult = 4, kCredit = 5 };
constexpr uint8_t kFlagBidir = 1;

struct Hello {
  Test test = Test::kWriteBw;
  bool bidir = false;
  uint32_t tx_depth = 0;
  uint64_t iters = 0;
  uint64_t warmup = 0;
  std::vector<uint64_t> sizes;
  RemoteRegion region;
  std::string codec;
};

struct BwRow {
  uint64_t bytes = 0, iters = 0;
  double peak = 0, avg = 0, mpps = 0;
  double wire_bytes = 0;  // --codec: mean encoded bytes per message
};
struct LatRow {
  uint64_t bytes = 0, iters = 0;
  double t_min = 0, t_max = 0, t_typical = 0, t_avg = 0, t999 = 0;
  double wire_bytes = 0;
};

void Put(std::vector<uint8_t>* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t Get(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

std::vector<uint8_t> Header(MsgKind kind, uint8_t arg, uint8_t arg2 = 0) {
  std::vector<uint8_t> out(kMagic, kMagic + 4);
  out.push_back(kVersion);
  out.push_back(kind);
  out.push_back(arg);
  out.push_back(arg2);
  return out;
}

void PutRegion(std::vector<uint8_t>* out, const RemoteRegion& r) {
  uint8_t buf[transport::kRemoteRegionWireBytes];
  transport::EncodeRemoteRegion(r, buf);
  out->insert(out->end(), buf, buf + sizeof(buf));
}

bool IsControl(const std::vector<uint8_t>& m) {
  return m.size() >= 8 && std::memcmp(m.data(), kMagic, 4) == 0;
}

Status CheckHeader(const std::vector<uint8_t>& m, MsgKind kind) {
  if (!IsControl(m)) return Corrupt("not a zipwire_perf control message (is the peer zipwire_perf?)");
  if (m[4] != kVersion) {
    return Corrupt("peer speaks zipwire_perf protocol version " + std::to_string(m[4]) + ", this is " +
                   std::to_string(kVersion) + " (same build on both sides?)");
  }
  if (m[5] != kind) return Corrupt("unexpected control message kind " + std::to_string(m[5]));
  return Status::Ok();
}

std::vector<uint8_t> EncodeHello(const Hello& h) {
  std::vector<uint8_t> out = Header(kHello, static_cast<uint8_t>(h.test), h.bidir ? kFlagBidir : 0);
  Put(&out, h.tx_depth, 4);
  Put(&out, h.iters, 8);
  Put(&out, h.warmup, 8);
  Put(&out, h.sizes.size(), 4);
  for (uint64_t s : h.sizes) Put(&out, s, 8);
  PutRegion(&out, h.region);
  Put(&out, h.codec.size(), 4);
  out.insert(out.end(), h.codec.begin(), h.codec.end());
  return out;
}

Result<Hello> DecodeHello(const std::vector<uint8_t>& m) {
  ZW_RETURN_IF_ERROR(CheckHeader(m, kHello));
  Hello h;
  if (!IsKnownTest(m[6])) return Corrupt("unknown test " + std::to_string(m[6]));
  h.test = static_cast<Test>(m[6]);
  if (m[7] & ~kFlagBidir) return Corrupt("unknown HELLO flags");
  h.bidir = (m[7] & kFlagBidir) != 0;
  if (m.size() < 8 + 24) return Corrupt("short HELLO");
  h.tx_depth = static_cast<uint32_t>(Get(&m[8], 4));
  h.iters = Get(&m[12], 8);
  h.warmup = Get(&m[20], 8);
  uint64_t n = Get(&m[28], 4);
  if (n == 0 || n > kMaxSizes) return Corrupt("HELLO lists " + std::to_string(n) + " sizes");
  const size_t fixed = 32 + n * 8 + transport::kRemoteRegionWireBytes;
  if (m.size() < fixed + 4) return Corrupt("HELLO has the wrong length");
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t s = Get(&m[32 + i * 8], 8);
    if (s == 0) return Corrupt("HELLO lists a size of 0");
    h.sizes.push_back(s);
  }
  if (h.iters == 0 || h.iters > (uint64_t{1} << 40) || h.warmup > h.iters || h.tx_depth == 0 ||
      h.tx_depth > (1u << 16)) {
    return Corrupt("bad iteration parameters in HELLO");
  }
  h.region = transport::DecodeRemoteRegion(&m[32 + n * 8]);
  uint64_t codec_len = Get(&m[fixed], 4);
  if (codec_len > kMaxCodecSpec || m.size() != fixed + 4 + codec_len)
    return Corrupt("HELLO has the wrong length");
  h.codec.assign(m.begin() + static_cast<ptrdiff_t>(fixed + 4), m.end());
  return h;
}

std::vector<uint8_t> EncodeResult(const std::vector<BwRow>& rows) {
  std::vector<uint8_t> out = Header(kResult, 0);
  Put(&out, rows.size(), 4);
  for (const BwRow& r : rows) {
    Put(&out, std::bit_cast<uint64_t>(r.peak), 8);
    Put(&out, std::bit_cast<uint64_t>(r.avg), 8);
    Put(&out, std::bit_cast<uint64_t>(r.mpps), 8);
  }
  return out;
}

Result<std::vector<BwRow>> DecodeResult(const std::vector<uint8_t>& m, size_t want_rows) {
  ZW_RETURN_IF_ERROR(CheckHeader(m, kResult));
  if (m.size() < 12 || Get(&m[8], 4) != want_rows || m.size() != 12 + want_rows * 24) {
    return Corrupt("RESULT has the wrong shape");
  }
  std::vector<BwRow> rows(want_rows);
  for (size_t i = 0; i < want_rows; ++i) {
    const uint8_t* p = &m[12 + i * 24];
    rows[i].peak = std::bit_cast<double>(Get(p, 8));
    rows[i].avg = std::bit_cast<double>(Get(p + 8, 8));
    rows[i].mpps = std::bit_cast<double>(Get(p + 16, 8));
  }
  return rows;
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
    std::span<Completion> batch;
    std::vector<Completion> again;
    if (!deferred_.empty()) {
      // Completions a waiter did not want go first, in their order.
      again.swap(deferred_);
      batch = again;
    } else {
      size_t n = backend_->Poll(buf_, slice);
      if (n == 0) {
        // A busy-polling caller (zero slice) comes here millions of times:
        // the clock is read on every 64th empty poll only (perftest reads
        // none in its polling loop), which moves the inactivity deadline by
        // microseconds at most.
        if (slice.count() == 0 && (++empty_polls_ & 63) != 0) return Status::Ok();
        const auto now = Clock::now();
        if (progressed_) {
          last_progress_ = now;
          progressed_ = false;
        } else if (now - last_progress_ > idle_timeout_) {
          return Timeout("no progress for " + std::to_string(idle_timeout_.count() / 1000) + " s");
        }
        return Status::Ok();
      }
      progressed_ = true;  // the time is taken at the next empty poll
      batch = std::span<Completion>(buf_, n);
    }
    for (Completion& c : batch) {
      if (c.type == CompletionType::kPeerError) return c.status.WithContext("peer " + std::to_string(c.peer));
      if (!c.status.ok()) {
        return c.status.WithContext(std::string(transport::CompletionTypeName(c.type)) + " failed");
      }
      ZW_RETURN_IF_ERROR(on(c));
    }
    return Status::Ok();
  }

  void Touch() {
    last_progress_ = Clock::now();
    progressed_ = false;
  }
  // Hands `c` to the next Once (a waiter got what it wanted mid-batch).
  void Defer(Completion&& c) { deferred_.push_back(std::move(c)); }

 private:
  std::vector<Completion> deferred_;
  Backend* backend_;
  std::chrono::milliseconds idle_timeout_;
  Clock::time_point last_progress_;
  bool progressed_ = false;
  uint64_t empty_polls_ = 0;
  Completion buf_[64];
};

using Handler = std::function<Status(Completion&)>;

// Waits for a control message from `peer`; everything else goes to `other`.
Result<std::vector<uint8_t>> WaitMessage(Pump& pump, PeerId peer, const Handler& other = nullptr) {
  std::vector<uint8_t> got;
  bool done = false;
  while (!done) {
    ZW_RETURN_IF_ERROR(pump.Once([&](Completion& c) -> Status {
      if (done) {
        pump.Defer(std::move(c));
        return Status::Ok();
      }
      if (other) {
        // `other` sees the data traffic; a message it does not take is ours.
        if (!(c.type == CompletionType::kRecvMessage && c.peer == peer && IsControl(c.message)))
          return other(c);
      }
      if (c.type == CompletionType::kRecvMessage && c.peer == peer && !done) {
        got = std::move(c.message);
        done = true;
      }
      return Status::Ok();
    }));
  }
  return got;
}

// ---------------------------------------------------------------------------
// Buffers: page-aligned host memory, or CUDA device memory with --gpu.

struct Buffer {
  uint8_t* ptr = nullptr;
  uint64_t bytes = 0;
  MemoryKind kind = MemoryKind::kHost;
  MemoryRegion region;
  Backend* backend = nullptr;
  bool backend_owned = false;  // from AllocateMemory: DeregisterMemory frees it

  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    std::swap(kind, o.kind);
    std::swap(region, o.region);
    std::swap(backend, o.backend);
    std::swap(backend_owned, o.backend_owned);
    return *this;
  }
  ~Buffer() {
    if (ptr == nullptr) return;
    if (backend != nullptr && region.key != 0) static_cast<void>(backend->DeregisterMemory(region));
    if (backend_owned) return;
#ifdef ZIPWIRE_PERF_HAVE_CUDA
    if (kind == MemoryKind::kCuda) {
      cudaFree(ptr);
      return;
    }
#endif
    std::free(ptr);
  }
};

// Where the backend can allocate registered memory (and --caller-memory is
// not given) the buffer comes from it, as ucx_perftest's from ucp_mem_map.
bool UseBackendMemory(const Backend& backend, const Options& opt) {
  return !opt.gpu && !opt.caller_memory && backend.capabilities().supports_alloc;
}

// Fills every page so that first-touch faults are not measured; the
// pattern's first byte is 0, so data never looks like a control message.
void TouchPattern(uint8_t* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(i * 131);
}

Result<Buffer> MakeBuffer(Backend& backend, uint64_t bytes, bool gpu, bool backend_memory) {
  Buffer b;
  b.bytes = (bytes + 4095) / 4096 * 4096;
  if (backend_memory) {
    auto region = backend.AllocateMemory(b.bytes, MemoryKind::kHost);
    if (!region.ok()) {
      return region.status().WithContext("allocating " + std::to_string(b.bytes) + " bytes through the " +
                                         backend.capabilities().name + " backend");
    }
    b.ptr = static_cast<uint8_t*>(region->addr);
    b.region = *region;
    b.backend = &backend;
    b.backend_owned = true;
    TouchPattern(b.ptr, b.bytes);
    return b;
  }
  if (gpu) {
#ifdef ZIPWIRE_PERF_HAVE_CUDA
    int devices = 0;
    cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
      return FailedPrecondition(
          std::string("--gpu: no CUDA device (") +
          (err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount found 0") + ")");
    }
    void* p = nullptr;
    err = cudaMalloc(&p, b.bytes);
    if (err != cudaSuccess) {
      return Status(StatusCode::kResourceExhausted, "--gpu: cudaMalloc of " + std::to_string(b.bytes) +
                                                        " bytes failed: " + cudaGetErrorString(err));
    }
    b.ptr = static_cast<uint8_t*>(p);
    b.kind = MemoryKind::kCuda;
    cudaMemset(p, 0x5a, b.bytes);
    cudaDeviceSynchronize();
#else
    return NotSupported("--gpu: built without CUDA");
#endif
  } else {
    b.ptr = static_cast<uint8_t*>(std::aligned_alloc(4096, b.bytes));
    if (b.ptr == nullptr) {
      return Status(StatusCode::kResourceExhausted, "cannot allocate " + std::to_string(bytes) + " bytes");
    }
    TouchPattern(b.ptr, b.bytes);
  }
  auto region = backend.RegisterMemory(b.ptr, b.bytes, b.kind);
  if (!region.ok()) {
    return region.status().WithContext(std::string("registering ") + transport::MemoryKindName(b.kind) +
                                       " memory with the " + backend.capabilities().name + " backend");
  }
  b.region = *region;
  b.backend = &backend;
  return b;
}

// Checks what the local backend must offer for `test`: the same on both sides.
Status CheckBackendFor(const Backend& backend, Test test, const std::vector<uint64_t>& sizes, bool gpu) {
  const transport::Capabilities& caps = backend.capabilities();
  const uint64_t max_size = *std::max_element(sizes.begin(), sizes.end());
  if (test == Test::kReadBw && !caps.supports_read) {
    return NotSupported("--test read_bw is not supported by " + caps.name +
                        " (it does not offer PostRead: capabilities().supports_read is false)");
  }
  if (IsSend(test) && max_size > caps.max_control_bytes) {
    return InvalidArgument(std::string("--test ") + TestName(test) + ": size " + std::to_string(max_size) +
                           " exceeds the " + caps.name + " backend's largest PostSend (max_control_bytes " +
                           std::to_string(caps.max_control_bytes) + ")");
  }
  if (!IsSend(test) && max_size > caps.max_write_bytes) {
    return InvalidArgument("size " + std::to_string(max_size) + " exceeds the " + caps.name +
                           " backend's largest write (max_write_bytes " +
                           std::to_string(caps.max_write_bytes) + ")");
  }
  if (gpu && !caps.SupportsMemory(MemoryKind::kCuda)) {
    return NotSupported("--gpu: the " + caps.name +
                        " backend does not accept CUDA memory (MemoryKind::kCuda)");
  }
  return Status::Ok();
}

std::vector<uint64_t> Sizes(const Options& opt, const Backend& backend) {
  std::vector<uint64_t> out;
  if (opt.all) {
    const uint64_t top = IsSend(opt.test)
                             ? std::min<uint64_t>(kMaxAllBytes, backend.capabilities().max_control_bytes)
                             : kMaxAllBytes;
    for (uint64_t s = opt.codec.empty() ? 2 : 4; s <= top; s *= 2) out.push_back(s);
  } else {
    out.push_back(opt.size);
  }
  return out;
}

// Untimed iterations before each size: lets TCP open its window and the
// caches warm, as perftest's warm-up does.
uint64_t Warmup(Test test, uint64_t iters, uint32_t tx_depth) {
  return IsBw(test) ? std::min<uint64_t>(iters, tx_depth) : std::min<uint64_t>(iters / 10, 100);
}

const char* kRule =
    "---------------------------------------------------------------------------------------\n";

// ---------------------------------------------------------------------------
// Codec plumbing (--codec): slots of the registered buffer, one message each.

struct CodecPlan {
  std::unique_ptr<kernels::Codec> codec;
  uint64_t slot_bytes = 0;  // MaxCompressedBytes of the largest size, 64-byte aligned
  uint32_t slots = 1;
  uint64_t credit_every = 1;  // the server returns a CREDIT after this many decodes
};

Result<CodecPlan> MakeCodecPlan(const std::string& spec, const std::vector<uint64_t>& sizes, Test test,
                                uint32_t tx_depth) {
  CodecPlan plan;
  ZW_ASSIGN_OR_RETURN(plan.codec, kernels::CreateCodec(spec));
  for (uint64_t s : sizes) {
    if (s % 4 != 0)
      return InvalidArgument("--codec: size " + std::to_string(s) + " is not a whole number of fp32 values");
    plan.slot_bytes = std::max<uint64_t>(plan.slot_bytes, plan.codec->MaxCompressedBytes(s / 4));
  }
  plan.slot_bytes = (plan.slot_bytes + 63) / 64 * 64;
  plan.slots = test == Test::kWriteBw ? tx_depth : 1;
  // At most a quarter of the window between credits keeps the pipe full, and
  // never more than the window, so the client always gets the credit it needs.
  plan.credit_every = std::max<uint64_t>(1, plan.slots / 4);
  return plan;
}

// Contexts of control sends and echoes, apart from the measured operations'.
constexpr uint64_t kControlCtx = uint64_t{1} << 63;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The client's --codec state across sizes: where the next message goes and
// how far the server has decoded.
struct CodecRun {
  const CodecPlan* plan = nullptr;
  std::vector<float> src;  // this size's fp32 message
  uint64_t next = 0;       // messages posted so far (all sizes)
  uint64_t credited = 0;   // messages the server has decoded (CREDIT)
};

// Handles the server's CREDIT messages for the client.
Status TakeCredit(CodecRun* run, Completion& c) {
  if (c.type != CompletionType::kRecvMessage || !IsControl(c.message)) return Status::Ok();
  ZW_RETURN_IF_ERROR(CheckHeader(c.message, kCredit));
  if (c.message.size() != 16) return Corrupt("CREDIT has the wrong length");
  uint64_t v = Get(&c.message[8], 8);
  if (v < run->credited || v > run->next) return Corrupt("CREDIT for messages never sent");
  run->credited = v;
  return Status::Ok();
}

// Compresses the current message into slot `index % slots`; returns its bytes.
Result<uint64_t> EncodeInto(CodecRun* run, const Buffer& buf, uint64_t index) {
  const CodecPlan& plan = *run->plan;
  const uint64_t off = (index % plan.slots) * plan.slot_bytes;
  kernels::CodecContext ctx;
  ctx.seed = 42;
  ctx.step = index;
  ZW_ASSIGN_OR_RETURN(
      size_t n, plan.codec->Compress(run->src, std::span<uint8_t>(buf.ptr + off, plan.slot_bytes), ctx));
  return n;
}

// perftest's bandwidth loop: up to tx_depth operations outstanding toward
// `peer`; completions of other kinds (the peer's traffic in --bidir, CREDITs)
// go to `other`.
Result<BwRow> RunBw(Backend& backend, Pump& pump, PeerId peer, Test test, const Buffer& buf,
                    const RemoteRegion& remote, uint64_t size, uint64_t iters, uint64_t warmup,
                    uint32_t tx_depth, std::chrono::milliseconds slice, const Handler& other,
                    CodecRun* codec) {
  const uint64_t total = warmup + iters;
  const CompletionType done_type = test == Test::kWriteBw  ? CompletionType::kWriteDone
                                   : test == Test::kReadBw ? CompletionType::kReadDone
                                                           : CompletionType::kSendDone;
  std::vector<Clock::time_point> posted(total), completed(total);
  uint64_t n_posted = 0, n_done = 0;
  double wire_timed = 0;
  pump.Touch();
  auto post = [&](uint64_t i) -> Status {
    switch (test) {
      case Test::kWriteBw:
        if (codec != nullptr) {
          const uint64_t index = codec->next;
          ZW_ASSIGN_OR_RETURN(uint64_t wire, EncodeInto(codec, buf, index));
          const uint64_t off = (index % codec->plan->slots) * codec->plan->slot_bytes;
          ZW_RETURN_IF_ERROR(
              backend.PostWrite(peer, buf.region, off, remote, off, wire, static_cast<uint32_t>(i), i));
          ++codec->next;
          if (i >= warmup) wire_timed += static_cast<double>(wire);
          return Status::Ok();
        }
        return backend.PostWrite(peer, buf.region, 0, remote, 0, size, static_cast<uint32_t>(i), i);
      case Test::kReadBw:
        return backend.PostRead(peer, buf.region, 0, remote, 0, size, i);
      default:
        return backend.PostSend(peer, std::span<const uint8_t>(buf.ptr, size), i);
    }
  };
  // A codec slot is written again only once the server has decoded it.
  auto may_post = [&] { return codec == nullptr || codec->next < codec->credited + codec->plan->slots; };
  // Posts [n_posted, end) keeping at most tx_depth outstanding, until all of
  // them completed (completions arrive in posting order).
  auto run = [&](uint64_t end) -> Status {
    while (n_done < end) {
      while (n_posted < end && n_posted - n_done < tx_depth && may_post()) {
        posted[n_posted] = Clock::now();
        ZW_RETURN_IF_ERROR(post(n_posted));
        ++n_posted;
      }
      ZW_RETURN_IF_ERROR(pump.Once(
          [&](Completion& c) -> Status {
            if (c.type != done_type || c.peer != peer || (c.context & kControlCtx) != 0) {
              return other ? other(c) : Status::Ok();
            }
            if (c.context >= total)
              return Internal("completion for unknown operation " + std::to_string(c.context));
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
  const double msg_bytes =
      codec != nullptr ? wire_timed / static_cast<double>(iters) : static_cast<double>(size);
  row.wire_bytes = msg_bytes;
  const double elapsed = Seconds(completed[total - 1] - posted[warmup]);
  row.avg = msg_bytes * static_cast<double>(iters) / elapsed / kMB;
  row.mpps = static_cast<double>(iters) / elapsed / 1e6;
  // Peak as perftest defines it, (completed[j] - posted[i]) / (j - i + 1)
  // minimised, but over windows of a fixed m operations so that it stays
  // O(n) and one batch of completions cannot fake a burst: m is large
  // against tx_depth, so the window's one queueing delay costs at most ~1/8.
  const uint64_t m = std::min<uint64_t>(iters, std::max<uint64_t>(uint64_t{8} * tx_depth, iters / 10));
  double best = 0;
  for (uint64_t j = warmup + m - 1; j < total; ++j) {
    double dt = Seconds(completed[j] - posted[j + 1 - m]);
    if (dt > 0) best = std::max(best, msg_bytes * static_cast<double>(m) / dt / kMB);
  }
  row.peak = std::max(best, row.avg);
  return row;
}

// Where write_lat (without --codec) writes from: the page after the
// receive area; 0 for every other test.
uint64_t LatSendOffset(Test test, const std::vector<uint64_t>& sizes, const CodecPlan* plan) {
  if (test != Test::kWriteLat || plan != nullptr) return 0;
  return (*std::max_element(sizes.begin(), sizes.end()) + 4095) / 4096 * 4096;
}

// Ping-pong: write (or send) and wait for the peer's answer of the same size.
Result<LatRow> RunLat(Backend& backend, Pump& pump, Test test, const Buffer& buf, uint64_t send_offset,
                      const RemoteRegion& remote, uint64_t size, uint64_t iters, uint64_t warmup,
                      std::chrono::milliseconds slice, CodecRun* codec, std::vector<float>* decoded) {
  std::vector<double> samples;
  samples.reserve(iters);
  double wire_sum = 0;
  pump.Touch();
  // One clock read per round trip (each iteration starts where the last one
  // ended), as perftest reads its cycle counter once per iteration.
  auto t0 = Clock::now();
  for (uint64_t i = 0; i < warmup + iters; ++i) {
    uint64_t wire = size;
    if (test == Test::kSendLat) {
      ZW_RETURN_IF_ERROR(
          backend.PostSend(kServerRank, std::span<const uint8_t>(buf.ptr, size), kControlCtx | i));
    } else {
      if (codec != nullptr) {
        ZW_ASSIGN_OR_RETURN(wire, EncodeInto(codec, buf, i));
      }
      ZW_RETURN_IF_ERROR(backend.PostWrite(kServerRank, buf.region, send_offset, remote, 0, wire,
                                           static_cast<uint32_t>(i), kControlCtx | i));
    }
    bool echoed = false;
    while (!echoed) {
      ZW_RETURN_IF_ERROR(pump.Once(
          [&](Completion& c) -> Status {
            if (test == Test::kSendLat) {
              if (c.type != CompletionType::kRecvMessage) return Status::Ok();
              if (c.message.size() != size) {
                return Corrupt("echo of " + std::to_string(c.message.size()) + " bytes, expected " +
                               std::to_string(size));
              }
              echoed = true;
              return Status::Ok();
            }
            if (c.type != CompletionType::kWriteImm) return Status::Ok();
            if (c.imm != static_cast<uint32_t>(i) || c.length != wire) {
              return Corrupt("echo " + std::to_string(c.imm) + " of " + std::to_string(c.length) +
                             " bytes, expected " + std::to_string(i));
            }
            if (codec != nullptr) {
              ZW_RETURN_IF_ERROR(
                  codec->plan->codec->Decompress(std::span<const uint8_t>(buf.ptr + c.offset, c.length),
                                                 std::span<float>(decoded->data(), size / 4)));
            }
            echoed = true;
            return Status::Ok();
          },
          slice));
    }
    const auto t1 = Clock::now();
    if (i >= warmup) {
      samples.push_back(Seconds(t1 - t0) * 1e6 / 2);
      wire_sum += static_cast<double>(wire);
    }
    t0 = t1;
  }
  std::vector<double> sorted = samples;
  std::sort(sorted.begin(), sorted.end());
  LatRow row;
  row.bytes = size;
  row.iters = iters;
  row.wire_bytes = wire_sum / static_cast<double>(iters);
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

// The target side of a run: counts and checks what arrives (writes with
// immediates, or data messages), decodes with --codec, answers ping-pongs.
class Receiver {
 public:
  Receiver(Backend& backend, PeerId peer, Test test, const std::vector<uint64_t>& sizes, uint64_t per_size,
           const Buffer& buf, const RemoteRegion& peer_region, const CodecPlan* plan)
      : backend_(backend),
        peer_(peer),
        test_(test),
        sizes_(sizes),
        per_size_(per_size),
        buf_(buf),
        peer_region_(peer_region),
        plan_(plan),
        send_offset_(LatSendOffset(test, sizes, plan)) {
    if (plan_ != nullptr) decoded_.resize(*std::max_element(sizes.begin(), sizes.end()) / 4);
  }

  uint64_t expected() const { return test_ == Test::kReadBw ? 0 : per_size_ * sizes_.size(); }
  uint64_t received() const { return received_; }
  uint64_t bytes() const { return bytes_; }

  Status Handle(Completion& c) {
    if (c.peer != peer_) return Status::Ok();
    const bool send = IsSend(test_);
    if (send ? (c.type != CompletionType::kRecvMessage || IsControl(c.message))
             : c.type != CompletionType::kWriteImm) {
      return Status::Ok();
    }
    if (test_ == Test::kReadBw) return Corrupt("unexpected traffic in read_bw");
    if (received_ >= expected()) return Corrupt("more messages than announced");
    const uint64_t want = sizes_[received_ / per_size_];
    const uint64_t got = send ? c.message.size() : c.length;
    if (plan_ != nullptr) {
      // The encoded size depends on the codec (and, for some, the data); the
      // decoder validates it and the element count.
      if (c.offset > buf_.bytes || got > buf_.bytes - c.offset)
        return Corrupt("codec message outside the buffer");
      Status st = plan_->codec->Decompress(std::span<const uint8_t>(buf_.ptr + c.offset, got),
                                           std::span<float>(decoded_.data(), want / 4));
      if (!st.ok()) return st.WithContext("decoding message " + std::to_string(received_));
    } else if (got != want) {
      return Corrupt("message " + std::to_string(received_) + " has " + std::to_string(got) +
                     " bytes, expected " + std::to_string(want));
    }
    ++received_;
    bytes_ += got;
    switch (test_) {
      case Test::kWriteLat:
        // With --codec the encoded message goes back as it landed.
        return backend_.PostWrite(peer_, buf_.region, plan_ != nullptr ? c.offset : send_offset_,
                                  peer_region_, c.offset, got, c.imm, kControlCtx | received_);
      case Test::kSendLat:
        return backend_.PostSend(peer_, c.message, kControlCtx | received_);
      case Test::kWriteBw:
        if (plan_ != nullptr && (received_ % plan_->credit_every == 0 || received_ == expected())) {
          std::vector<uint8_t> credit = Header(kCredit, 0);
          Put(&credit, received_, 8);
          return backend_.PostSend(peer_, credit, kControlCtx);
        }
        return Status::Ok();
      default:
        return Status::Ok();
    }
  }

 private:
  Backend& backend_;
  const PeerId peer_;
  const Test test_;
  const std::vector<uint64_t>& sizes_;
  const uint64_t per_size_;
  const Buffer& buf_;
  const RemoteRegion peer_region_;
  const CodecPlan* plan_;
  const uint64_t send_offset_;  // write_lat answers from here (see LatSendOffset)
  std::vector<float> decoded_;
  uint64_t received_ = 0, bytes_ = 0;
};

// Bytes each side registers: one message (two areas of one for write_lat),
// or one codec slot per outstanding write.
uint64_t BufferBytes(Test test, const std::vector<uint64_t>& sizes, const CodecPlan* plan) {
  if (plan != nullptr) return plan->slot_bytes * plan->slots;
  return LatSendOffset(test, sizes, plan) + *std::max_element(sizes.begin(), sizes.end());
}

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
  Completion one[1];
  while (peer == transport::kInvalidPeer) {
    size_t n = backend.Poll(one, std::chrono::milliseconds(1000));
    for (size_t i = 0; i < n; ++i) {
      if (one[i].type == CompletionType::kPeerConnected) {
        peer = one[i].peer;
        break;
      }
    }
  }
  Pump pump(&backend, std::chrono::milliseconds(opt.timeout_ms));
  auto hello_msg = WaitMessage(pump, peer);
  if (!hello_msg.ok()) return fail(hello_msg.status().WithContext("waiting for the client's parameters"));
  auto refuse = [&](const Status& why) {
    std::vector<uint8_t> reply = Header(kReply, 0);
    PutRegion(&reply, RemoteRegion{});
    std::string text = why.message();
    reply.insert(reply.end(), text.begin(), text.end());
    static_cast<void>(backend.PostSend(peer, reply, kControlCtx));
    // Give the refusal a moment to leave before the connection closes.
    static_cast<void>(pump.Once([](Completion&) { return Status::Ok(); }));
    return fail(why.WithContext("client parameters"));
  };
  auto hello = DecodeHello(*hello_msg);
  if (!hello.ok()) return refuse(hello.status());
  if (Status st = CheckBackendFor(backend, hello->test, hello->sizes, opt.gpu); !st.ok()) return refuse(st);
  std::unique_ptr<CodecPlan> plan;
  if (!hello->codec.empty()) {
    if (hello->test != Test::kWriteBw && hello->test != Test::kWriteLat) {
      return refuse(Corrupt("codec with a test other than write_bw / write_lat"));
    }
    auto made = MakeCodecPlan(hello->codec, hello->sizes, hello->test, hello->tx_depth);
    if (!made.ok()) return refuse(made.status());
    plan = std::make_unique<CodecPlan>(std::move(*made));
  }
  const uint64_t need = BufferBytes(hello->test, hello->sizes, plan.get());
  if (hello->test != Test::kSendBw && hello->test != Test::kSendLat && hello->region.length < need &&
      (hello->test == Test::kWriteLat || hello->bidir)) {
    return refuse(Corrupt("client region is smaller than the largest message"));
  }
  auto buffer = MakeBuffer(backend, need, opt.gpu, UseBackendMemory(backend, opt));
  if (!buffer.ok()) return refuse(buffer.status());
  std::vector<uint8_t> reply = Header(kReply, 1);
  PutRegion(&reply, transport::ToRemote(buffer->region));
  if (Status st = backend.PostSend(peer, reply, kControlCtx); !st.ok()) return fail(st);
  std::printf("client rank %u: %s%s%s%s, %zu size(s), %" PRIu64 " iterations (+%" PRIu64 " warm-up)\n", peer,
              TestName(hello->test), hello->bidir ? " bidirectional" : "", plan ? " codec " : "",
              plan ? hello->codec.c_str() : "", hello->sizes.size(), hello->iters, hello->warmup);
  std::fflush(stdout);

  const uint64_t per_size = hello->warmup + hello->iters;
  Receiver rx(backend, peer, hello->test, hello->sizes, per_size, *buffer, hello->region, plan.get());
  const Handler on_rx = [&rx](Completion& c) { return rx.Handle(c); };
  // Latency tests busy-poll like perftest so the echo is not delayed by a wakeup.
  const auto slice = std::chrono::milliseconds(!IsBw(hello->test) && !opt.events ? 0 : 100);
  if (hello->bidir) {
    std::vector<BwRow> rows;
    const auto bw_slice = std::chrono::milliseconds(opt.events ? 100 : 0);
    for (uint64_t size : hello->sizes) {
      auto row = RunBw(backend, pump, peer, hello->test, *buffer, hello->region, size, hello->iters,
                       hello->warmup, hello->tx_depth, bw_slice, on_rx, nullptr);
      if (!row.ok())
        return fail(row.status().WithContext(std::string(TestName(hello->test)) + " toward the client"));
      rows.push_back(*row);
    }
    if (Status st = backend.PostSend(peer, EncodeResult(rows), kControlCtx); !st.ok()) return fail(st);
  }
  bool bye = false;
  while (!bye) {
    Status st = pump.Once(
        [&](Completion& c) -> Status {
          if (c.peer == peer && c.type == CompletionType::kRecvMessage && IsControl(c.message)) {
            ZW_RETURN_IF_ERROR(CheckHeader(c.message, kBye));
            bye = true;
            return Status::Ok();
          }
          return rx.Handle(c);
        },
        slice);
    if (!st.ok()) return fail(st.WithContext("after " + std::to_string(rx.received()) + " messages"));
  }
  if (rx.received() != rx.expected()) {
    return fail(Corrupt("client said goodbye after " + std::to_string(rx.received()) + " of " +
                        std::to_string(rx.expected()) + " messages"));
  }
  if (hello->test == Test::kReadBw) {
    std::printf("done: served the client's reads\n");
  } else {
    std::printf("done: %" PRIu64 " messages, %" PRIu64 " bytes received%s\n", rx.received(), rx.bytes(),
                plan ? " and decoded" : "");
  }
  return 0;
}

// ---------------------------------------------------------------------------
// Client

Status WriteJson(const Options& opt, const std::vector<BwRow>& bw, const std::vector<LatRow>& lat) {
  FILE* f = std::fopen(opt.json.c_str(), "w");
  if (f == nullptr) return IoError("cannot write " + opt.json + ": " + std::strerror(errno));
  std::fprintf(f, "{\"transport\": \"%s\", \"test\": \"%s\", \"mb_bytes\": 1048576", opt.transport.c_str(),
               TestName(opt.test));
  if (opt.bidir) std::fprintf(f, ", \"bidir\": true");
  if (opt.gpu) std::fprintf(f, ", \"memory\": \"cuda\"");
  if (!opt.codec.empty()) std::fprintf(f, ", \"codec\": \"%s\"", opt.codec.c_str());
  std::fprintf(f, ", \"results\": [");
  const bool codec = !opt.codec.empty();
  for (size_t i = 0; i < bw.size(); ++i) {
    std::fprintf(f,
                 "%s\n  {\"bytes\": %" PRIu64 ", \"iterations\": %" PRIu64
                 ", \"bw_peak_MBps\": %.2f, \"bw_avg_MBps\": %.2f, \"msg_rate_Mpps\": %.6f",
                 i ? "," : "", bw[i].bytes, bw[i].iters, bw[i].peak, bw[i].avg, bw[i].mpps);
    if (codec) {
      std::fprintf(f, ", \"wire_bytes\": %.1f, \"wire_MBps\": %.2f, \"effective_MBps\": %.2f",
                   bw[i].wire_bytes, bw[i].avg, bw[i].mpps * 1e6 * static_cast<double>(bw[i].bytes) / kMB);
    }
    std::fprintf(f, "}");
  }
  for (size_t i = 0; i < lat.size(); ++i) {
    std::fprintf(f,
                 "%s\n  {\"bytes\": %" PRIu64 ", \"iterations\": %" PRIu64
                 ", \"t_min_us\": %.3f, \"t_max_us\": %.3f, \"t_typical_us\": %.3f, \"t_avg_us\": %.3f"
                 ", \"t999_us\": %.3f",
                 i ? "," : "", lat[i].bytes, lat[i].iters, lat[i].t_min, lat[i].t_max, lat[i].t_typical,
                 lat[i].t_avg, lat[i].t999);
    if (codec) std::fprintf(f, ", \"wire_bytes\": %.1f", lat[i].wire_bytes);
    std::fprintf(f, "}");
  }
  std::fprintf(f, "\n]}\n");
  if (std::fclose(f) != 0) return IoError("cannot write " + opt.json + ": " + std::strerror(errno));
  return Status::Ok();
}

const char* TestTitle(Test t) {
  switch (t) {
    case Test::kWriteBw:
      return "RDMA_Write BW";
    case Test::kWriteLat:
      return "RDMA_Write Latency";
    case Test::kReadBw:
      return "RDMA_Read BW";
    case Test::kSendBw:
      return "Send BW";
    case Test::kSendLat:
      return "Send Latency";
  }
  return "?";
}

int RunClient(const Options& opt, Backend& backend) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "zipwire_perf client: error: %s\n", st.ToString().c_str());
    return kExitError;
  };
  const std::vector<uint64_t> sizes = Sizes(opt, backend);
  // What this backend cannot run is a usage error, found before connecting.
  if (Status st = CheckBackendFor(backend, opt.test, sizes, opt.gpu); !st.ok())
    return UsageError(st.message());
  std::unique_ptr<CodecPlan> plan;
  if (!opt.codec.empty()) {
    auto made = MakeCodecPlan(opt.codec, sizes, opt.test, opt.tx_depth);
    if (!made.ok()) return UsageError(made.status().message());
    plan = std::make_unique<CodecPlan>(std::move(*made));
  }
  const bool v6 = opt.host.find(':') != std::string::npos && opt.host.front() != '[';
  const std::string server = (v6 ? "[" + opt.host + "]" : opt.host) + ":" + std::to_string(opt.port);
  if (Status st = backend.Connect(kServerRank, server); !st.ok()) {
    return fail(st.WithContext("no zipwire_perf server reachable at " + server));
  }
  const uint64_t need = BufferBytes(opt.test, sizes, plan.get());
  auto buffer = MakeBuffer(backend, need, opt.gpu, UseBackendMemory(backend, opt));
  if (!buffer.ok()) return fail(buffer.status());
  Hello hello;
  hello.test = opt.test;
  hello.bidir = opt.bidir;
  hello.tx_depth = opt.tx_depth;
  hello.iters = opt.iters;
  hello.warmup = Warmup(opt.test, opt.iters, opt.tx_depth);
  hello.sizes = sizes;
  hello.region = transport::ToRemote(buffer->region);
  hello.codec = opt.codec;
  if (Status st = backend.PostSend(kServerRank, EncodeHello(hello), kControlCtx); !st.ok()) return fail(st);

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
  if (!IsSend(opt.test) && remote.length < need) {
    return fail(Corrupt("server region is smaller than the largest message"));
  }

  std::printf("%s", kRule);
  std::printf("                    %s Test%s (zipwire, transport %s)\n", TestTitle(opt.test),
              opt.bidir ? " (bidirectional)" : "", opt.transport.c_str());
  std::printf(" Server: %s   Iterations: %" PRIu64 "   Warm-up: %" PRIu64, server.c_str(), opt.iters,
              hello.warmup);
  if (IsBw(opt.test)) std::printf("   TX depth: %u", opt.tx_depth);
  if (opt.gpu) {
    std::printf("   Memory: CUDA");
  } else {
    std::printf("   Memory: %s", UseBackendMemory(backend, opt) ? "allocated by the backend (AllocateMemory)"
                                                                : "caller's, registered (RegisterMemory)");
  }
  if (plan)
    std::printf("\n Codec: %s (bytes = fp32 message; BW = encoded bytes on the wire)", opt.codec.c_str());
  std::printf("\n%s", kRule);
  if (IsBw(opt.test)) {
    std::printf(" #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]%s\n",
                plan ? "   wire[MB/sec]   effective[MB/sec]" : "");
  } else {
    std::printf(
        " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    "
        "t99.9[usec]%s\n",
        plan ? "   wire[B]" : "");
  }
  std::fflush(stdout);

  // --bidir: the server's traffic toward us, counted as the server counts ours.
  const uint64_t per_size = hello.warmup + hello.iters;
  Receiver rx(backend, kServerRank, opt.test, sizes, per_size, *buffer, remote, nullptr);
  CodecRun codec_run;
  codec_run.plan = plan.get();
  // The server's RESULT may arrive while our own loop still runs: kept for later.
  std::vector<uint8_t> early_result;
  const Handler other = [&](Completion& c) -> Status {
    if (plan) return TakeCredit(&codec_run, c);
    if (c.type == CompletionType::kRecvMessage && c.peer == kServerRank && IsControl(c.message)) {
      if (!early_result.empty()) return Corrupt("unexpected control message from the server");
      early_result = std::move(c.message);
      return Status::Ok();
    }
    return opt.bidir ? rx.Handle(c) : Status::Ok();
  };
  std::vector<float> decoded;
  std::mt19937 rng(7);
  std::normal_distribution<float> gauss(0.0f, 1.0f);

  // Busy-polling (a zero slice) as perftest does unless --events.
  const auto slice = std::chrono::milliseconds(opt.events ? 100 : 0);
  std::vector<BwRow> bw_rows;
  std::vector<LatRow> lat_rows;
  for (uint64_t size : sizes) {
    if (plan) {
      codec_run.src.resize(size / 4);
      for (float& v : codec_run.src) v = gauss(rng);
      decoded.resize(size / 4);
    }
    if (IsBw(opt.test)) {
      auto row = RunBw(backend, pump, kServerRank, opt.test, *buffer, remote, size, opt.iters, hello.warmup,
                       opt.tx_depth, slice, other, plan ? &codec_run : nullptr);
      if (!row.ok())
        return fail(
            row.status().WithContext(std::string(TestName(opt.test)) + " " + std::to_string(size) + " B"));
      bw_rows.push_back(*row);
      if (!opt.bidir) {
        std::printf(" %-7" PRIu64 "    %-7" PRIu64 "          %-7.2f            %-7.2f            %-7.6f",
                    row->bytes, row->iters, row->peak, row->avg, row->mpps);
        if (plan) {
          std::printf("       %-10.2f     %-10.2f", row->avg,
                      row->mpps * 1e6 * static_cast<double>(row->bytes) / kMB);
        }
        std::printf("\n");
      }
    } else {
      auto row = RunLat(backend, pump, opt.test, *buffer, LatSendOffset(opt.test, sizes, plan.get()), remote,
                        size, opt.iters, hello.warmup, slice, plan ? &codec_run : nullptr, &decoded);
      if (!row.ok())
        return fail(
            row.status().WithContext(std::string(TestName(opt.test)) + " " + std::to_string(size) + " B"));
      std::printf(" %-7" PRIu64 " %-7" PRIu64
                  "        %-7.2f        %-7.2f      %-7.2f          %-7.2f        %-7.2f",
                  row->bytes, row->iters, row->t_min, row->t_max, row->t_typical, row->t_avg, row->t999);
      if (plan) std::printf("     %-8.0f", row->wire_bytes);
      std::printf("\n");
      lat_rows.push_back(*row);
    }
    std::fflush(stdout);
  }
  if (opt.bidir) {
    // The server's own rows, then the sums (perftest -b reports both directions).
    if (early_result.empty()) {
      auto result = WaitMessage(pump, kServerRank, other);
      if (!result.ok()) return fail(result.status().WithContext("waiting for the server's results"));
      early_result = std::move(*result);
    }
    auto result = &early_result;
    auto theirs = DecodeResult(*result, bw_rows.size());
    if (!theirs.ok()) return fail(theirs.status());
    if (rx.received() != rx.expected()) {
      return fail(Corrupt("server reported its results after " + std::to_string(rx.received()) + " of " +
                          std::to_string(rx.expected()) + " messages"));
    }
    for (size_t i = 0; i < bw_rows.size(); ++i) {
      BwRow& r = bw_rows[i];
      r.peak += (*theirs)[i].peak;
      r.avg += (*theirs)[i].avg;
      r.mpps += (*theirs)[i].mpps;
      std::printf(" %-7" PRIu64 "    %-7" PRIu64 "          %-7.2f            %-7.2f            %-7.6f\n",
                  r.bytes, r.iters, r.peak, r.avg, r.mpps);
    }
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
  if (opt.transport == "auto") {
    TransportChoice choice = ChooseTransport(opt.ib_device);
    opt.transport = choice.name;
    std::printf("transport: auto -> %s (%s)\n", choice.name.c_str(), choice.reason.c_str());
    std::fflush(stdout);
  }
  // -d / -x / -q are the verbs backend's settings, read when it is created.
  const bool ib_flags =
      !opt.ib_device.empty() || !opt.ib_gid_index.empty() || !opt.ib_qps.empty() || opt.rdma_cm;
  if (ib_flags && opt.transport != "verbs") {
    return UsageError(
        "-d / -x / -q / -R select RDMA devices, GIDs, QPs and rdma_cm: they apply to -t verbs only, not " +
        opt.transport);
  }
  if (opt.rdma_cm) setenv("ZIPWIRE_IB_CM", "rdmacm", 1);
  if (!opt.ib_device.empty()) setenv("ZIPWIRE_IB_DEVICE", opt.ib_device.c_str(), 1);
  if (!opt.ib_gid_index.empty()) setenv("ZIPWIRE_IB_GID_INDEX", opt.ib_gid_index.c_str(), 1);
  if (!opt.ib_qps.empty()) setenv("ZIPWIRE_IB_QPS", opt.ib_qps.c_str(), 1);
  transport::BackendOptions bopt;
  bopt.self = opt.host.empty() ? kServerRank : kClientRank;
  bopt.listen_host = opt.bind;
  bopt.listen_port = opt.port;
  bopt.connect_timeout = std::chrono::milliseconds(opt.timeout_ms);
  auto backend = transport::CreateBackend(opt.transport, bopt);
  if (!backend.ok()) {
    const StatusCode code = backend.status().code();
    if (code == StatusCode::kNotSupported || code == StatusCode::kInvalidArgument) {
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
