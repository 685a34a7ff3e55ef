// Status and Result<T>: the error-as-value plumbing every layer relies on.
#include "core/status.h"

#include <gtest/gtest.h>

#include <memory>
#include <set>
#include <string>

// GCC 12 at -O3 reports a false maybe-uninitialized on the destructor of a
// std::variant<int, Status> holding the int (a known GCC false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace zipwire {
namespace {

TEST(Status, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(Status::Ok().ok());
}

TEST(Status, CarriesCodeAndMessage) {
  Status s = PeerClosed("server 1 (127.0.0.1:4000) disconnected");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kPeerClosed);
  EXPECT_EQ(s.message(), "server 1 (127.0.0.1:4000) disconnected");
  EXPECT_EQ(s.ToString(), "PEER_CLOSED: server 1 (127.0.0.1:4000) disconnected");
}

TEST(Status, HelpersMapToCodes) {
  EXPECT_EQ(InvalidArgument("x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(OutOfRange("x").code(), StatusCode::kOutOfRange);
  EXPECT_EQ(Corrupt("x").code(), StatusCode::kCorrupt);
  EXPECT_EQ(NotFound("x").code(), StatusCode::kNotFound);
  EXPECT_EQ(FailedPrecondition("x").code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Unavailable("x").code(), StatusCode::kUnavailable);
  EXPECT_EQ(Timeout("x").code(), StatusCode::kTimeout);
  EXPECT_EQ(PeerClosed("x").code(), StatusCode::kPeerClosed);
  EXPECT_EQ(Cancelled("x").code(), StatusCode::kCancelled);
  EXPECT_EQ(NotSupported("x").code(), StatusCode::kNotSupported);
  EXPECT_EQ(IoError("x").code(), StatusCode::kIoError);
  EXPECT_EQ(Internal("x").code(), StatusCode::kInternal);
}

TEST(Status, EveryCodeHasADistinctName) {
  std::set<std::string> names;
  for (int c = 0; c <= static_cast<int>(StatusCode::kInternal); ++c) {
    const std::string name = StatusCodeName(static_cast<StatusCode>(c));
    EXPECT_NE(name, "UNKNOWN") << c;
    EXPECT_TRUE(names.insert(name).second) << name;
  }
  EXPECT_STREQ(StatusCodeName(static_cast<StatusCode>(200)), "UNKNOWN");
}

TEST(Status, WithContextPrefixesAndKeepsCode) {
  Status s = Timeout("no reply").WithContext("push tensor 3");
  EXPECT_EQ(s.code(), StatusCode::kTimeout);
  EXPECT_EQ(s.message(), "push tensor 3: no reply");
  EXPECT_TRUE(Status::Ok().WithContext("ignored").ok());
  EXPECT_EQ(Status::Ok().WithContext("ignored").message(), "");
}

// The message sits behind one owned pointer (an OK status is then a byte
// and a null pointer); copies must own their own message.
TEST(Status, CopiesOwnTheirMessage) {
  Status a = Corrupt("bad header");
  Status b = a;
  EXPECT_EQ(b.code(), StatusCode::kCorrupt);
  EXPECT_EQ(b.message(), "bad header");
  EXPECT_NE(&a.message(), &b.message());
  Status c = Timeout("t");
  c = a;
  EXPECT_EQ(c.code(), StatusCode::kCorrupt);
  EXPECT_EQ(c.message(), "bad header");
  a = Status::Ok();
  EXPECT_TRUE(a.ok());
  EXPECT_EQ(a.message(), "");
  EXPECT_EQ(b.message(), "bad header");  // untouched by a's reassignment
  EXPECT_EQ(c.message(), "bad header");
  Status& self = c;
  c = self;
  EXPECT_EQ(c.ToString(), "CORRUPT: bad header");
}

TEST(Status, MovesTransferTheMessage) {
  Status a = PeerClosed("peer 2 gone");
  Status b = std::move(a);
  EXPECT_EQ(b.code(), StatusCode::kPeerClosed);
  EXPECT_EQ(b.message(), "peer 2 gone");
  Status c;
  c = std::move(b);
  EXPECT_EQ(c.ToString(), "PEER_CLOSED: peer 2 gone");
  c = Status::Ok();
  EXPECT_TRUE(c.ok());
  EXPECT_EQ(c.ToString(), "OK");
}

TEST(Status, ErrorWithEmptyMessageKeepsItsCode) {
  Status s(StatusCode::kIoError, "");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "IO_ERROR: ");
  EXPECT_EQ(Status(s).code(), StatusCode::kIoError);
}

TEST(Result, HoldsValueOrStatus) {
  Result<int> v = 42;
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 42);
  EXPECT_EQ(v.value(), 42);
  EXPECT_TRUE(v.status().ok());

  Result<int> e = NotFound("no such key");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(e.status().message(), "no such key");
}

TEST(Result, FromOkStatusIsAnInternalError) {
  Result<int> r = Status::Ok();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

TEST(Result, MoveOnlyValuesAndArrow) {
  Result<std::unique_ptr<std::string>> r = std::make_unique<std::string>("abc");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->size(), 3u);
  std::unique_ptr<std::string> p = std::move(r).value();
  EXPECT_EQ(*p, "abc");
  Result<std::string> s = std::string("hello");
  EXPECT_EQ(s->size(), 5u);
}

Result<int> Half(int x) {
  if (x % 2 != 0) return InvalidArgument("odd: " + std::to_string(x));
  return x / 2;
}

Result<int> Quarter(int x) {
  ZW_ASSIGN_OR_RETURN(int h, Half(x));
  ZW_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

Status CheckEven(int x) {
  ZW_RETURN_IF_ERROR(Half(x).status());
  return Status::Ok();
}

TEST(Macros, PropagateErrorsAndValues) {
  ASSERT_TRUE(Quarter(8).ok());
  EXPECT_EQ(*Quarter(8), 2);
  auto r = Quarter(6);  // 6 -> 3 -> odd
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "odd: 3");
  EXPECT_TRUE(CheckEven(4).ok());
  EXPECT_EQ(CheckEven(5).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace zipwire
