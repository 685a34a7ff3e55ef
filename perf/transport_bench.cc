// zipwire_transport_bench: the software cost of a backend's small-write path.
//
// Two backends of the same kind in one process, driven by one thread: A
// writes 8 bytes with an immediate into B's memory, B polls until the
// kWriteImm is there and writes back, A polls for it. Nothing crosses cores,
// so the time per one-way trip is the backend's own work (PostWrite, Poll,
// completions, locks) without the cache-line transfer a two-process
// ping-pong (zipwire_perf --test write_lat) adds: the figure to watch when
// trimming the per-message path. Counters: ns and TSC-independent
// "one_way_ns" per trip; compare runs on the same machine only.
//
//   build/bin/zipwire_transport_bench                      # tcp and ucx (shared memory)
//   build/bin/zipwire_transport_bench --benchmark_filter=CrossCore   # the hardware's floor
//   build/bin/zipwire_transport_bench --benchmark_filter=ucx
//   tests/softroce/guest.sh build/bin/zipwire_transport_bench --benchmark_filter=verbs
// The verbs case needs an RDMA device (rxe0 in the soft-RoCE guest; another
// with ZIPWIRE_IB_DEVICE) and reports a skip where there is none. Under
// emulation each instruction costs nanoseconds, so there the figure is mostly
// the instruction count of the path (callgrind's Ir per trip tells the same).
#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "transport/backend.h"

namespace zipwire::transport {
namespace {

struct Pair {
  std::unique_ptr<Backend> a, b;
  MemoryRegion ma, mb;
  RemoteRegion ra, rb;
};

// A connected pair with 4 KiB of write-target memory each (allocated by the
// backend where it offers that, as zipwire_perf does), or an error message.
std::string MakePair(const std::string& name, Pair* p) {
  if (name == "ucx") {
    setenv("UCX_TLS", "posix,sysv,cma,self", 1);
    setenv("UCX_NET_DEVICES", "lo", 0);
  }
  BackendOptions oa, ob;
  oa.self = 0;
  ob.self = 1;
  auto a = CreateBackend(name, oa);
  auto b = CreateBackend(name, ob);
  if (!a.ok()) return a.status().ToString();
  if (!b.ok()) return b.status().ToString();
  p->a = std::move(a).value();
  p->b = std::move(b).value();
  p->a->SetLocalRank(0);
  p->b->SetLocalRank(1);
  auto addr = p->b->Listen();
  if (!addr.ok()) return addr.status().ToString();
  Status st = p->a->Connect(1, *addr);
  if (!st.ok()) return st.ToString();
  Completion cs[16];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool up = false;
  while (!up && std::chrono::steady_clock::now() < deadline) {
    p->a->Poll(cs, std::chrono::milliseconds(1));
    size_t n = p->b->Poll(cs, std::chrono::milliseconds(1));
    for (size_t k = 0; k < n; ++k) up |= cs[k].type == CompletionType::kPeerConnected;
  }
  if (!up) return "the pair did not connect within 10 s";
  for (auto [backend, region] : {std::pair{p->a.get(), &p->ma}, std::pair{p->b.get(), &p->mb}}) {
    auto r = backend->capabilities().supports_alloc ? backend->AllocateMemory(4096, MemoryKind::kHost)
                                                    : Result<MemoryRegion>(NotSupported("no alloc"));
    if (!r.ok()) {
      static thread_local uint8_t own[2][4096];
      r = backend->RegisterMemory(own[region == &p->mb], 4096, MemoryKind::kHost);
    }
    if (!r.ok()) return r.status().ToString();
    *region = *r;
  }
  p->ra = ToRemote(p->ma);
  p->rb = ToRemote(p->mb);
  return "";
}

// Polls `x` until a kWriteImm arrives; false on a failed completion. The
// completion array lives across calls, as a real poller's does (making 16
// Completions per call would cost more than the path measured).
bool WaitImm(Backend* x, std::string* error) {
  static thread_local Completion cs[16];
  for (;;) {
    size_t n = x->Poll(cs, std::chrono::milliseconds(0));
    for (size_t k = 0; k < n; ++k) {
      if (!cs[k].status.ok()) {
        *error = cs[k].status.ToString();
        return false;
      }
      if (cs[k].type == CompletionType::kWriteImm) return true;
    }
  }
}

void BM_PingPong8B(benchmark::State& state, const std::string& name) {
  Pair p;
  std::string err = MakePair(name, &p);
  if (!err.empty()) {
    state.SkipWithError(("setting up " + name + ": " + err).c_str());
    return;
  }
  uint32_t i = 0;
  auto trip = [&]() -> bool {
    Status st = p.a->PostWrite(1, p.ma, 0, p.rb, 0, 8, i, i);
    if (st.ok() && WaitImm(p.b.get(), &err)) st = p.b->PostWrite(0, p.mb, 0, p.ra, 0, 8, i, i);
    if (!st.ok()) err = st.ToString();
    ++i;
    return err.empty() && WaitImm(p.a.get(), &err);
  };
  for (int w = 0; w < 2000; ++w) {  // warm-up: ucx maps the peer's memory on the first writes
    if (!trip()) break;
  }
  for (auto _ : state) {
    if (!trip()) {
      state.SkipWithError(err.c_str());
      break;
    }
  }
  state.counters["one_way_ns"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 2, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  p.a->Close();
  p.b->Close();
}

// The floor under every shared-memory notification: one 8-byte store into
// a line the other core is spinning on, answered the same way, with nothing
// else (no backend, no completion). Two threads, which on a two-vCPU VM run
// on the two cores as two processes would. ucx_perftest's ucp_put_lat over
// shared memory is a put of this kind plus UCX's progress; a zipwire write
// (ucx direct path) adds PostWrite, the target's Poll and its completions on
// top, and cannot go below this.
void BM_CrossCoreLinePingPong(benchmark::State& state) {
  // A page apart, so that no adjacent-line prefetch ties the two together.
  struct alignas(4096) Line {
    std::atomic<uint64_t> v{0};
  };
  auto lines = std::make_unique<Line[]>(2);
  std::atomic<uint64_t>& ping = lines[0].v;
  std::atomic<uint64_t>& pong = lines[1].v;
  constexpr uint64_t kStop = ~uint64_t{0};
  auto spin_until = [](std::atomic<uint64_t>& w, uint64_t want) {
    for (;;) {
      const uint64_t v = w.load(std::memory_order_acquire);
      if (v == want || v == kStop) return v;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
  };
  std::thread echo([&] {
    for (uint64_t i = 1;; ++i) {
      if (spin_until(ping, i) == kStop) return;
      pong.store(i, std::memory_order_release);
    }
  });
  uint64_t i = 0;
  for (auto _ : state) {
    ping.store(++i, std::memory_order_release);
    spin_until(pong, i);
  }
  ping.store(kStop, std::memory_order_release);
  echo.join();
  state.counters["one_way_ns"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 2, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

BENCHMARK(BM_CrossCoreLinePingPong)->MinTime(1.0)->UseRealTime();
BENCHMARK_CAPTURE(BM_PingPong8B, tcp, std::string("tcp"))->MinTime(1.0);
#ifdef ZIPWIRE_HAVE_UCX
BENCHMARK_CAPTURE(BM_PingPong8B, ucx, std::string("ucx"))->MinTime(1.0);
#endif
#ifdef ZIPWIRE_HAVE_VERBS
BENCHMARK_CAPTURE(BM_PingPong8B, verbs, std::string("verbs"))->MinTime(1.0);
#endif

}  // namespace
}  // namespace zipwire::transport

BENCHMARK_MAIN();
