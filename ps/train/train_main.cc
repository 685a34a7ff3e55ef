// zipwire_train: data-parallel training of a 784-512-256-10 MLP on
// Fashion-MNIST through zipwire's push_pull, as one command.
//
// Without --role it is the launcher: it runs the scheduler, spawns the
// servers and workers as child processes of this same binary, forwards
// signals, reports a child that dies and stops the rest, then prints the
// summary (and writes --json). Workers apply Adam themselves to the pulled
// aggregate (worker-side model update), so all models stay identical; the
// launcher checks that they are.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "kernels/codec.h"
#include "ps/launcher.h"
#include "ps/server.h"
#include "ps/train/idx_dataset.h"
#include "ps/train/mlp.h"
#include "ps/train/optimizer.h"
#include "ps/worker.h"
#include "transport/bootstrap.h"

namespace zw = zipwire;
using zw::Status;

namespace {

struct Options {
  std::string role;  // "", "server", "worker"
  std::string scheduler;
  std::string report;
  std::optional<uint32_t> index;  // --index: the child's fixed rank within its role
  uint32_t workers = 2;
  uint32_t servers = 1;
  // Tuned so onebit with two-way error feedback stays within a point of
  // uncompressed training (see docs/benchmarks.md).
  uint32_t epochs = zw::train::kDefaultEpochs;
  uint32_t batch = zw::train::kDefaultBatchPerWorker;  // per worker
  float lr = zw::train::kDefaultLearningRate;
  std::string schedule = "cosine";
  std::string codec = "onebit";
  std::string ef = "both";
  uint64_t seed = 42;
  std::string data_dir = zw::train::kDefaultFashionMnistDir;
  std::string json;
  std::string transport = "tcp";
  bool timings = false;
  long max_steps = -1;  // per epoch; for quick tests
};

void Usage(FILE* out) {
  std::fprintf(out,
               "usage: zipwire_train [options]\n"
               "  Trains an MLP on Fashion-MNIST with data-parallel workers and parameter servers.\n"
               "  --workers N      worker processes (default 2)\n"
               "  --servers N      server processes (default 1)\n"
               "  --epochs N       epochs, 1..100 (default 5)\n"
               "  --batch N        per-worker batch size (default 32)\n"
               "  --lr X           Adam learning rate (default 0.0003)\n"
               "  --schedule S     cosine (decays to 0 over the run) | constant (default cosine)\n"
               "  --codec SPEC     e.g. onebit, fp16, topk:0.01, dithering:s=16 (default onebit)\n"
               "  --ef MODE        error feedback: both | worker | server | none (default both)\n"
               "  --seed N         model init and shuffling seed (default 42)\n"
               "  --data-dir DIR   Fashion-MNIST IDX files (default %s, or ZIPWIRE_DATA_DIR)\n"
               "  --transport T    tcp (default), ucx or verbs\n"
               "  --timings        print per-stage pipeline timings of worker 0\n"
               "  --max-steps N    stop each epoch after N steps (for quick checks)\n"
               "  --json FILE      write the summary as JSON\n",
               zw::train::kDefaultFashionMnistDir);
}

Status ParseArgs(int argc, char** argv, Options* o) {
  auto data_dir = zw::EnvString("DATA_DIR", o->data_dir);
  if (!data_dir.ok()) return data_dir.status();
  o->data_dir = *data_dir;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](std::string* out) -> Status {
      if (i + 1 >= argc) return zw::InvalidArgument(a + " needs a value");
      *out = argv[++i];
      return Status::Ok();
    };
    auto number = [&](double lo, double hi, double* out) -> Status {
      std::string v;
      ZW_RETURN_IF_ERROR(value(&v));
      char* end = nullptr;
      double d = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0' || !(d >= lo && d <= hi)) {
        return zw::InvalidArgument(a + " " + v + ": expected a number in [" + std::to_string(lo) + ", " +
                                   std::to_string(hi) + "]");
      }
      *out = d;
      return Status::Ok();
    };
    double d = 0;
    if (a == "-h" || a == "--help") {
      Usage(stdout);
      std::exit(0);
    } else if (a == "--role") {
      ZW_RETURN_IF_ERROR(value(&o->role));
      if (o->role != "server" && o->role != "worker")
        return zw::InvalidArgument("--role must be server or worker");
    } else if (a == "--scheduler") {
      ZW_RETURN_IF_ERROR(value(&o->scheduler));
    } else if (a == "--report") {
      ZW_RETURN_IF_ERROR(value(&o->report));
    } else if (a == "--index") {
      ZW_RETURN_IF_ERROR(number(0, 63, &d));
      o->index = static_cast<uint32_t>(d);
    } else if (a == "--workers") {
      ZW_RETURN_IF_ERROR(number(1, 64, &d));
      o->workers = static_cast<uint32_t>(d);
    } else if (a == "--servers") {
      ZW_RETURN_IF_ERROR(number(1, 64, &d));
      o->servers = static_cast<uint32_t>(d);
    } else if (a == "--epochs") {
      ZW_RETURN_IF_ERROR(number(1, 100, &d));
      o->epochs = static_cast<uint32_t>(d);
    } else if (a == "--batch") {
      ZW_RETURN_IF_ERROR(number(1, 4096, &d));
      o->batch = static_cast<uint32_t>(d);
    } else if (a == "--lr") {
      ZW_RETURN_IF_ERROR(number(1e-7, 1, &d));
      o->lr = static_cast<float>(d);
    } else if (a == "--schedule") {
      ZW_RETURN_IF_ERROR(value(&o->schedule));
      if (o->schedule != "cosine" && o->schedule != "constant") {
        return zw::InvalidArgument("--schedule must be cosine or constant");
      }
    } else if (a == "--codec") {
      ZW_RETURN_IF_ERROR(value(&o->codec));
    } else if (a == "--ef") {
      ZW_RETURN_IF_ERROR(value(&o->ef));
      if (o->ef != "both" && o->ef != "worker" && o->ef != "server" && o->ef != "none") {
        return zw::InvalidArgument("--ef must be both, worker, server or none");
      }
    } else if (a == "--seed") {
      ZW_RETURN_IF_ERROR(number(0, 1e15, &d));
      o->seed = static_cast<uint64_t>(d);
    } else if (a == "--data-dir") {
      ZW_RETURN_IF_ERROR(value(&o->data_dir));
    } else if (a == "--transport") {
      ZW_RETURN_IF_ERROR(value(&o->transport));
    } else if (a == "--json") {
      ZW_RETURN_IF_ERROR(value(&o->json));
    } else if (a == "--timings") {
      o->timings = true;
    } else if (a == "--max-steps") {
      ZW_RETURN_IF_ERROR(number(1, 1e9, &d));
      o->max_steps = static_cast<long>(d);
    } else {
      return zw::InvalidArgument("unknown option '" + a + "' (see --help)");
    }
  }
  auto codec = zw::kernels::CreateCodec(o->codec);
  if (!codec.ok()) return codec.status().WithContext("--codec " + o->codec);
  return Status::Ok();
}

