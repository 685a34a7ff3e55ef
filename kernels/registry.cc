// The codec registry: name -> factory, and id -> a shared default decoder.
//
// The registry is built on first use inside a function-local static, so the
// built-ins are present whatever the order of static initialisation, and it is
// never destroyed, so codecs handed out by CodecForId stay valid until exit.
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "kernels/codec.h"
#include "kernels/codec_internal.h"

namespace zipwire::kernels {

namespace {

struct Entry {
  CodecId id;
  CodecFactory factory;
};

struct Registry {
  std::mutex mu;
  std::map<std::string, Entry> by_name;
  std::map<CodecId, std::string> name_of_id;
  // Default-parameter instances for CodecForId, built lazily, never freed.
  std::map<CodecId, std::unique_ptr<Codec>> decoders;
  // Registered ids as a bitset, read without the lock by ParseHeader on every
  // decode; bits are only ever set.
  std::atomic<uint64_t> id_bits[4] = {};

  Status Add(const std::string& name, CodecId id, CodecFactory factory) {
    if (name.empty()) return InvalidArgument("codec name is empty");
    if (factory == nullptr) return InvalidArgument("codec '" + name + "' registered without a factory");
    auto parsed = CodecSpec::Parse(name);
    if (!parsed.ok() || !parsed->params.empty()) {
      return InvalidArgument("codec name '" + name + "' must be [a-z0-9_-]");
    }
    std::lock_guard<std::mutex> lock(mu);
    if (by_name.count(name) != 0)
      return Status(StatusCode::kAlreadyExists, "codec '" + name + "' already registered");
    auto id_it = name_of_id.find(id);
    if (id_it != name_of_id.end()) {
      return Status(StatusCode::kAlreadyExists, "codec id " + std::to_string(static_cast<int>(id)) +
                                                    " already registered as '" + id_it->second + "'");
    }
    by_name.emplace(name, Entry{id, factory});
    name_of_id.emplace(id, name);
    const auto bit = static_cast<uint8_t>(id);
    id_bits[bit / 64].fetch_or(uint64_t{1} << (bit % 64), std::memory_order_release);
    return Status::Ok();
  }

  // Caller holds mu.
  std::string KnownNames() const {
    std::string s;
    for (const auto& [name, entry] : by_name) {
      if (!s.empty()) s += ", ";
      s += name;
    }
    return s;
  }
};

Registry& GetRegistry() {
  static Registry* registry = [] {
    auto* r = new Registry;
    // Built-ins cannot collide with each other; a failure would be a bug here.
    (void)r->Add("none", CodecId::kNone, internal::MakeNoneCodec);
    (void)r->Add("fp16", CodecId::kFp16, internal::MakeFp16Codec);
    (void)r->Add("onebit", CodecId::kOnebit, internal::MakeOnebitCodec);
    (void)r->Add("bf16", CodecId::kBf16, internal::MakeBf16Codec);
    (void)r->Add("topk", CodecId::kTopk, internal::MakeTopkCodec);
    (void)r->Add("topk_sampled", CodecId::kTopkSampled, internal::MakeTopkSampledCodec);
    (void)r->Add("randomk", CodecId::kRandomk, internal::MakeRandomkCodec);
    (void)r->Add("dithering", CodecId::kDithering, internal::MakeDitheringCodec);
    (void)r->Add("terngrad", CodecId::kTerngrad, internal::MakeTerngradCodec);
    (void)r->Add("countsketch", CodecId::kCountSketch, internal::MakeCountSketchCodec);
    return r;
  }();
  return *registry;
}

}  // namespace

namespace internal {
bool IsRegisteredCodecId(uint8_t id) {
  return (GetRegistry().id_bits[id / 64].load(std::memory_order_acquire) >> (id % 64)) & 1u;
}
}  // namespace internal

Status RegisterCodec(const std::string& name, CodecId id, CodecFactory factory) {
  return GetRegistry().Add(name, id, factory);
}

Result<std::unique_ptr<Codec>> CreateCodec(const CodecSpec& spec) {
  Registry& r = GetRegistry();
  CodecFactory factory = nullptr;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.by_name.find(spec.name);
    if (it == r.by_name.end()) {
      return NotFound("unknown codec '" + spec.name + "' (known: " + r.KnownNames() + ")");
    }
    factory = it->second.factory;
  }
  // Outside the lock: a factory may itself look codecs up.
  auto codec = factory(spec);
  if (!codec.ok()) return codec.status();
  if (codec.value() == nullptr) return Internal("factory of codec '" + spec.name + "' returned null");
  return codec;
}

Result<std::unique_ptr<Codec>> CreateCodec(const std::string& spec_text) {
  ZW_ASSIGN_OR_RETURN(CodecSpec spec, CodecSpec::Parse(spec_text));
  return CreateCodec(spec);
}

Result<const Codec*> CodecForId(CodecId id) {
  Registry& r = GetRegistry();
  std::string name;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    auto dec = r.decoders.find(id);
    if (dec != r.decoders.end()) return static_cast<const Codec*>(dec->second.get());
    auto it = r.name_of_id.find(id);
    if (it == r.name_of_id.end()) {
      return NotFound("no codec registered for id " + std::to_string(static_cast<int>(id)));
    }
    name = it->second;
  }
  CodecSpec spec;
  spec.name = name;
  auto made = CreateCodec(spec);
  if (!made.ok())
    return made.status().WithContext("default codec for id " + std::to_string(static_cast<int>(id)));
  std::lock_guard<std::mutex> lock(r.mu);
  // Another thread may have won the race; keep the first so pointers stay stable.
  auto it = r.decoders.emplace(id, std::move(made).value()).first;
  return static_cast<const Codec*>(it->second.get());
}

}  // namespace zipwire::kernels
