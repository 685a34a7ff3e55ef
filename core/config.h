// Declarative configuration: every tunable maps to a ZIPWIRE_* environment
// variable (as UCX maps to UCX_*), parsed once with validation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "core/status.h"

namespace zipwire {

// Reads ZIPWIRE_<name>; returns `fallback` when unset. A set but malformed
// value is an error naming the variable, never silently ignored.
Result<uint64_t> EnvUint(const char* name, uint64_t fallback);
Result<std::string> EnvString(const char* name, const std::string& fallback);
Result<bool> EnvBool(const char* name, bool fallback);
// A plain decimal index (0 .. 2^32-2), e.g. ZIPWIRE_WORKER_ID; `fallback` when unset.
Result<std::optional<uint32_t>> EnvIndex(const char* name, std::optional<uint32_t> fallback);

// Parses "4M", "64k", "1048576", "1G" into bytes.
Result<uint64_t> ParseBytes(const std::string& text);

}  // namespace zipwire