// FNV-1a over the model's bytes: equal on every worker iff the models are.
uint64_t ModelHash(zw::train::Mlp& model) {
  uint64_t h = 1469598103934665603ull;
  for (size_t t = 0; t < model.num_tensors(); ++t) {
    auto p = model.param(t);
    const auto* b = reinterpret_cast<const uint8_t*>(p.data());
    for (size_t i = 0; i < p.size_bytes(); ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  return h;
}

void Progress(bool tty, uint32_t epoch, uint32_t epochs, size_t step, size_t steps, double loss) {
  if (!tty) return;
  const int width = 30;
  int filled = static_cast<int>(width * static_cast<double>(step) / static_cast<double>(steps));
  std::fprintf(stderr, "\repoch %u/%u [%.*s%*s] %zu/%zu loss %.4f", epoch, epochs, filled,
               "##############################", width - filled, "", step, steps, loss);
  std::fflush(stderr);
}

int RunWorker(const Options& o) {
  auto train = zw::train::LoadFashionMnist(o.data_dir, zw::train::Split::kTrain);
  if (!train.ok()) {
    std::fprintf(stderr, "zipwire_train: %s\n", train.status().ToString().c_str());
    return 1;
  }
  auto test = zw::train::LoadFashionMnist(o.data_dir, zw::train::Split::kTest);
  if (!test.ok()) {
    std::fprintf(stderr, "zipwire_train: %s\n", test.status().ToString().c_str());
    return 1;
  }
  zw::ps::WorkerOptions wo;
  wo.scheduler = o.scheduler;
  wo.transport = o.transport;
  wo.worker_id = o.index;
  auto created = zw::ps::Worker::Create(wo);
  if (!created.ok()) {
    std::fprintf(stderr, "zipwire_train worker: %s\n", created.status().ToString().c_str());
    return 1;
  }
  std::unique_ptr<zw::ps::Worker> worker = std::move(created).value();
  const uint32_t rank = worker->rank();
  const uint32_t n = worker->cluster().num_workers;

  zw::train::Mlp model(o.seed, o.batch);
  std::vector<size_t> sizes;
  for (size_t t = 0; t < model.num_tensors(); ++t) sizes.push_back(model.param(t).size());
  zw::train::Optimizer opt(zw::train::OptimizerConfig::Adam(o.lr), sizes);
  zw::ps::TensorOptions to;
  to.codec = o.codec;
  to.worker_error_feedback = o.ef == "both" || o.ef == "worker";
  to.server_error_feedback = o.ef == "both" || o.ef == "server";
  std::vector<std::vector<float>> aggregate(model.num_tensors());
  for (size_t t = 0; t < model.num_tensors(); ++t) {
    Status s = worker->Declare(t, sizes[t], to);
    if (!s.ok()) {
      std::fprintf(stderr, "zipwire_train worker %u: declare: %s\n", rank, s.ToString().c_str());
      return 1;
    }
    aggregate[t].resize(sizes[t]);
  }

  const bool tty = rank == 0 && isatty(STDERR_FILENO);
  const size_t global_batch = static_cast<size_t>(n) * o.batch;
  size_t steps = train->count / global_batch;
  if (o.max_steps > 0) steps = std::min(steps, static_cast<size_t>(o.max_steps));
  std::vector<uint32_t> order(train->count);
  std::vector<float> x(static_cast<size_t>(o.batch) * zw::train::kImagePixels);
  std::vector<uint8_t> y(o.batch);
  std::vector<std::future<Status>> pending(model.num_tensors());
  zw::train::LrSchedule schedule;
  schedule.kind =
      o.schedule == "cosine" ? zw::train::LrSchedule::Kind::kCosine : zw::train::LrSchedule::Kind::kConstant;
  schedule.base_lr = o.lr;
  schedule.total_steps = static_cast<uint64_t>(steps) * o.epochs;
  uint64_t global_step = 0;
  float accuracy = 0;
  for (uint32_t epoch = 1; epoch <= o.epochs; ++epoch) {
    const auto t0 = std::chrono::steady_clock::now();
    // The same permutation on every worker; each takes its slice of a global batch.
    std::iota(order.begin(), order.end(), 0u);
    std::mt19937_64 rng(o.seed * 1000003ull + epoch);
    std::shuffle(order.begin(), order.end(), rng);
    double loss_sum = 0;
    for (size_t step = 0; step < steps; ++step) {
      const size_t base = step * global_batch + static_cast<size_t>(rank) * o.batch;
      for (uint32_t i = 0; i < o.batch; ++i) {
        uint32_t idx = order[base + i];
        std::copy_n(train->image(idx), zw::train::kImagePixels, x.data() + i * zw::train::kImagePixels);
        y[i] = train->labels[idx];
      }
      opt.set_lr(schedule.At(global_step++));
      loss_sum += model.ForwardBackward(x.data(), y.data(), o.batch);
      // All tensors in flight at once: their chunks share the pipeline.
      for (size_t t = 0; t < model.num_tensors(); ++t) {
        pending[t] = worker->PushPull(t, model.grad(t), aggregate[t]);
      }
      for (size_t t = 0; t < model.num_tensors(); ++t) {
        Status s = pending[t].get();
        if (!s.ok()) {
          if (tty) std::fprintf(stderr, "\n");
          std::fprintf(stderr, "zipwire_train worker %u: push_pull of %s failed: %s\n", rank,
                       model.tensor_name(t), s.ToString().c_str());
          return 1;
        }
        s = opt.Step(t, model.param(t), aggregate[t]);
        if (!s.ok()) {
          std::fprintf(stderr, "zipwire_train worker %u: %s\n", rank, s.ToString().c_str());
          return 1;
        }
      }
      if (step % 10 == 0 || step + 1 == steps)
        Progress(tty, epoch, o.epochs, step + 1, steps, loss_sum / (step + 1));
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rank == 0) {
      accuracy = model.Evaluate(*test);
      if (tty) std::fprintf(stderr, "\n");
      std::fprintf(stderr, "epoch %u/%u: loss %.4f, test accuracy %.2f%%, %.1f s\n", epoch, o.epochs,
                   loss_sum / static_cast<double>(std::max<size_t>(steps, 1)), 100.0 * accuracy, secs);
    }
  }
  if (rank != 0) accuracy = model.Evaluate(*test);
  if (rank == 0 && o.timings) std::fprintf(stderr, "%s", worker->timings().Report().c_str());
  zw::ps::WorkerStats stats = worker->stats();
  const uint64_t hash = ModelHash(model);
  Status bye = worker->Shutdown();
  if (!bye.ok())
    std::fprintf(stderr, "zipwire_train worker %u: shutdown: %s\n", rank, bye.ToString().c_str());
  if (!o.report.empty()) {
    std::ofstream out(o.report + "." + std::to_string(rank));
    out << "accuracy " << accuracy << "\nbytes_sent " << stats.bytes_sent << "\nbytes_received "
        << stats.bytes_received << "\ndense_bytes " << stats.dense_bytes << "\nmodel_hash " << hash << "\n";
  }
  return 0;
}

int RunServerRole(const Options& o) {
  zw::ps::ServerOptions so;
  so.scheduler = o.scheduler;
  so.transport = o.transport;
  so.seed = o.seed;
  so.server_id = o.index;
  Status s = zw::ps::RunServer(so);
  if (!s.ok()) {
    std::fprintf(stderr, "zipwire_train server: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

std::map<std::string, double> ReadReport(const std::string& path) {
  std::map<std::string, double> kv;
  std::ifstream in(path);
  std::string key;
  double value;
  while (in >> key >> value) kv[key] = value;
  return kv;
}

int RunLauncher(const Options& o, int argc, char** argv) {
  // Fail before starting anything if the dataset is missing or broken.
  {
    auto probe = zw::train::LoadFashionMnist(o.data_dir, zw::train::Split::kTest);
    if (!probe.ok()) {
      std::fprintf(stderr, "zipwire_train: %s\n", probe.status().ToString().c_str());
      return 1;
    }
  }
  auto scheduler = zw::transport::Scheduler::Start("127.0.0.1", 0, o.workers, o.servers);
  if (!scheduler.ok()) {
    std::fprintf(stderr, "zipwire_train: scheduler: %s\n", scheduler.status().ToString().c_str());
    return 1;
  }
  const std::string address = "127.0.0.1:" + std::to_string((*scheduler)->port());
  std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("zipwire_train." + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::string report = (dir / "worker").string();
  // One BLAS thread per process: the cluster shares the machine's cores.
  setenv("OPENBLAS_NUM_THREADS", "1", 0);

  std::printf(
      "zipwire_train: %u workers, %u servers, codec %s, error feedback %s, %u epochs, batch %u/worker\n",
      o.workers, o.servers, o.codec.c_str(), o.ef.c_str(), o.epochs, o.batch);
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  zw::ps::Launcher launcher;
  std::vector<std::string> forwarded(argv + 1, argv + argc);
  // Each child asks the scheduler for its index, so "worker 1" in the
  // launcher's reports is the process the bootstrap ranks as worker 1.
  auto spawn = [&](const std::string& role, uint32_t index) {
    zw::ps::ChildSpec spec{role + " " + std::to_string(index),
                           {zw::ps::SelfExecutable(), "--role", role, "--index", std::to_string(index),
                            "--scheduler", address, "--report", report}};
    spec.argv.insert(spec.argv.end(), forwarded.begin(), forwarded.end());
    return launcher.Spawn(spec);
  };
  for (uint32_t i = 0; i < o.servers; ++i) {
    Status s = spawn("server", i);
    if (!s.ok()) return std::fprintf(stderr, "zipwire_train: %s\n", s.ToString().c_str()), 1;
  }
  for (uint32_t i = 0; i < o.workers; ++i) {
    Status s = spawn("worker", i);
    if (!s.ok()) return std::fprintf(stderr, "zipwire_train: %s\n", s.ToString().c_str()), 1;
  }
  Status result = launcher.WaitAll();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  (*scheduler)->Stop();
  if (!result.ok()) {
    std::fprintf(stderr, "zipwire_train: failed: %s\n", result.ToString().c_str());
    std::filesystem::remove_all(dir);
    return 1;
  }

  double accuracy = 0, sent = 0, dense = 0;
  std::vector<double> hashes;
  for (uint32_t r = 0; r < o.workers; ++r) {
    auto kv = ReadReport(report + "." + std::to_string(r));
    if (kv.empty()) {
      std::fprintf(stderr, "zipwire_train: worker %u wrote no report\n", r);
      return 1;
    }
    if (r == 0) accuracy = kv["accuracy"];
    sent += kv["bytes_sent"] + kv["bytes_received"];
    dense += 2 * kv["dense_bytes"];  // push and pull, both as fp32
    hashes.push_back(kv["model_hash"]);
  }
  std::filesystem::remove_all(dir);
  const bool identical = std::all_of(hashes.begin(), hashes.end(), [&](double h) { return h == hashes[0]; });
  std::printf("\n== zipwire_train summary ==\n");
  std::printf("test accuracy     %.2f%%\n", 100.0 * accuracy);
  std::printf("epochs            %u\n", o.epochs);
  std::printf("wall time         %.1f s\n", wall);
  std::printf("bytes on the wire %.1f MB (push + pull, all workers)\n", sent / 1e6);
  std::printf("dense equivalent  %.1f MB (fp32)  -> %.1fx fewer bytes\n", dense / 1e6,
              sent > 0 ? dense / sent : 0.0);
  std::printf("codec             %s, error feedback %s\n", o.codec.c_str(), o.ef.c_str());
  std::printf("cluster           %u workers, %u servers\n", o.workers, o.servers);
  std::printf("worker models     %s\n", identical ? "identical" : "DIFFER");
  if (!o.json.empty()) {
    std::ofstream out(o.json);
    out << "{\"test_accuracy\": " << accuracy << ", \"epochs\": " << o.epochs
        << ", \"wall_seconds\": " << wall << ", \"bytes_sent\": " << static_cast<uint64_t>(sent)
        << ", \"dense_bytes\": " << static_cast<uint64_t>(dense) << ", \"codec\": \"" << o.codec
        << "\", \"workers\": " << o.workers << ", \"servers\": " << o.servers
        << ", \"models_identical\": " << (identical ? "true" : "false") << "}\n";
    if (!out) {
      std::fprintf(stderr, "zipwire_train: cannot write %s\n", o.json.c_str());
      return 1;
    }
  }
  return identical ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  Status s = ParseArgs(argc, argv, &o);
  if (!s.ok()) {
    std::fprintf(stderr, "zipwire_train: %s\n", s.ToString().c_str());
    Usage(stderr);
    return 2;
  }
  if (o.role == "worker") return RunWorker(o);
  if (o.role == "server") return RunServerRole(o);
  return RunLauncher(o, argc, argv);
}
