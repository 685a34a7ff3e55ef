// Status codes and Result<T>: errors are values on the data path, never aborts.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>

namespace zipwire {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,     // a caller passed something wrong (flag, size, spec)
  kOutOfRange,          // an access outside a registered or allocated range
  kCorrupt,             // malformed bytes (network input, codec buffer, file)
  kNotFound,            // unknown name, id or file
  kAlreadyExists,       // duplicate declaration or registration
  kFailedPrecondition,  // call made in the wrong state
  kUnavailable,         // peer unreachable / not listening
  kTimeout,             // a bounded wait expired
  kPeerClosed,          // a peer went away with operations pending
  kCancelled,           // operation failed because its owner closed
  kResourceExhausted,   // a bounded resource is full (memory lock limit, window)
  kNotSupported,        // capability not offered by this backend / build
  kIoError,             // OS-level I/O error
  kInternal,            // a bug: an invariant of zipwire itself broke
};

const char* StatusCodeName(StatusCode code);

// A status is a code and, for errors, a message. The message lives on the
// heap behind one pointer, so an OK status (every call on a data path) is
// built, moved, tested and destroyed with a couple of register operations:
// completions carry a Status and are moved once or twice per message.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message)
      : code_(code),
        message_(message.empty() ? nullptr : std::make_unique<std::string>(std::move(message))) {}
  Status(const Status& other)
      : code_(other.code_),
        message_(other.message_ ? std::make_unique<std::string>(*other.message_) : nullptr) {}
  Status& operator=(const Status& other) {
    code_ = other.code_;  // the copy is made before the old message goes: self-assignment is safe
    message_ = other.message_ ? std::make_unique<std::string>(*other.message_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;
  ~Status() = default;

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_ != nullptr ? *message_ : kEmptyMessage; }
  // "PEER_CLOSED: server 1 (127.0.0.1:4000) disconnected"
  std::string ToString() const;

  // Prefixes context to the message, keeping the code.
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message());
  }

 private:
  static inline const std::string kEmptyMessage{};  // constant-initialized

  StatusCode code_ = StatusCode::kOk;
  std::unique_ptr<std::string> message_;  // null when the message is empty
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status Corrupt(std::string m) { return {StatusCode::kCorrupt, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status Timeout(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
inline Status PeerClosed(std::string m) { return {StatusCode::kPeerClosed, std::move(m)}; }
inline Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status NotSupported(std::string m) { return {StatusCode::kNotSupported, std::move(m)}; }
inline Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "Result built from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace zipwire

#define ZW_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::zipwire::Status zw_status_ = (expr);   \
    if (!zw_status_.ok()) return zw_status_; \
  } while (0)

#define ZW_CONCAT_INNER(a, b) a##b
#define ZW_CONCAT(a, b) ZW_CONCAT_INNER(a, b)
#define ZW_ASSIGN_OR_RETURN(lhs, expr) ZW_ASSIGN_OR_RETURN_IMPL(ZW_CONCAT(zw_result_, __LINE__), lhs, expr)
#define ZW_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
