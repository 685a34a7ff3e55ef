// Minimal leveled logging to stderr; ZIPWIRE_LOG_LEVEL=error|warn|info|debug.
#pragma once

#include <sstream>

namespace zipwire {

enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

LogLevel CurrentLogLevel();
void LogLine(LogLevel level, const char* file, int line, const std::string& text);

}  // namespace zipwire

#define ZW_LOG(level, expr)                                                                               \
  do {                                                                                                    \
    if (static_cast<int>(::zipwire::LogLevel::level) <= static_cast<int>(::zipwire::CurrentLogLevel())) { \
      std::ostringstream zw_log_os_;                                                                      \
      zw_log_os_ << expr;                                                                                 \
      ::zipwire::LogLine(::zipwire::LogLevel::level, __FILE__, __LINE__, zw_log_os_.str());               \
    }                                                                                                     \
  } while (0)
