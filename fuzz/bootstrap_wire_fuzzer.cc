// Fuzzes the bootstrap (scheduler) wire decoders of transport/bootstrap_wire.h
// the way a connection sees them: the bytes are fed to a FrameSplitter in
// pieces whose sizes come from the input, and every frame it yields goes to
// the decoder its type names. The whole input is also tried as a bare payload
// for every decoder, and as an address.
//
// Canonical messages (REGISTER, ASSIGN, BARRIER) that decode must encode back
// to the same payload. ERROR is not canonical (its reason is escaped on
// decode) and LEAVE has no fields.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_check.h"
#include "transport/bootstrap_wire.h"

namespace bw = zipwire::transport::bootstrap_wire;

namespace {

// The payload part of a frame built by an Encode* function.
std::vector<uint8_t> PayloadOf(const std::vector<uint8_t>& frame) {
  ZW_FUZZ_CHECK(frame.size() >= bw::kLengthBytes + 1, "encoder built a frame without a type byte");
  return std::vector<uint8_t>(frame.begin() + bw::kLengthBytes + 1, frame.end());
}

void DecodeAll(uint8_t type, std::span<const uint8_t> payload) {
  const std::vector<uint8_t> bytes(payload.begin(), payload.end());
  switch (static_cast<bw::MsgType>(type)) {
    case bw::MsgType::kRegister: {
      auto m = bw::DecodeRegister(payload);
      if (m.ok()) {
        ZW_FUZZ_CHECK(bw::ValidateAddress(m->address).ok(), "REGISTER accepted an invalid address");
        ZW_FUZZ_CHECK(PayloadOf(bw::EncodeRegister(m.value())) == bytes, "REGISTER does not re-encode");
      }
      break;
    }
    case bw::MsgType::kAssign: {
      auto m = bw::DecodeAssign(payload);
      if (m.ok()) {
        ZW_FUZZ_CHECK(m->self_rank < m->nodes.size(), "ASSIGN self rank outside the node table");
        ZW_FUZZ_CHECK(PayloadOf(bw::EncodeAssign(m.value())) == bytes, "ASSIGN does not re-encode");
      }
      break;
    }
    case bw::MsgType::kBarrier:
    case bw::MsgType::kBarrierRelease: {
      auto m = bw::DecodeBarrier(payload);
      if (m.ok()) {
        ZW_FUZZ_CHECK(PayloadOf(bw::EncodeBarrier(static_cast<bw::MsgType>(type), m->seq)) == bytes,
                      "BARRIER does not re-encode");
      }
      break;
    }
    case bw::MsgType::kLeave:
      (void)bw::DecodeLeave(payload);
      break;
    case bw::MsgType::kError: {
      auto m = bw::DecodeError(payload);
      if (m.ok()) (void)bw::EncodeError(m.value());
      break;
    }
    default:
      (void)bw::MsgTypeName(type);
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Every decoder on the raw bytes, as if a frame of each type carried them.
  for (uint8_t t = 1; t <= 6; ++t) DecodeAll(t, std::span<const uint8_t>(data, size));

  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::string host;
  uint16_t port = 0;
  if (bw::SplitAddress(text, &host, &port).ok()) {
    ZW_FUZZ_CHECK(bw::ValidateAddress(text).ok(), "SplitAddress and ValidateAddress disagree");
    ZW_FUZZ_CHECK(!host.empty() && port != 0, "split an address into an empty host or port 0");
  }

  // The stream: piece sizes cycle through the first bytes of the input so
  // that frames arrive split at every kind of boundary.
  bw::FrameSplitter splitter;
  size_t pos = 0;
  size_t piece_index = 0;
  while (pos < size) {
    const size_t piece = 1 + data[piece_index++ % size] % 23;
    const size_t n = piece < size - pos ? piece : size - pos;
    splitter.Append(data + pos, n);
    pos += n;
    while (true) {
      uint8_t type = 0;
      std::span<const uint8_t> payload;
      std::string error;
      const bw::FrameSplitter::State s = splitter.Next(&type, &payload, &error);
      if (s == bw::FrameSplitter::State::kFrame) {
        ZW_FUZZ_CHECK(payload.size() + 1 <= bw::kMaxFrameBytes, "frame larger than the limit");
        DecodeAll(type, payload);
        continue;
      }
      if (s == bw::FrameSplitter::State::kError) {
        ZW_FUZZ_CHECK(!error.empty(), "frame error without a reason");
        return 0;  // a connection is dropped on the first bad frame
      }
      break;
    }
  }
  return 0;
}
