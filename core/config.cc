#include "core/config.h"

#include <cctype>
#include <cstdlib>

namespace zipwire {

namespace {
std::string VarName(const char* name) { return std::string("ZIPWIRE_") + name; }
}  // namespace

Result<uint64_t> ParseBytes(const std::string& text) {
  if (text.empty()) return InvalidArgument("empty size");
  size_t pos = 0;
  uint64_t value = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
    uint64_t digit = static_cast<uint64_t>(text[pos] - '0');
    if (value > (UINT64_MAX - digit) / 10) return InvalidArgument("size '" + text + "' overflows");
    value = value * 10 + digit;
    ++pos;
  }
  if (pos == 0) return InvalidArgument("size '" + text + "' does not start with a number");
  uint64_t mult = 1;
  if (pos < text.size()) {
    char unit = static_cast<char>(std::toupper(static_cast<unsigned char>(text[pos])));
    switch (unit) {
      case 'K':
        mult = 1ull << 10;
        break;
      case 'M':
        mult = 1ull << 20;
        break;
      case 'G':
        mult = 1ull << 30;
        break;
      default:
        return InvalidArgument("size '" + text + "' has unknown unit '" + text.substr(pos) + "'");
    }
    ++pos;
    if (pos < text.size() && (text[pos] == 'B' || text[pos] == 'b')) ++pos;
    if (pos != text.size()) return InvalidArgument("size '" + text + "' has trailing characters");
  }
  if (value > UINT64_MAX / mult) return InvalidArgument("size '" + text + "' overflows");
  return value * mult;
}

Result<uint64_t> EnvUint(const char* name, uint64_t fallback) {
  std::string var = VarName(name);
  const char* raw = std::getenv(var.c_str());
  if (raw == nullptr || *raw == '\0') return fallback;
  auto parsed = ParseBytes(raw);
  if (!parsed.ok()) return InvalidArgument(var + "=" + raw + ": " + parsed.status().message());
  return parsed.value();
}

Result<std::optional<uint32_t>> EnvIndex(const char* name, std::optional<uint32_t> fallback) {
  std::string var = VarName(name);
  const char* raw = std::getenv(var.c_str());
  if (raw == nullptr || *raw == '\0') return fallback;
  uint64_t v = 0;
  for (const char* p = raw; *p != '\0'; ++p) {
    if (*p < '0' || *p > '9' || v > 0xfffffffeull) {
      return InvalidArgument(var + "=" + raw + ": expected a decimal index below 4294967295");
    }
    v = v * 10 + static_cast<uint64_t>(*p - '0');
  }
  if (v > 0xfffffffeull)
    return InvalidArgument(var + "=" + raw + ": expected a decimal index below 4294967295");
  return std::optional<uint32_t>(static_cast<uint32_t>(v));
}

Result<std::string> EnvString(const char* name, const std::string& fallback) {
  std::string var = VarName(name);
  const char* raw = std::getenv(var.c_str());
  if (raw == nullptr || *raw == '\0') return fallback;
  return std::string(raw);
}

Result<bool> EnvBool(const char* name, bool fallback) {
  std::string var = VarName(name);
  const char* raw = std::getenv(var.c_str());
  if (raw == nullptr || *raw == '\0') return fallback;
  std::string v(raw);
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "1" || v == "y" || v == "yes" || v == "on" || v == "true") return true;
  if (v == "0" || v == "n" || v == "no" || v == "off" || v == "false") return false;
  return InvalidArgument(var + "=" + raw + ": expected yes/no");
}

}  // namespace zipwire
