// ZIPWIRE_* configuration: sizes with units, and malformed values that must
// be errors naming the variable rather than silently ignored.
#include "core/config.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <string>

namespace zipwire {
namespace {

TEST(ParseBytes, PlainNumbersAndUnits) {
  EXPECT_EQ(*ParseBytes("0"), 0u);
  EXPECT_EQ(*ParseBytes("1048576"), 1048576u);
  EXPECT_EQ(*ParseBytes("64k"), 64u << 10);
  EXPECT_EQ(*ParseBytes("64K"), 64u << 10);
  EXPECT_EQ(*ParseBytes("4M"), 4u << 20);
  EXPECT_EQ(*ParseBytes("4m"), 4u << 20);
  EXPECT_EQ(*ParseBytes("1G"), 1ull << 30);
  EXPECT_EQ(*ParseBytes("4MB"), 4u << 20);
  EXPECT_EQ(*ParseBytes("18446744073709551615"), UINT64_MAX);
  EXPECT_EQ(*ParseBytes("17179869183G"), 17179869183ull << 30);
}

TEST(ParseBytes, Overflow) {
  for (const char* text : {"18446744073709551616", "99999999999999999999999", "17179869184G",
                           "18014398509481984K", "17592186044416M"}) {
    auto r = ParseBytes(text);
    ASSERT_FALSE(r.ok()) << text << " -> " << *r;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("overflow"), std::string::npos) << r.status().message();
  }
}

TEST(ParseBytes, Garbage) {
  for (const char* text :
       {"", "abc", "M", "-1", "+1", " 4", "4 ", "4X", "4MM", "4MBx", "1.5M", "0x10", "4k4"}) {
    auto r = ParseBytes(text);
    EXPECT_FALSE(r.ok()) << "'" << text << "' parsed as " << *r;
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    }
  }
}

// Sets ZIPWIRE_<name> for one test and restores the environment afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const std::string& name, const char* value) : var_("ZIPWIRE_" + name) {
    if (value == nullptr) {
      unsetenv(var_.c_str());
    } else {
      setenv(var_.c_str(), value, 1);
    }
  }
  ~ScopedEnv() { unsetenv(var_.c_str()); }

 private:
  std::string var_;
};

TEST(EnvUint, UnsetOrEmptyGivesFallback) {
  ScopedEnv env("TEST_UINT", nullptr);
  EXPECT_EQ(*EnvUint("TEST_UINT", 17), 17u);
  ScopedEnv empty("TEST_UINT", "");
  EXPECT_EQ(*EnvUint("TEST_UINT", 18), 18u);
}

TEST(EnvUint, ParsesSizes) {
  ScopedEnv env("TEST_UINT", "4M");
  EXPECT_EQ(*EnvUint("TEST_UINT", 0), 4u << 20);
}

TEST(EnvUint, MalformedNamesTheVariable) {
  for (const char* bad : {"12q", "lots", "-3", "99999999999999999999999"}) {
    ScopedEnv env("TEST_UINT", bad);
    auto r = EnvUint("TEST_UINT", 0);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("ZIPWIRE_TEST_UINT"), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find(bad), std::string::npos) << r.status().message();
  }
}

TEST(EnvIndex, UnsetKeepsFallbackAndDecimalParses) {
  ScopedEnv unset("TEST_INDEX", nullptr);
  EXPECT_FALSE(EnvIndex("TEST_INDEX", std::nullopt)->has_value());
  EXPECT_EQ(EnvIndex("TEST_INDEX", 3u)->value(), 3u);
  ScopedEnv env("TEST_INDEX", "12");
  EXPECT_EQ(EnvIndex("TEST_INDEX", std::nullopt)->value(), 12u);
  ScopedEnv largest("TEST_INDEX", "4294967294");
  EXPECT_EQ(EnvIndex("TEST_INDEX", std::nullopt)->value(), 4294967294u);
}

TEST(EnvIndex, RejectsAnythingButADecimalIndex) {
  for (const char* bad : {"1k", "-1", "0x3", " 2", "4294967295", "99999999999999999999999"}) {
    ScopedEnv env("TEST_INDEX", bad);
    auto r = EnvIndex("TEST_INDEX", std::nullopt);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("ZIPWIRE_TEST_INDEX"), std::string::npos) << r.status().message();
  }
}

TEST(EnvBool, AcceptedSpellings) {
  for (const char* yes : {"1", "y", "yes", "YES", "on", "true", "True"}) {
    ScopedEnv env("TEST_BOOL", yes);
    EXPECT_TRUE(*EnvBool("TEST_BOOL", false)) << yes;
  }
  for (const char* no : {"0", "n", "no", "off", "false", "FALSE"}) {
    ScopedEnv env("TEST_BOOL", no);
    EXPECT_FALSE(*EnvBool("TEST_BOOL", true)) << no;
  }
  ScopedEnv unset("TEST_BOOL", nullptr);
  EXPECT_TRUE(*EnvBool("TEST_BOOL", true));
  EXPECT_FALSE(*EnvBool("TEST_BOOL", false));
}

TEST(EnvBool, MalformedNamesTheVariable) {
  for (const char* bad : {"maybe", "2", "yess", " on"}) {
    ScopedEnv env("TEST_BOOL", bad);
    auto r = EnvBool("TEST_BOOL", false);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("ZIPWIRE_TEST_BOOL"), std::string::npos) << r.status().message();
  }
}

TEST(EnvString, ValueOrFallback) {
  ScopedEnv env("TEST_STR", "onebit");
  EXPECT_EQ(*EnvString("TEST_STR", "none"), "onebit");
  ScopedEnv unset("TEST_STR", nullptr);
  EXPECT_EQ(*EnvString("TEST_STR", "none"), "none");
}

}  // namespace
}  // namespace zipwire
