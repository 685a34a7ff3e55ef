#include "transport/registration_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace zipwire::transport {

std::shared_ptr<const RegistrationCache::Entry> RegistrationCache::Find(uintptr_t addr, size_t length,
                                                                        uint32_t kind,
                                                                        const Validator& valid) {
  std::lock_guard lk(mu_);
  // Candidates begin at or before addr; walk them from the nearest down.
  auto it = by_begin_.upper_bound(addr);
  while (it != by_begin_.begin()) {
    --it;
    const Entry& e = *it->second.entry;
    const bool contains = e.kind == kind && addr - e.begin <= e.length && length <= e.length - (addr - e.begin);
    if (!contains) continue;
    if (!valid(e, addr, length)) {
      ++stats_.stale;
      auto next = std::next(it);
      EraseLocked(it);
      it = next;
      continue;
    }
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    ++stats_.hits;
    return it->second.entry;
  }
  ++stats_.misses;
  return nullptr;
}

void RegistrationCache::Insert(Entry entry) {
  std::lock_guard lk(mu_);
  if (capacity_ == 0) return;
  const uintptr_t begin = entry.begin;
  auto it = by_begin_.emplace(begin, Node{std::make_shared<const Entry>(std::move(entry)), {}});
  lru_.push_front(&it->second);
  it->second.lru = lru_.begin();
  TrimLocked();
}

void RegistrationCache::Trim() {
  std::lock_guard lk(mu_);
  TrimLocked();
}

void RegistrationCache::TrimLocked() {
  // From the least recently used, skipping entries held elsewhere: the
  // cache's Entry and its handle each count once for the cache itself.
  auto pos = lru_.end();
  while (by_begin_.size() > capacity_ && pos != lru_.begin()) {
    --pos;
    Node* n = *pos;
    if (n->entry.use_count() > 1 || n->entry->handle.use_count() > 1) continue;
    auto range = by_begin_.equal_range(n->entry->begin);
    for (auto it = range.first; it != range.second; ++it) {
      if (&it->second == n) {
        pos = std::next(pos);  // EraseLocked removes *pos from lru_
        ++stats_.evictions;
        EraseLocked(it);
        break;
      }
    }
  }
}

void RegistrationCache::EraseLocked(std::multimap<uintptr_t, Node>::iterator it) {
  lru_.erase(it->second.lru);
  by_begin_.erase(it);
}

void RegistrationCache::Clear() {
  std::lock_guard lk(mu_);
  lru_.clear();
  by_begin_.clear();
}

RegistrationCache::Stats RegistrationCache::stats() const {
  std::lock_guard lk(mu_);
  Stats s = stats_;
  s.entries = by_begin_.size();
  return s;
}

Result<std::vector<uint64_t>> PageFrames(uintptr_t addr, size_t length) {
  constexpr uint64_t kPage = 4096;
  constexpr uint64_t kPresent = uint64_t{1} << 63;
  constexpr uint64_t kPfnMask = (uint64_t{1} << 55) - 1;
  if (length == 0) return std::vector<uint64_t>{};
  const uint64_t first = addr / kPage, last = (addr + length - 1) / kPage;
  int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotSupported(std::string("cannot open /proc/self/pagemap: ") + std::strerror(errno));
  std::vector<uint64_t> raw(last - first + 1);
  const size_t want = raw.size() * sizeof(uint64_t);
  size_t got = 0;
  while (got < want) {
    ssize_t r = ::pread(fd, reinterpret_cast<uint8_t*>(raw.data()) + got, want - got,
                        static_cast<off_t>(first * sizeof(uint64_t) + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      std::string why = r < 0 ? std::strerror(errno) : "short read";
      ::close(fd);
      return NotSupported("cannot read /proc/self/pagemap: " + why);
    }
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  bool any_frame = false, any_present = false;
  for (uint64_t& v : raw) {
    const bool present = (v & kPresent) != 0;
    any_present |= present;
    v = present ? (v & kPfnMask) : 0;
    any_frame |= v != 0;
  }
  if (any_present && !any_frame) {
    return NotSupported("page frame numbers are hidden (reading them needs CAP_SYS_ADMIN)");
  }
  return raw;
}

}  // namespace zipwire::transport
