// Writes the seed corpus of every fuzz target: a handful of small valid
// encodings made by the real encoders (so the fuzzers start past the
// validation layers) plus a few edge cases (empty, truncated, header only).
//
//   make_corpus OUT_DIR     writes OUT_DIR/<target>/<seed name>
//
// fuzz/corpus/ is this program's output, committed; regenerate it with
// `fuzz/run.sh --regen-corpus` after a wire format change. Codecs that this
// build does not register are skipped with a note. Everything here is
// deterministic (fixed inputs and contexts), so a regeneration only changes
// the files whose encodings really changed.
#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "kernels/codec.h"
#include "ps/protocol.h"
#include "transport/backend_util.h"
#include "transport/bootstrap_wire.h"

namespace zipwire::fuzz {
namespace {

namespace zk = kernels;
namespace bw = transport::bootstrap_wire;
using Bytes = std::vector<uint8_t>;

std::string g_out;
int g_errors = 0;

bool MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) == 0 || errno == EEXIST) return true;
  std::fprintf(stderr, "make_corpus: mkdir %s: %s\n", path.c_str(), std::strerror(errno));
  ++g_errors;
  return false;
}

void Write(const std::string& target, const std::string& name, const Bytes& bytes) {
  const std::string dir = g_out + "/" + target;
  if (!MakeDir(dir)) return;
  const std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) {
    std::fprintf(stderr, "make_corpus: cannot write %s\n", path.c_str());
    ++g_errors;
  }
}

// Small inputs with structure a codec cares about: signs, ties, zeros, a
// large outlier, and non-power-of-two lengths (partial words, tails).
std::vector<float> Input(size_t n, int variant) {
  std::vector<float> x(n);
  uint32_t s = 12345u + static_cast<uint32_t>(variant);
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const float u = static_cast<float>(s >> 8) / 16777216.0f - 0.5f;
    switch (variant) {
      case 0:
        x[i] = u;
        break;
      case 1:
        x[i] = i % 3 == 0 ? 0.0f : (i % 2 ? -1.0f : 1.0f);  // ties and zeros
        break;
      default:
        x[i] = i == n / 2 ? 1e6f : u * 1e-3f;  // one outlier
        break;
    }
  }
  return x;
}

Bytes Encode(const zk::Codec& codec, const std::vector<float>& x, const zk::CodecContext& ctx, bool* ok) {
  Bytes out(codec.MaxCompressedBytes(x.size()));
  auto n = codec.Compress(x, out, ctx);
  *ok = n.ok();
  if (!n.ok()) return {};
  out.resize(n.value());
  return out;
}

// The spec variants per codec: defaults plus parameters that change the wire
// format (index coding, levels, norms, rows).
struct CodecSeeds {
  const char* name;  // the target is fuzz_decode_<name>
  std::vector<const char*> specs;
  std::vector<size_t> extra_sizes = {};  // beyond kSizes (dithering: several buckets)
};

const std::vector<CodecSeeds>& AllCodecs() {
  static const std::vector<CodecSeeds> kCodecs = {
      {"none", {"none"}},
      {"fp16", {"fp16"}},
      {"onebit", {"onebit"}},
      {"bf16", {"bf16"}},
      {"topk", {"topk:0.1", "topk:3", "topk:0.5"}},
      {"topk_sampled", {"topk_sampled:0.1", "topk_sampled:4"}},
      {"randomk", {"randomk:0.25", "randomk:3,scale=1"}},
      {"dithering",
       {"dithering:s=4", "dithering:s=16,norm=max", "dithering:s=8,levels=natural", "dithering:bucket=0,s=4",
        "dithering:bucket=128,s=5", "dithering:bucket=128,levels=natural,norm=max,s=3"},
       {300}},
      {"terngrad", {"terngrad"}},
      {"countsketch", {"countsketch:r=3,c=16", "countsketch:r=4,c=8,k=2"}},
  };
  return kCodecs;
}

