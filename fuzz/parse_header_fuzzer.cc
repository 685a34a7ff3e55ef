// Fuzzes kernels::ParseHeader, the first thing every decoder runs on bytes from
// the network. Beyond "no crash, no UB": an accepted header must describe the
// buffer exactly (32 + params + payload == size) and re-encode to the same
// 32 bytes, since anything ParseHeader lets through is trusted downstream.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "fuzz/fuzz_check.h"
#include "kernels/codec.h"

namespace zk = zipwire::kernels;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  auto h = zk::ParseHeader(in);
  if (!h.ok()) return 0;
  ZW_FUZZ_CHECK(size >= zk::WireHeader::kBytes, "accepted a buffer shorter than the header");
  ZW_FUZZ_CHECK(h->version == zk::WireHeader::kVersion, "accepted an unknown version");
  ZW_FUZZ_CHECK(zk::CodecForId(h->codec).ok(), "accepted an unregistered codec id");
  ZW_FUZZ_CHECK(h->param_bytes <= size - zk::WireHeader::kBytes, "param block overruns the buffer");
  ZW_FUZZ_CHECK(h->payload_bytes == size - zk::WireHeader::kBytes - h->param_bytes,
                "payload size does not match the buffer");
  uint8_t again[zk::WireHeader::kBytes];
  zk::EncodeHeader(h.value(), std::span<uint8_t, zk::WireHeader::kBytes>(again));
  ZW_FUZZ_CHECK(std::memcmp(again, data, zk::WireHeader::kBytes) == 0, "header does not re-encode to itself");
  return 0;
}
