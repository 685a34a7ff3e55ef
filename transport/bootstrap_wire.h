// Wire format of the bootstrap (scheduler) protocol: frame builder, frame
// splitter and per-message encode/decode with full validation. Shared by the
// scheduler, the client and the tests (which forge frames from raw sockets).
// The format itself is documented at the top of bootstrap.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "transport/bootstrap.h"

namespace zipwire::transport::bootstrap_wire {

// The u32 length prefix counts the type byte plus the payload.
inline constexpr size_t kLengthBytes = 4;
inline constexpr size_t kMaxFrameBytes = 64 * 1024;
inline constexpr size_t kMaxAddressBytes = 255;
// Keeps the ASSIGN table inside one frame for realistic address lengths.
inline constexpr uint32_t kMaxNodes = 4096;

enum class MsgType : uint8_t {
  kRegister = 1,        // node -> scheduler
  kAssign = 2,          // scheduler -> node
  kBarrier = 3,         // node -> scheduler
  kBarrierRelease = 4,  // scheduler -> node
  kLeave = 5,           // node -> scheduler
  kError = 6,           // scheduler -> node
};
const char* MsgTypeName(uint8_t type);

// "host:port": host non-empty printable ASCII without spaces ("[v6]" allowed),
// port a decimal 1..65535, at most kMaxAddressBytes in all.
Status ValidateAddress(std::string_view address);
// Splits a validated address; strips the brackets of "[v6]:port".
Status SplitAddress(std::string_view address, std::string* host, uint16_t* port);

inline constexpr uint32_t kAnyRoleRank = 0xffffffffu;

struct RegisterMsg {
  Role role = Role::kWorker;
  std::string address;
  uint32_t requested_role_rank = kAnyRoleRank;  // a fixed index within the role, or any
};
struct BarrierMsg {
  uint32_t seq = 0;
};
struct ErrorMsg {
  StatusCode code = StatusCode::kUnavailable;
  std::string reason;
};

// Each Encode* returns a complete frame (length prefix included).
std::vector<uint8_t> EncodeRegister(const RegisterMsg& msg);
std::vector<uint8_t> EncodeAssign(const ClusterView& view);
std::vector<uint8_t> EncodeBarrier(MsgType type, uint32_t seq);  // kBarrier / kBarrierRelease
std::vector<uint8_t> EncodeLeave();
std::vector<uint8_t> EncodeError(const ErrorMsg& msg);
// Frames a raw payload; for tests that forge malformed messages.
std::vector<uint8_t> EncodeFrame(uint8_t type, std::span<const uint8_t> payload);

// Each Decode* takes the payload (after the type byte) and rejects truncated
// input, trailing bytes and out-of-range fields with kCorrupt.
Result<RegisterMsg> DecodeRegister(std::span<const uint8_t> payload);
Result<ClusterView> DecodeAssign(std::span<const uint8_t> payload);
Result<BarrierMsg> DecodeBarrier(std::span<const uint8_t> payload);
Status DecodeLeave(std::span<const uint8_t> payload);
Result<ErrorMsg> DecodeError(std::span<const uint8_t> payload);

// Splits a byte stream into frames. Bytes are appended as they arrive; Next()
// yields whole frames. A bad length prefix is reported as soon as its four
// bytes are in, so an oversize claim never makes the reader wait for it.
class FrameSplitter {
 public:
  enum class State { kNeedMore, kFrame, kError };

  void Append(const uint8_t* data, size_t n) { buf_.insert(buf_.end(), data, data + n); }
  // On kFrame sets *type and *payload (valid until the next Next/Append call).
  State Next(uint8_t* type, std::span<const uint8_t>* payload, std::string* error);
  // Bytes of an incomplete frame waiting for the rest.
  size_t pending() const { return buf_.size() - pos_; }

 private:
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
};

}  // namespace zipwire::transport::bootstrap_wire