void CodecCorpus() {
  const size_t kSizes[] = {0, 1, 5, 33, 100};
  for (const CodecSeeds& c : AllCodecs()) {
    const std::string target = std::string("fuzz_decode_") + c.name;
    int written = 0;
    for (size_t si = 0; si < c.specs.size(); ++si) {
      auto codec = zk::CreateCodec(c.specs[si]);
      if (!codec.ok()) {
        std::printf("note: skipping '%s': %s\n", c.specs[si], codec.status().ToString().c_str());
        continue;
      }
      std::vector<size_t> sizes(std::begin(kSizes), std::end(kSizes));
      sizes.insert(sizes.end(), c.extra_sizes.begin(), c.extra_sizes.end());
      for (size_t n : sizes) {
        for (int variant = 0; variant < 3; ++variant) {
          if (n == 0 && variant > 0) continue;
          zk::CodecContext ctx;
          ctx.seed = 7;
          ctx.tensor_id = 3;
          ctx.chunk_index = 1;
          ctx.step = static_cast<uint64_t>(variant);
          bool ok = false;
          const Bytes enc = Encode(*codec.value(), Input(n, variant), ctx, &ok);
          if (!ok) continue;
          const std::string name =
              "s" + std::to_string(si) + "_n" + std::to_string(n) + "_v" + std::to_string(variant);
          Write(target, name, enc);
          // The header fuzzer gets one valid buffer per spec.
          if (n == 33 && variant == 0) Write("fuzz_parse_header", std::string(c.name) + "_" + name, enc);
          // Edge cases from the largest encoding: header only, one byte short.
          if (n == 100 && variant == 0) {
            Write(target, name + "_header_only", Bytes(enc.begin(), enc.begin() + zk::WireHeader::kBytes));
            Write(target, name + "_short", Bytes(enc.begin(), enc.end() - 1));
          }
          ++written;
        }
      }
    }
    if (written > 0) Write(target, "empty", {});
  }
}

void HeaderCorpus() {
  const std::string t = "fuzz_parse_header";
  zk::WireHeader h;
  h.codec = zk::CodecId::kNone;
  h.elements = 2;
  h.payload_bytes = 8;
  Bytes b(zk::WireHeader::kBytes + 8, 0);
  zk::EncodeHeader(h, std::span<uint8_t, zk::WireHeader::kBytes>(b.data(), zk::WireHeader::kBytes));
  Write(t, "none_2", b);
  Write(t, "truncated_header", Bytes(b.begin(), b.begin() + zk::WireHeader::kBytes - 1));
  Bytes bad_magic = b;
  bad_magic[0] ^= 0xff;
  Write(t, "bad_magic", bad_magic);
  Bytes huge = b;
  for (int i = 16; i < 24; ++i) huge[i] = 0xff;  // payload_bytes = 2^64 - 1
  Write(t, "huge_payload", huge);
  Write(t, "empty", {});
}

void PsCorpus() {
  const std::string t = "fuzz_ps_protocol";
  ps::DeclareMessage d;
  d.tensor_id = 42;
  d.elements = 1000;
  d.partition_bytes = 4096;
  d.codec = "topk:0.01";
  d.flags = ps::kFlagServerErrorFeedback;
  d.worker_recv = {7, 0x1000, 8192};
  Write(t, "declare_0", ps::Encode(d));
  d.chunks = {{0, 1, 0, 4096}, {1, 2, 4096, 4096}, {2, 3, 8192, 128}};
  const Bytes declare3 = ps::Encode(d);
  Write(t, "declare_3", declare3);
  Write(t, "declare_truncated", Bytes(declare3.begin(), declare3.end() - 5));
  Bytes many = declare3;  // chunk count forged to 2^20 + 1
  const size_t count_at = 1 + 8 * 3 + 2 + d.codec.size() + 1 + 24;
  many[count_at] = 1;
  many[count_at + 1] = 0;
  many[count_at + 2] = 0x10;
  many[count_at + 3] = 0;
  Write(t, "declare_count_forged", many);

  ps::DeclareAckMessage a;
  a.tensor_id = 42;
  a.code = StatusCode::kOk;
  a.server_slots = {9, 0x2000, 16384};
  a.chunks = {{0, 5, 0, 4096}, {1, 6, 4096, 4096}};
  Write(t, "ack_2", ps::Encode(a));
  a.code = StatusCode::kInvalidArgument;
  a.message = "unknown codec 'zzz'";
  a.chunks.clear();
  Write(t, "ack_error", ps::Encode(a));
  Write(t, "bye", ps::EncodeBye(ps::MessageType::kBye));
  Write(t, "bye_ack", ps::EncodeBye(ps::MessageType::kByeAck));
  Write(t, "empty", {});
  Write(t, "bad_type", {0xff});
}

