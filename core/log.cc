#include "core/log.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace zipwire {

LogLevel CurrentLogLevel() {
  static const LogLevel level = [] {
    const char* raw = std::getenv("ZIPWIRE_LOG_LEVEL");
    if (raw == nullptr) return LogLevel::kWarn;
    if (std::strcmp(raw, "error") == 0) return LogLevel::kError;
    if (std::strcmp(raw, "info") == 0) return LogLevel::kInfo;
    if (std::strcmp(raw, "debug") == 0) return LogLevel::kDebug;
    return LogLevel::kWarn;
  }();
  return level;
}

void LogLine(LogLevel level, const char* file, int line, const std::string& text) {
  static const char* kNames[] = {"E", "W", "I", "D"};
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  // One fprintf per line so concurrent lines from threads do not interleave.
  std::fprintf(stderr, "[zipwire %s %d %s:%d] %s\n", kNames[static_cast<int>(level)],
               static_cast<int>(getpid()), base, line, text.c_str());
}

}  // namespace zipwire
