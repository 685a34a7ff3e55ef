#include "ps/protocol.h"

#include <cstring>

namespace zipwire::ps {

namespace {

// Upper bound on chunks per message: a tensor has at most 2^20 chunks.
constexpr uint32_t kMaxChunks = 1u << 20;

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(v); }
  void U16(uint16_t v) { Raw(&v, 2); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void Str(const std::string& s) {
    U16(static_cast<uint16_t>(s.size() > 0xffff ? 0xffff : s.size()));
    out_.insert(out_.end(), s.begin(), s.begin() + (s.size() > 0xffff ? 0xffff : s.size()));
  }
  void Region(const transport::RemoteRegion& r) {
    uint8_t buf[transport::kRemoteRegionWireBytes];
    transport::EncodeRemoteRegion(r, buf);
    Raw(buf, sizeof(buf));
  }
  std::vector<uint8_t> Take() { return std::move(out_); }

 private:
  void Raw(const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  std::vector<uint8_t> out_;
};

// Bounds-checked reader: the first short read sticks as an error.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  uint8_t U8() {
    uint8_t v = 0;
    Raw(&v, 1);
    return v;
  }
  uint16_t U16() {
    uint16_t v = 0;
    Raw(&v, 2);
    return v;
  }
  uint32_t U32() {
    uint32_t v = 0;
    Raw(&v, 4);
    return v;
  }
  uint64_t U64() {
    uint64_t v = 0;
    Raw(&v, 8);
    return v;
  }
  std::string Str() {
    uint16_t n = U16();
    if (!Need(n)) return {};
    std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  transport::RemoteRegion Region() {
    if (!Need(transport::kRemoteRegionWireBytes)) return {};
    transport::RemoteRegion r = transport::DecodeRemoteRegion(in_.data() + pos_);
    pos_ += transport::kRemoteRegionWireBytes;
    return r;
  }
  bool ok() const { return ok_; }
  size_t remaining() const { return in_.size() - pos_; }
  Status Finish(const char* what) const {
    if (!ok_) return Corrupt(std::string(what) + " message is truncated");
    if (pos_ != in_.size()) {
      return Corrupt(std::string(what) + " message has " + std::to_string(in_.size() - pos_) +
                     " trailing bytes");
    }
    return Status::Ok();
  }

 private:
  bool Need(size_t n) {
    if (!ok_ || in_.size() - pos_ < n) {
      ok_ = false;
      return false;
    }
    return true;
  }
  void Raw(void* p, size_t n) {
    if (!Need(n)) return;
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
  }
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace

std::vector<uint8_t> Encode(const DeclareMessage& m) {
  Writer w;
  w.U8(static_cast<uint8_t>(MessageType::kDeclare));
  w.U64(m.tensor_id);
  w.U64(m.elements);
  w.U64(m.partition_bytes);
  w.Str(m.codec);
  w.U8(m.flags);
  w.Region(m.worker_recv);
  w.U32(static_cast<uint32_t>(m.chunks.size()));
  for (const auto& c : m.chunks) {
    w.U32(c.chunk_index);
    w.U32(c.worker_handle);
    w.U64(c.recv_offset);
    w.U64(c.slot_bytes);
  }
  return w.Take();
}

std::vector<uint8_t> Encode(const DeclareAckMessage& m) {
  Writer w;
  w.U8(static_cast<uint8_t>(MessageType::kDeclareAck));
  w.U64(m.tensor_id);
  w.U8(static_cast<uint8_t>(m.code));
  w.Str(m.message);
  w.Region(m.server_slots);
  w.U32(static_cast<uint32_t>(m.chunks.size()));
  for (const auto& c : m.chunks) {
    w.U32(c.chunk_index);
    w.U32(c.server_handle);
    w.U64(c.slot_offset);
    w.U64(c.slot_bytes);
  }
  return w.Take();
}

std::vector<uint8_t> EncodeBye(MessageType type) { return {static_cast<uint8_t>(type)}; }

Result<MessageType> PeekType(std::span<const uint8_t> bytes) {
  if (bytes.empty()) return Corrupt("empty control message");
  uint8_t t = bytes[0];
  if (t < 1 || t > 4) return Corrupt("unknown control message type " + std::to_string(t));
  return static_cast<MessageType>(t);
}

Result<DeclareMessage> DecodeDeclare(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  if (r.U8() != static_cast<uint8_t>(MessageType::kDeclare)) return Corrupt("not a DECLARE message");
  DeclareMessage m;
  m.tensor_id = r.U64();
  m.elements = r.U64();
  m.partition_bytes = r.U64();
  m.codec = r.Str();
  m.flags = r.U8();
  m.worker_recv = r.Region();
  uint32_t n = r.U32();
  if (!r.ok()) return Corrupt("DECLARE message is truncated");
  // Each chunk takes 24 bytes: check before allocating for an untrusted count.
  if (n > kMaxChunks || r.remaining() / 24 < n) {
    return Corrupt("DECLARE message claims " + std::to_string(n) + " chunks in " +
                   std::to_string(r.remaining()) + " bytes");
  }
  m.chunks.resize(n);
  for (auto& c : m.chunks) {
    c.chunk_index = r.U32();
    c.worker_handle = r.U32();
    c.recv_offset = r.U64();
    c.slot_bytes = r.U64();
  }
  ZW_RETURN_IF_ERROR(r.Finish("DECLARE"));
  return m;
}

Result<DeclareAckMessage> DecodeDeclareAck(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  if (r.U8() != static_cast<uint8_t>(MessageType::kDeclareAck)) return Corrupt("not a DECLARE_ACK message");
  DeclareAckMessage m;
  m.tensor_id = r.U64();
  uint8_t code = r.U8();
  if (code > static_cast<uint8_t>(StatusCode::kInternal)) return Corrupt("DECLARE_ACK has a bad status code");
  m.code = static_cast<StatusCode>(code);
  m.message = r.Str();
  m.server_slots = r.Region();
  uint32_t n = r.U32();
  if (!r.ok()) return Corrupt("DECLARE_ACK message is truncated");
  if (n > kMaxChunks || r.remaining() / 24 < n) {
    return Corrupt("DECLARE_ACK message claims " + std::to_string(n) + " chunks in " +
                   std::to_string(r.remaining()) + " bytes");
  }
  m.chunks.resize(n);
  for (auto& c : m.chunks) {
    c.chunk_index = r.U32();
    c.server_handle = r.U32();
    c.slot_offset = r.U64();
    c.slot_bytes = r.U64();
  }
  ZW_RETURN_IF_ERROR(r.Finish("DECLARE_ACK"));
  return m;
}

}  // namespace zipwire::ps
