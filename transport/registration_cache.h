// A cache of memory registrations keyed by address range (as UCX's rcache and
// libfabric's MR cache): registering pins pages and costs a system call per
// call, so a DeregisterMemory followed by RegisterMemory of the same buffer
// (the usual pattern of a training step) should not pay it twice.
//
// Staleness (the generation check). A cached registration is only correct
// while its virtual range still maps the physical pages it pinned: memory
// freed and reused at the same address (munmap + mmap, or free + malloc) maps
// other pages, and an RDMA provider would keep reading and writing the old
// ones. Every entry therefore carries an identity snapshot taken when it was
// registered, and Find() asks the caller's validator whether the range still
// has that identity; a mismatch drops the entry (counted as stale) and
// misses. The verbs backend's identity is the range's page frame numbers
// from /proc/self/pagemap (PageFrames below): pages pinned by a live
// registration can never back a new mapping, so equal frames mean the same
// memory, and a freed-and-reused range always differs. Limits of that method:
//   * Reading frame numbers needs CAP_SYS_ADMIN (Linux hides them otherwise);
//     without it PageFrames fails and the backend runs without the cache.
//   * The check costs one 8-byte pagemap read per 4 KiB page per hit (2 MiB of
//     reads for a 1 GiB range): far below pinning, not free.
//   * A cached entry keeps its pages pinned (and its remote key valid on the
//     device) after DeregisterMemory until it is evicted: the memory stays
//     locked (counted against `ulimit -l`), and a peer that writes into a key
//     after its deregistration (a program error) may land its bytes there
//     instead of failing its connection.
//
// Bounds. At most `capacity` entries; inserting beyond it evicts the least
// recently used entries that nobody else holds (an entry whose handle is
// shared, by a live registration or an operation in flight, is never
// evicted; such entries may exceed the capacity until they are released and
// Trim() runs). The handle's deleter deregisters; it runs when the last holder
// lets go. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/status.h"

namespace zipwire::transport {

class RegistrationCache {
 public:
  struct Entry {
    uintptr_t begin = 0;
    size_t length = 0;
    uint32_t kind = 0;               // the caller's memory kind: only equal kinds match
    std::shared_ptr<void> handle;    // the provider's registration; its deleter deregisters
    std::vector<uint64_t> identity;  // what the range mapped when registered (one word per page)
  };
  // True when `entry` still describes the memory at [addr, addr + length).
  using Validator = std::function<bool(const Entry& entry, uintptr_t addr, size_t length)>;

  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t stale = 0;      // entries dropped because the validator refused them
    uint64_t evictions = 0;  // entries dropped for room
    size_t entries = 0;
  };

  explicit RegistrationCache(size_t capacity) : capacity_(capacity) {}

  // A cached registration of `kind` that contains [addr, addr + length) and
  // that `valid` accepts, now the most recently used; nullptr (a miss) if
  // none. Entries the validator refuses on the way are dropped.
  std::shared_ptr<const Entry> Find(uintptr_t addr, size_t length, uint32_t kind, const Validator& valid);

  // Adds a fresh registration as the most recently used, then trims.
  void Insert(Entry entry);

  // Evicts least recently used entries nobody else holds until within capacity.
  void Trim();

  // Drops every entry (their registrations go when their last holder does).
  void Clear();

  Stats stats() const;
  size_t capacity() const { return capacity_; }

 private:
  struct Node {
    std::shared_ptr<const Entry> entry;
    std::list<Node*>::iterator lru;  // position in lru_ (front: most recent)
  };
  void EraseLocked(std::multimap<uintptr_t, Node>::iterator it);
  void TrimLocked();

  const size_t capacity_;
  mutable std::mutex mu_;
  std::multimap<uintptr_t, Node> by_begin_;
  std::list<Node*> lru_;
  Stats stats_;
};

// The page frame number of every 4 KiB page in [addr, addr + length), from
// /proc/self/pagemap; 0 for a page not present. kNotSupported where frame
// numbers are hidden (no CAP_SYS_ADMIN) or pagemap cannot be read.
Result<std::vector<uint64_t>> PageFrames(uintptr_t addr, size_t length);

}  // namespace zipwire::transport