void BootstrapCorpus() {
  const std::string t = "fuzz_bootstrap_wire";
  bw::RegisterMsg reg;
  reg.role = transport::Role::kServer;
  reg.address = "127.0.0.1:4000";
  const Bytes reg_frame = bw::EncodeRegister(reg);
  Write(t, "register", reg_frame);
  bw::RegisterMsg indexed = reg;
  indexed.requested_role_rank = 3;
  Write(t, "register_index", bw::EncodeRegister(indexed));
  transport::ClusterView view;
  view.self_rank = 1;
  view.num_workers = 2;
  view.num_servers = 1;
  view.nodes = {{0, transport::Role::kWorker, 0, "10.0.0.1:5000"},
                {1, transport::Role::kWorker, 1, "[::1]:5001"},
                {2, transport::Role::kServer, 0, "host-b.example:6000"}};
  const Bytes assign = bw::EncodeAssign(view);
  Write(t, "assign", assign);
  const Bytes barrier = bw::EncodeBarrier(bw::MsgType::kBarrier, 3);
  Write(t, "barrier", barrier);
  Write(t, "barrier_release", bw::EncodeBarrier(bw::MsgType::kBarrierRelease, 3));
  Write(t, "leave", bw::EncodeLeave());
  Write(t, "error", bw::EncodeError({StatusCode::kUnavailable, "scheduler \x1b[31mfull"}));
  Bytes stream = reg_frame;  // a connection's worth: several frames back to back
  stream.insert(stream.end(), barrier.begin(), barrier.end());
  stream.insert(stream.end(), assign.begin(), assign.end());
  Write(t, "stream", stream);
  // Bare payloads (the fuzzer also tries the input as a payload of each type).
  Write(t, "payload_assign", Bytes(assign.begin() + bw::kLengthBytes + 1, assign.end()));
  Write(t, "payload_register", Bytes(reg_frame.begin() + bw::kLengthBytes + 1, reg_frame.end()));
  Write(t, "address_v6",
        Bytes{'[', 'f', 'e', '8', '0', ':', ':', '1', '%', 'e', 't', 'h', '0', ']', ':', '9', '9'});
  Write(t, "zero_length", Bytes{0, 0, 0, 0, 1});
  Write(t, "oversize_length", Bytes{0xff, 0xff, 0xff, 0x7f, 1});
  Write(t, "empty", {});
}

// The tcp backend's frames after the HELLO (fuzz_tcp_stream sends that
// itself): 40-byte little-endian headers as documented in tcp_backend.cc,
// naming region key 1, the fuzzer's one registration.
Bytes TcpFrame(uint8_t type, uint8_t code, uint32_t imm, uint64_t ack, uint64_t key, uint64_t offset,
               uint64_t length) {
  Bytes h(transport::internal::kMessageHeaderBytes, 0);
  transport::internal::MessageHeader m;
  m.type = type;
  m.code = code;
  m.imm = imm;
  m.ack = ack;
  m.key = key;
  m.offset = offset;
  m.length = length;
  transport::internal::EncodeHeader(m, h.data());
  return h;
}

void TcpCorpus() {
  const std::string t = "fuzz_tcp_stream";
  enum : uint8_t { kWrite = 2, kSend = 3, kAck = 4, kNack = 5, kRead = 6, kReadResp = 7 };
  Bytes write = TcpFrame(kWrite, 0, 7, 0, 1, 100, 16);
  write.insert(write.end(), 16, 0xab);
  Write(t, "write", write);
  Bytes send = TcpFrame(kSend, 0, 0, 0, 0, 0, 8);
  send.insert(send.end(), {1, 2, 3, 4, 5, 6, 7, 8});
  Write(t, "send", send);
  const Bytes read = TcpFrame(kRead, 0, 0, 0, 1, 0, 4096);
  Write(t, "read", read);
  Write(t, "read_unknown_key", TcpFrame(kRead, 0, 0, 0, 99, 0, 16));
  Write(t, "read_out_of_range", TcpFrame(kRead, 0, 0, 0, 1, 65000, 4096));
  Bytes write_refused = TcpFrame(kWrite, 0, 1, 0, 1, 65530, 16);
  write_refused.insert(write_refused.end(), 16, 0);
  Write(t, "write_out_of_range", write_refused);
  Write(t, "read_resp_unsolicited", TcpFrame(kReadResp, 0, 0, 0, 1, 0, 0));
  Write(t, "ack_nothing", TcpFrame(kAck, 0, 0, 0, 0, 0, 0));
  Write(t, "nack_never_sent", TcpFrame(kNack, 1, 0, 1, 1, 0, 0));
  Bytes stream = write;  // several frames back to back, the reads answered in order
  stream.insert(stream.end(), read.begin(), read.end());
  stream.insert(stream.end(), send.begin(), send.end());
  const Bytes read2 = TcpFrame(kRead, 0, 0, 0, 1, 8, 8);
  stream.insert(stream.end(), read2.begin(), read2.end());
  Write(t, "stream", stream);
  Write(t, "write_truncated", Bytes(write.begin(), write.begin() + 45));
  Write(t, "header_truncated", Bytes(read.begin(), read.begin() + 20));
  Write(t, "empty", {});
}

}  // namespace
}  // namespace zipwire::fuzz

int main(int argc, char** argv) {
  namespace f = zipwire::fuzz;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  f::g_out = argv[1];
  if (!f::MakeDir(f::g_out)) return 1;
  f::HeaderCorpus();
  f::CodecCorpus();
  f::PsCorpus();
  f::BootstrapCorpus();
  f::TcpCorpus();
  return f::g_errors == 0 ? 0 : 1;
}
