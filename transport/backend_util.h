// Services shared by the backends (as UCX's ucs/ layer serves its
// transports): byte-order helpers for wire headers and the completion ring
// that Poll() drains.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "transport/backend.h"

namespace zipwire::transport::internal {

// On a little-endian host one unaligned load or store (the byte loops were
// not always merged into one, and headers are on every message's path).
template <typename T>
void PutLE(uint8_t* p, T v) {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(p, &v, sizeof(T));
  } else {
    for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
  }
}
template <typename T>
T GetLE(const uint8_t* p) {
  T v = 0;
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(&v, p, sizeof(T));
  } else {
    for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(p[i]) << (8 * i);
  }
  return v;
}

// The 40-byte little-endian header in front of every tcp frame and verbs
// message (each backend gives `type` and `code` its own meanings):
//   [0] type, [1] code, [2,4) reserved, [4,8) imm, [8,16) ack, [16,24) key,
//   [24,32) offset, [32,40) length.
struct MessageHeader {
  uint8_t type = 0;
  uint8_t code = 0;
  uint16_t reserved = 0;
  uint32_t imm = 0;
  uint64_t ack = 0;
  uint64_t key = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};
inline constexpr size_t kMessageHeaderBytes = 40;

inline void EncodeHeader(const MessageHeader& h, uint8_t* out) {
  out[0] = h.type;
  out[1] = h.code;
  PutLE<uint16_t>(out + 2, h.reserved);
  PutLE<uint32_t>(out + 4, h.imm);
  PutLE<uint64_t>(out + 8, h.ack);
  PutLE<uint64_t>(out + 16, h.key);
  PutLE<uint64_t>(out + 24, h.offset);
  PutLE<uint64_t>(out + 32, h.length);
}

inline MessageHeader DecodeHeader(const uint8_t* in) {
  MessageHeader h;
  h.type = in[0];
  h.code = in[1];
  h.reserved = GetLE<uint16_t>(in + 2);
  h.imm = GetLE<uint32_t>(in + 4);
  h.ack = GetLE<uint64_t>(in + 8);
  h.key = GetLE<uint64_t>(in + 16);
  h.offset = GetLE<uint64_t>(in + 24);
  h.length = GetLE<uint64_t>(in + 32);
  return h;
}

// [offset, offset + length) inside [0, size), without overflow.
inline bool RangeInside(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

// The initiator's checks on a one-sided post (PostWrite, PostRead), with the
// same messages on every backend; `op` names the call.
// The checks pass inline; only a failure builds its message (out of line:
// these run on every post).
[[gnu::cold, gnu::noinline]] inline Status RemoteRangeError(const char* op, const RemoteRegion& remote,
                                                            uint64_t offset, uint64_t length) {
  return OutOfRange(std::string(op) + ": remote range [" + std::to_string(offset) + ", +" +
                    std::to_string(length) + ") is outside remote region key " + std::to_string(remote.key) +
                    " of " + std::to_string(remote.length) + " bytes");
}
[[gnu::cold, gnu::noinline]] inline Status PostLengthError(const char* op, uint64_t length,
                                                           uint64_t max_bytes) {
  return InvalidArgument(std::string(op) + " of " + std::to_string(length) +
                         " bytes exceeds max_write_bytes " + std::to_string(max_bytes));
}
[[gnu::cold, gnu::noinline]] inline Status LocalRangeError(const char* op, const MemoryRegion& local,
                                                           bool live, uint64_t offset, uint64_t length) {
  if (!live) {
    return InvalidArgument(std::string(op) + ": local region key " + std::to_string(local.key) +
                           " is not a live registration of this backend");
  }
  return OutOfRange(std::string(op) + ": local range [" + std::to_string(offset) + ", +" +
                    std::to_string(length) + ") is outside local region key " + std::to_string(local.key) +
                    " of " + std::to_string(local.length) + " bytes");
}
inline Status CheckRemoteRange(const char* op, const RemoteRegion& remote, uint64_t offset, uint64_t length) {
  if (RangeInside(offset, length, remote.length)) [[likely]]
    return Status::Ok();
  return RemoteRangeError(op, remote, offset, length);
}
inline Status CheckPostLength(const char* op, uint64_t length, uint64_t max_bytes) {
  if (length <= max_bytes) [[likely]]
    return Status::Ok();
  return PostLengthError(op, length, max_bytes);
}
// `live`: the backend holds local.key as a registration of exactly
// (local.addr, local.length).
inline Status CheckLocalRange(const char* op, const MemoryRegion& local, bool live, uint64_t offset,
                              uint64_t length) {
  if (live && RangeInside(offset, length, local.length)) [[likely]]
    return Status::Ok();
  return LocalRangeError(op, local, live, offset, length);
}

// A one-entry cache in front of a hash map's lookups: a writer and its
// target use one or two regions over and over, and a hash lookup (a 64-bit
// division, a chain walk) per message shows on the small-write path.
// Unordered_map elements stay put when it rehashes, so the pointer holds
// until its entry is erased or the map cleared: call Forget() then.
template <typename Map>
class LookupCache {
 public:
  using Key = typename Map::key_type;
  using Value = typename Map::mapped_type;
  Value* Find(Map& map, const Key& key) {
    if (value_ != nullptr && key_ == key) return value_;
    auto it = map.find(key);
    if (it == map.end()) return nullptr;
    key_ = key;
    value_ = &it->second;
    return value_;
  }
  void Forget() { value_ = nullptr; }
  void Forget(const Value* v) {
    if (value_ == v) value_ = nullptr;
  }

 private:
  Key key_{};
  Value* value_ = nullptr;
};

// Grows, never shrinks: pushing a completion allocates nothing in steady state.
class CompletionRing {
 public:
  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }
  Completion& front() { return slots_[head_]; }  // !empty()
  void pop_front() {                             // !empty()
    head_ = (head_ + 1) & (slots_.size() - 1);
    --count_;
  }
  void Push(Completion c) {
    if (count_ == slots_.size()) Grow();
    slots_[(head_ + count_) & (slots_.size() - 1)] = std::move(c);
    ++count_;
  }
  // The next slot, reset to a default Completion, to be filled in place:
  // on a busy path the usual construct-then-move costs a Completion's worth
  // of moves (its Status and message) twice per completion.
  Completion& Emplace() {
    if (count_ == slots_.size()) [[unlikely]]
      Grow();
    Completion& c = slots_[(head_ + count_) & (slots_.size() - 1)];
    ++count_;
    c.type = CompletionType::kWriteDone;
    if (!c.status.ok() || !c.status.message().empty()) c.status = Status::Ok();
    c.peer = kInvalidPeer;
    c.context = 0;
    c.imm = 0;
    c.key = 0;
    c.offset = 0;
    c.length = 0;
    c.message.clear();
    return c;
  }
  size_t PopInto(std::span<Completion> out) {
    size_t n = std::min(out.size(), count_);
    for (size_t i = 0; i < n; ++i) {
      out[i] = std::move(slots_[head_]);
      head_ = (head_ + 1) & (slots_.size() - 1);
    }
    count_ -= n;
    return n;
  }

 private:
  [[gnu::noinline]] void Grow() {
    std::vector<Completion> next(std::max<size_t>(64, slots_.size() * 2));
    for (size_t i = 0; i < count_; ++i) next[i] = std::move(slots_[(head_ + i) & (slots_.size() - 1)]);
    slots_.swap(next);
    head_ = 0;
  }
  std::vector<Completion> slots_;
  size_t head_ = 0;
  size_t count_ = 0;
};

}  // namespace zipwire::transport::internal
