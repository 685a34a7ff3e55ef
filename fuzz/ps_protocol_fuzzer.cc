// Fuzzes the parameter-server control protocol decoders (ps/protocol.h):
// PeekType, DecodeDeclare, DecodeDeclareAck. Every field is fixed-width or
// length-prefixed, so the encoding is canonical: a message that decodes must
// encode back to exactly the same bytes (anything else means a decoder skipped
// or misread bytes).
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "fuzz/fuzz_check.h"
#include "ps/protocol.h"

namespace ps = zipwire::ps;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  auto type = ps::PeekType(in);
  auto declare = ps::DecodeDeclare(in);
  auto ack = ps::DecodeDeclareAck(in);
  if (declare.ok()) {
    ZW_FUZZ_CHECK(type.ok() && type.value() == ps::MessageType::kDeclare,
                  "DECLARE decoded under another type");
    ZW_FUZZ_CHECK(ps::Encode(declare.value()) == std::vector<uint8_t>(data, data + size),
                  "DECLARE does not re-encode to its bytes");
  }
  if (ack.ok()) {
    ZW_FUZZ_CHECK(type.ok() && type.value() == ps::MessageType::kDeclareAck,
                  "DECLARE_ACK decoded under another type");
    ZW_FUZZ_CHECK(ps::Encode(ack.value()) == std::vector<uint8_t>(data, data + size),
                  "DECLARE_ACK does not re-encode to its bytes");
  }
  return 0;
}
