// A cluster node for the multi-process push_pull tests:
//   zipwire_ps_test_node server SCHEDULER
//   zipwire_ps_test_node worker SCHEDULER SCENARIO CODEC
// Scenarios (worker): "exact" checks the aggregate equals the mean of every
// worker's input exactly; "bound" checks it lies within the codec's stated
// error bound of that mean; "die_after_declare" (rank 1 dies abruptly after
// a few rounds, rank 0 must see its push_pull fail with a status naming the
// peer). Exit codes: 0 pass, 1 failure, 3 push_pull failed with a status
// (printed), 9 died on purpose.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/codec.h"
#include "ps/server.h"
#include "ps/worker.h"

namespace zw = zipwire;

namespace {

constexpr size_t kElements = 300000;  // 3 chunks at the tests' 512 KiB partitions
constexpr int kRounds = 5;

std::vector<float> InputFor(uint32_t rank, int round) {
  std::mt19937 rng(1000u * rank + static_cast<unsigned>(round));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(kElements);
  for (auto& x : v) x = dist(rng);
  return v;
}

int Worker(const std::string& scheduler, const std::string& scenario, const std::string& codec) {
  zw::ps::WorkerOptions wo;
  wo.scheduler = scheduler;
  wo.timeout = std::chrono::milliseconds(20000);
  auto created = zw::ps::Worker::Create(wo);
  if (!created.ok()) {
    std::fprintf(stderr, "worker: %s\n", created.status().ToString().c_str());
    return 1;
  }
  auto worker = std::move(created).value();
  const uint32_t rank = worker->rank();
  const uint32_t n = worker->cluster().num_workers;
  zw::ps::TensorOptions to;
  to.codec = codec;
  // "bound" checks one compression each way, so no residual carries over.
  to.worker_error_feedback = scenario != "bound";
  to.server_error_feedback = scenario != "bound";
  for (uint64_t id : {7ull, 8ull}) {
    zw::Status s = worker->Declare(id, kElements, to);
    if (!s.ok()) {
      std::fprintf(stderr, "worker %u: declare: %s\n", rank, s.ToString().c_str());
      return 1;
    }
  }
  auto c = zw::kernels::CreateCodec(codec);
  if (!c.ok()) return 1;
  std::vector<float> out(kElements), out2(kElements);
  for (int round = 0; round < (scenario == "die_after_declare" ? 1000 : kRounds); ++round) {
    if (scenario == "die_after_declare" && rank == 1 && round == 3) {
      std::fprintf(stderr, "worker 1: dying on purpose\n");
      _exit(9);
    }
    std::vector<float> in = InputFor(rank, round);
    auto f1 = worker->PushPull(7, in, out);
    // Tensor 8 takes the separate push and pull calls.
    auto push = worker->Push(8, in);
    zw::Status s = f1.get();
    zw::Status sp = push.get();
    zw::Status s2 = sp.ok() ? worker->Pull(8, out2).get() : sp;
    if (!s.ok() || !s2.ok()) {
      std::fprintf(stderr, "worker %u round %d: push_pull failed: %s\n", rank, round,
                   (!s.ok() ? s : s2).ToString().c_str());
      return 3;
    }
    // The mean of every worker's input, computed the way the server does.
    std::vector<float> mean(kElements, 0.0f);
    for (uint32_t r = 0; r < n; ++r) {
      std::vector<float> other = InputFor(r, round);
      for (size_t i = 0; i < kElements; ++i) mean[i] += other[i] * (1.0f / static_cast<float>(n));
    }
    for (const auto* result : {&out, &out2}) {
      if (scenario == "exact") {
        for (size_t i = 0; i < kElements; ++i) {
          if ((*result)[i] != mean[i]) {
            std::fprintf(stderr, "worker %u round %d: element %zu is %g, expected %g\n", rank, round, i,
                         (*result)[i], mean[i]);
            return 1;
          }
        }
      } else if (scenario == "bound") {
        // One compression each way: ||out - mean|| <= mean_i bound(x_i) + bound(a),
        // checked per 512 KiB chunk (the codec's scale is per chunk).
        const size_t per_chunk = (512 * 1024) / sizeof(float);
        for (size_t off = 0; off < kElements; off += per_chunk) {
          size_t len = std::min(per_chunk, kElements - off);
          double bound = 0;
          std::vector<float> a(len, 0.0f);
          for (uint32_t r = 0; r < n; ++r) {
            std::vector<float> x = InputFor(r, round);
            std::span<const float> xs(x.data() + off, len);
            bound += (*c)->ErrorBoundL2(xs) / n;
            std::vector<uint8_t> enc((*c)->MaxCompressedBytes(len));
            auto w = (*c)->Compress(xs, enc, {});
            if (!w.ok() || !(*c)->DecompressAccumulate(std::span<const uint8_t>(enc.data(), *w), a,
                                                       1.0f / static_cast<float>(n))
                                .ok()) {
              return 1;
            }
          }
          bound += (*c)->ErrorBoundL2(a);
          double err = 0;
          for (size_t i = 0; i < len; ++i) {
            double d = static_cast<double>((*result)[off + i]) - mean[off + i];
            err += d * d;
          }
          err = std::sqrt(err);
          if (!(err <= bound * 1.0001 + 1e-6)) {
            std::fprintf(stderr, "worker %u round %d: error %g exceeds the bound %g\n", rank, round, err,
                         bound);
            return 1;
          }
        }
      }
    }
  }
  zw::Status bye = worker->Shutdown();
  if (!bye.ok()) {
    std::fprintf(stderr, "worker %u: shutdown: %s\n", rank, bye.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "server") {
    zw::ps::ServerOptions so;
    so.scheduler = argv[2];
    so.timeout = std::chrono::milliseconds(20000);
    zw::Status s = zw::ps::RunServer(so);
    if (!s.ok()) {
      std::fprintf(stderr, "server: %s\n", s.ToString().c_str());
      return 1;
    }
    return 0;
  }
  if (argc >= 5 && std::string(argv[1]) == "worker") return Worker(argv[2], argv[3], argv[4]);
  std::fprintf(stderr, "usage: zipwire_ps_test_node server SCHED | worker SCHED SCENARIO CODEC\n");
  return 2;
}
