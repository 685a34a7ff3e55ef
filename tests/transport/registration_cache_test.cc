// RegistrationCache: range lookup, LRU eviction that spares registrations in
// use, and the staleness (generation) check; PageFrames on real mappings.
#include "transport/registration_cache.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>

namespace zipwire::transport {
namespace {

// Registrations are fake handles; a generation per base address stands in for
// "what the memory is now", and the validator compares it with the snapshot.
struct Fixture {
  std::map<uintptr_t, uint64_t> generation;
  int live = 0;  // fake registrations not yet "deregistered"

  RegistrationCache::Entry Make(uintptr_t begin, size_t length) {
    ++live;
    RegistrationCache::Entry e;
    e.begin = begin;
    e.length = length;
    e.handle = std::shared_ptr<void>(new int(0), [this](void* p) {
      --live;
      delete static_cast<int*>(p);
    });
    e.identity = {generation[begin]};
    return e;
  }
  RegistrationCache::Validator Valid() {
    return [this](const RegistrationCache::Entry& e, uintptr_t, size_t) {
      return e.identity[0] == generation[e.begin];
    };
  }
};

TEST(RegistrationCacheTest, HitOnContainedRangeMissOtherwise) {
  Fixture f;
  RegistrationCache cache(8);
  cache.Insert(f.Make(0x10000, 0x4000));
  EXPECT_NE(cache.Find(0x10000, 0x4000, 0, f.Valid()), nullptr);  // exact
  EXPECT_NE(cache.Find(0x11000, 0x1000, 0, f.Valid()), nullptr);  // inside
  EXPECT_EQ(cache.Find(0x13000, 0x2000, 0, f.Valid()), nullptr);  // overlaps the end
  EXPECT_EQ(cache.Find(0xf000, 0x2000, 0, f.Valid()), nullptr);   // overlaps the start
  EXPECT_EQ(cache.Find(0x20000, 0x10, 0, f.Valid()), nullptr);    // elsewhere
  EXPECT_EQ(cache.Find(0x10000, 0x10, 1, f.Valid()), nullptr);    // another memory kind
  auto st = cache.stats();
  EXPECT_EQ(st.hits, 2u);
  EXPECT_EQ(st.misses, 4u);
  EXPECT_EQ(st.entries, 1u);
}

TEST(RegistrationCacheTest, OverlappingEntriesEachFound) {
  Fixture f;
  RegistrationCache cache(8);
  cache.Insert(f.Make(0x10000, 0x2000));
  cache.Insert(f.Make(0x11000, 0x8000));
  auto a = cache.Find(0x10000, 0x2000, 0, f.Valid());
  auto b = cache.Find(0x12000, 0x4000, 0, f.Valid());
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->begin, 0x10000u);
  EXPECT_EQ(b->begin, 0x11000u);
  EXPECT_EQ(cache.Find(0x10000, 0x9000, 0, f.Valid()), nullptr);  // spans both: neither contains it
}

TEST(RegistrationCacheTest, EvictsLeastRecentlyUsedFirst) {
  Fixture f;
  RegistrationCache cache(2);
  cache.Insert(f.Make(0x10000, 0x1000));
  cache.Insert(f.Make(0x20000, 0x1000));
  ASSERT_NE(cache.Find(0x10000, 0x1000, 0, f.Valid()), nullptr);  // 0x10000 now most recent
  cache.Insert(f.Make(0x30000, 0x1000));                          // evicts 0x20000
  EXPECT_EQ(f.live, 2);
  EXPECT_NE(cache.Find(0x10000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_EQ(cache.Find(0x20000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_NE(cache.Find(0x30000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_EQ(cache.stats().evictions, 1u);
}

TEST(RegistrationCacheTest, NeverEvictsARegistrationInUse) {
  Fixture f;
  RegistrationCache cache(1);
  auto e = f.Make(0x10000, 0x1000);
  std::shared_ptr<void> in_flight = e.handle;  // e.g. an operation still reading it
  cache.Insert(std::move(e));
  cache.Insert(f.Make(0x20000, 0x1000));  // over capacity: the older one is busy, the new one goes
  EXPECT_EQ(cache.stats().entries, 1u);
  EXPECT_NE(cache.Find(0x10000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_EQ(f.live, 1);  // the busy one; the idle newcomer was evicted
  in_flight.reset();
  cache.Insert(f.Make(0x30000, 0x1000));  // now the idle 0x10000 is evictable
  EXPECT_EQ(cache.Find(0x10000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_NE(cache.Find(0x30000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_EQ(f.live, 1);
}

TEST(RegistrationCacheTest, MemoryReusedAtTheSameAddressIsNotAHit) {
  Fixture f;
  RegistrationCache cache(8);
  cache.Insert(f.Make(0x10000, 0x4000));
  ASSERT_NE(cache.Find(0x10000, 0x4000, 0, f.Valid()), nullptr);
  ++f.generation[0x10000];  // freed and mapped again: other pages now
  EXPECT_EQ(cache.Find(0x10000, 0x4000, 0, f.Valid()), nullptr);
  auto st = cache.stats();
  EXPECT_EQ(st.stale, 1u);
  EXPECT_EQ(st.entries, 0u);  // dropped, and its registration released
  EXPECT_EQ(f.live, 0);
}

TEST(RegistrationCacheTest, ZeroCapacityCachesNothing) {
  Fixture f;
  RegistrationCache cache(0);
  cache.Insert(f.Make(0x10000, 0x1000));
  EXPECT_EQ(cache.Find(0x10000, 0x1000, 0, f.Valid()), nullptr);
  EXPECT_EQ(f.live, 0);
}

// Two memfds mapped in turn at one address: the first's page stays alive (its
// fd holds it, as a registration pins it), so the frames must differ.
TEST(PageFramesTest, RemappedAddressHasOtherFrames) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  int fa = memfd_create("zw-a", 0), fb = memfd_create("zw-b", 0);
  ASSERT_GE(fa, 0);
  ASSERT_GE(fb, 0);
  ASSERT_EQ(ftruncate(fa, static_cast<off_t>(page)), 0);
  ASSERT_EQ(ftruncate(fb, static_cast<off_t>(page)), 0);
  void* p = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0);
  ASSERT_NE(p, MAP_FAILED);
  std::memset(p, 1, page);
  auto first = PageFrames(reinterpret_cast<uintptr_t>(p), page);
  if (!first.ok()) {
    munmap(p, page);
    close(fa);
    close(fb);
    GTEST_SKIP() << first.status().ToString();
  }
  ASSERT_EQ(first->size(), 1u);
  EXPECT_NE((*first)[0], 0u);
  void* q = mmap(p, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fb, 0);
  ASSERT_EQ(q, p);
  std::memset(q, 2, page);
  auto second = PageFrames(reinterpret_cast<uintptr_t>(q), page);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_NE((*first)[0], (*second)[0]);
  munmap(q, page);
  close(fa);
  close(fb);
}

TEST(PageFramesTest, UntouchedPagesReadAsAbsent) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  static_cast<volatile char*>(p)[0] = 1;  // only the first page
  auto frames = PageFrames(reinterpret_cast<uintptr_t>(p), 2 * page);
  if (frames.ok()) {
    ASSERT_EQ(frames->size(), 2u);
    EXPECT_NE((*frames)[0], 0u);
    EXPECT_EQ((*frames)[1], 0u);
  } else {
    EXPECT_EQ(frames.status().code(), StatusCode::kNotSupported);
  }
  munmap(p, 2 * page);
}

}  // namespace
}  // namespace zipwire::transport
