// zipwire_codec_bench: CPU throughput of every registered codec against
// memcpy of the same buffer.
//
// Two modes:
//
//  * Google Benchmark (default): every `--benchmark_*` flag works, e.g.
//      zipwire_codec_bench --benchmark_filter='compress_ef/onebit/.*'
//    Cases are "<op>/<codec spec>/<bytes>" for the ops compress, compress_ef,
//    decompress, decompress_accumulate, plus "memcpy/<bytes>" and
//    "topk_baseline/nth_element/<bytes>". Throughput (bytes_per_second) counts
//    fp32 bytes, as in the summary mode (but Google Benchmark prints it in
//    binary units: 1 G/s there is 2^30 bytes/s).
//
//  * Summary (any of --size, --threads, --json given):
//      zipwire_codec_bench --size BYTES [--threads N] [--json FILE]
//                          [--min-time SECONDS] [--min-reps R] [--codecs a;b;c]
//    Times, on one buffer of BYTES of fp32 standard-normal input, memcpy of
//    the buffer (the reference, measured in the same run at the same size),
//    each codec's ops and the nth_element baseline of exact top-k, prints a
//    table and writes
//      {"memcpy_GBps": x, "size_bytes": N, "threads": T, "cpu_isa": "avx512",
//       "results": [{"codec": c, "op": o, "GBps": y, "ratio_to_memcpy": y/x}]}
//
// GB/s is always fp32 bytes per second (1 GB = 1e9 bytes): the input floats
// for compress / compress_ef / topk_baseline, the decoded floats for
// decompress / decompress_accumulate, and the buffer size for memcpy (one copy
// of BYTES, i.e. BYTES read and BYTES written). So a ratio to memcpy says how
// a codec pass over a tensor compares with copying that tensor once.
//
// Each case runs one untimed warm-up round (faults pages in, sizes scratch
// buffers) and then at least --min-reps rounds and until --min-time seconds
// have been spent; the reported figure is the median round. The median, not
// the mean or the best, because the intended machines are shared: it ignores
// the rounds a neighbour stole without rewarding a lucky one.
//
// --threads N runs N independent copies of each case concurrently, each on its
// own buffers (own input, output, residual; thread i's input uses seed i), and
// reports aggregate throughput: N * bytes / wall time of a round, where a
// round ends when the slowest thread finishes. memcpy is measured the same way
// (N concurrent copies), so ratio_to_memcpy compares like with like: it shows
// whether a codec still keeps up with memory bandwidth once N cores share it.
//
// --split BYTES (with --threads N) measures ONE tensor of --size bytes split
// the way the worker pipeline splits it (ZIPWIRE_PARTITION_BYTES): partitions
// of BYTES, each compressed as its own chunk (its own chunk index, its own
// error-feedback residual), dealt round-robin to the N threads as the
// pipeline's compute pool takes them. Throughput is then bytes / wall time of
// the whole tensor, and memcpy is split and timed the same way, so
// `--threads 1 --split 4M` against `--threads N --split 4M` shows how a large
// tensor's compression scales with threads.
//
// Codec specs come from a fixed list (ordered by family); specs that
// CreateCodec rejects as unknown are skipped with a note, so the bench runs
// with whatever codecs a build registers.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <barrier>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "kernels/codec.h"
#include "kernels/cpu_isa.h"
#include "kernels/error_feedback.h"

namespace zipwire::perf {
namespace {

using kernels::Codec;
using kernels::CodecContext;
using kernels::ErrorFeedback;
using Clock = std::chrono::steady_clock;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
// exact topk:R selects k = max(1, round(R * n)) entries; the baseline uses the same k.
constexpr double kTopkRatio = 0.01;

// The codec specs benchmarked, for a buffer of n floats. countsketch's width
// follows n (1% of it) so its compression ratio matches topk:0.01's.
std::vector<std::string> SpecsFor(size_t n) {
  std::vector<std::string> specs = {"none",         "fp16",           "bf16",
                                    "onebit",       "topk:0.01",      "topk_sampled:0.01",
                                    "randomk:0.01", "dithering:s=16", "terngrad"};
  specs.push_back("countsketch:r=5,c=" + std::to_string(std::max<size_t>(1, n / 100)));
  return specs;
}

enum class Op { kCompress, kCompressEf, kDecompress, kDecompressAccumulate };
constexpr Op kOps[] = {Op::kCompress, Op::kCompressEf, Op::kDecompress, Op::kDecompressAccumulate};

const char* OpName(Op op) {
  switch (op) {
    case Op::kCompress:
      return "compress";
    case Op::kCompressEf:
      return "compress_ef";
    case Op::kDecompress:
      return "decompress";
    case Op::kDecompressAccumulate:
      return "decompress_accumulate";
  }
  return "?";
}

std::vector<float> NormalInput(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// k of exact topk:0.01 over n floats (the same rounding as the codec's KFor).
size_t TopkK(size_t n) {
  if (n == 0) return 0;
  const double k = std::max(1.0, std::round(kTopkRatio * static_cast<double>(n)));
  return std::min(n, static_cast<size_t>(k));
}

// What the naive exact top-k does: |x| into a scratch copy, then
// std::nth_element to put the k largest in front. Returns the threshold so the
// work cannot be optimised away.
float NthElementTopk(std::span<const float> x, std::vector<float>& scratch) {
  const size_t k = TopkK(x.size());
  if (k == 0) return 0.0f;
  scratch.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) scratch[i] = std::fabs(x[i]);
  std::nth_element(scratch.begin(), scratch.begin() + static_cast<ptrdiff_t>(k - 1), scratch.end(),
                   std::greater<float>());
  return scratch[k - 1];
}

// One thread's buffers for one codec: everything an op touches is allocated
// and written here, outside the timed rounds.
class CodecWork {
 public:
  // `input` must outlive this object.
  static Result<std::unique_ptr<CodecWork>> Create(std::shared_ptr<const Codec> codec,
                                                   std::span<const float> input, uint64_t tensor_id,
                                                   uint32_t chunk_index = 0) {
    auto w = std::unique_ptr<CodecWork>(new CodecWork(std::move(codec), input, tensor_id, chunk_index));
    ZW_RETURN_IF_ERROR(w->Init());
    return w;
  }

  Status Run(Op op, uint64_t step) {
    CodecContext ctx = ctx_;
    ctx.step = step;  // randomised codecs draw afresh each round, as in training
    switch (op) {
      case Op::kCompress: {
        auto r = codec_->Compress(input_, out_, ctx);
        return r.ok() ? Status::Ok() : r.status();
      }
      case Op::kCompressEf: {
        auto r = ef_.Compress(key_, input_, out_, ctx);
        return r.ok() ? Status::Ok() : r.status();
      }
      case Op::kDecompress:
        return codec_->Decompress(encoded_, decoded_);
      case Op::kDecompressAccumulate:
        // alpha = 1: the server's sum; accum grows by one decode per round,
        // far from overflow over the rounds a case runs.
        return codec_->DecompressAccumulate(encoded_, accum_, 1.0f);
    }
    return Internal("unknown op");
  }

 private:
  CodecWork(std::shared_ptr<const Codec> codec, std::span<const float> input, uint64_t tensor_id,
            uint32_t chunk_index)
      : codec_(codec), ef_(std::move(codec)), input_(input) {
    ctx_.seed = 0x5eed;
    ctx_.tensor_id = tensor_id;
    ctx_.chunk_index = chunk_index;
    key_.tensor_id = tensor_id;
    key_.chunk_index = chunk_index;
  }

  Status Init() {
    const size_t n = input_.size();
    out_.assign(codec_->MaxCompressedBytes(n), 0);
    auto written = codec_->Compress(input_, out_, ctx_);
    if (!written.ok()) return written.status().WithContext("initial compress");
    encoded_.assign(out_.begin(), out_.begin() + static_cast<ptrdiff_t>(written.value()));
    decoded_.assign(n, 0.0f);
    accum_.assign(n, 0.0f);
    return ef_.Reserve(key_, n);
  }

  std::shared_ptr<const Codec> codec_;
  ErrorFeedback ef_;
  kernels::ResidualKey key_;
  CodecContext ctx_;
  std::span<const float> input_;
  std::vector<uint8_t> out_;
  std::vector<uint8_t> encoded_;
  std::vector<float> decoded_;
  std::vector<float> accum_;
};

// ---------------------------------------------------------------------------
// Summary mode.

struct Options {
  size_t bytes = 64u << 20;
  int threads = 1;
  size_t split_bytes = 0;  // 0: each thread works on its own whole tensor
  std::string json_path;
  double min_time_s = 1.0;
  int min_reps = 5;
  int max_reps = 2000;
  std::vector<std::string> codecs;  // empty: SpecsFor(n)
};

// Runs a round function on N threads at once; thread 0 is the caller, so
// --threads 1 involves no synchronisation at all.
class Team {
 public:
  using Job = std::function<Status(int thread, uint64_t round)>;

  explicit Team(int threads) : threads_(threads), start_(threads), done_(threads) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { WorkerLoop(t); });
  }
  ~Team() {
    job_ = nullptr;
    quit_ = true;
    if (threads_ > 1) start_.arrive_and_wait();
    for (auto& w : workers_) w.join();
  }

  // Wall seconds of one round, or the first thread's error.
  Result<double> Round(const Job& job, uint64_t round) {
    job_ = &job;
    round_ = round;
    statuses_.assign(threads_, Status::Ok());
    if (threads_ > 1) start_.arrive_and_wait();
    const auto t0 = Clock::now();
    statuses_[0] = job(0, round);
    if (threads_ > 1) done_.arrive_and_wait();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    for (const Status& st : statuses_) {
      if (!st.ok()) return st;
    }
    return s;
  }

 private:
  void WorkerLoop(int t) {
    while (true) {
      start_.arrive_and_wait();
      if (quit_) return;
      statuses_[t] = (*job_)(t, round_);
      done_.arrive_and_wait();
    }
  }

  const int threads_;
  std::barrier<> start_;
  std::barrier<> done_;
  // Written by the caller before start_ and read by workers after it: the
  // barrier orders them.
  const Job* job_ = nullptr;
  uint64_t round_ = 0;
  bool quit_ = false;
  std::vector<Status> statuses_;
  std::vector<std::thread> workers_;
};

// Median of per-round seconds after one warm-up round; see the file comment.
Result<double> MedianSeconds(Team& team, const Team::Job& job, const Options& opt,
                             std::vector<double>* samples = nullptr) {
  auto warm = team.Round(job, 0);
  if (!warm.ok()) return warm.status();
  std::vector<double> s;
  double total = 0;
  for (uint64_t round = 1;; ++round) {
    auto r = team.Round(job, round);
    if (!r.ok()) return r.status();
    s.push_back(r.value());
    total += r.value();
    const int reps = static_cast<int>(s.size());
    if (reps >= opt.max_reps || (reps >= opt.min_reps && total >= opt.min_time_s)) break;
  }
  if (samples != nullptr) samples->insert(samples->end(), s.begin(), s.end());
  std::nth_element(s.begin(), s.begin() + static_cast<ptrdiff_t>(s.size() / 2), s.end());
  return s[s.size() / 2];
}

double Median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string codec;
  std::string op;
  double gbps;
};

bool ParseSize(const char* text, size_t* out) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v == 0) return false;
  *out = static_cast<size_t>(v);
  return true;
}

void Usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--benchmark_* flags]                     Google Benchmark mode\n"
               "       %s --size BYTES [--threads N] [--json FILE]  summary mode\n"
               "          [--split BYTES] [--min-time SECONDS] [--min-reps R] [--codecs 'spec;spec;...']\n",
               argv0, argv0);
}

// Splits "a;b;c" (';' because specs themselves contain commas).
std::vector<std::string> SplitSpecs(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t semi = s.find(';', pos);
    const std::string item = s.substr(pos, semi == std::string::npos ? std::string::npos : semi - pos);
    if (!item.empty()) out.push_back(item);
    if (semi == std::string::npos) break;
    pos = semi + 1;
  }
  return out;
}

// Returns the exit code, or -1 to continue.
int ParseOptions(int argc, char** argv, Options* opt) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "codec_bench: %s needs a value\n", name);
        return nullptr;
      }
      return argv[++i];
    };
    const char* v = nullptr;
    if (a == "--help" || a == "-h") {
      Usage(argv[0]);
      return 0;
    } else if (a == "--size") {
      if ((v = value("--size")) == nullptr || !ParseSize(v, &opt->bytes) || opt->bytes < sizeof(float)) {
        std::fprintf(stderr, "codec_bench: --size wants a byte count >= 4\n");
        return kExitUsage;
      }
    } else if (a == "--threads") {
      size_t t = 0;
      if ((v = value("--threads")) == nullptr || !ParseSize(v, &t) || t > 1024) {
        std::fprintf(stderr, "codec_bench: --threads wants 1..1024\n");
        return kExitUsage;
      }
      opt->threads = static_cast<int>(t);
    } else if (a == "--split") {
      if ((v = value("--split")) == nullptr || !ParseSize(v, &opt->split_bytes) ||
          opt->split_bytes < sizeof(float)) {
        std::fprintf(stderr, "codec_bench: --split wants a partition size in bytes >= 4\n");
        return kExitUsage;
      }
    } else if (a == "--json") {
      if ((v = value("--json")) == nullptr) return kExitUsage;
      opt->json_path = v;
    } else if (a == "--min-time") {
      if ((v = value("--min-time")) == nullptr) return kExitUsage;
      opt->min_time_s = std::atof(v);
    } else if (a == "--min-reps") {
      size_t r = 0;
      if ((v = value("--min-reps")) == nullptr || !ParseSize(v, &r) || r > 100000) {
        std::fprintf(stderr, "codec_bench: --min-reps wants 1..100000\n");
        return kExitUsage;
      }
      opt->min_reps = static_cast<int>(r);
      opt->max_reps = std::max(opt->max_reps, opt->min_reps);
    } else if (a == "--codecs") {
      if ((v = value("--codecs")) == nullptr) return kExitUsage;
      opt->codecs = SplitSpecs(v);
    } else {
      std::fprintf(stderr,
                   "codec_bench: unknown argument '%s' (Google Benchmark flags only work "
                   "without --size/--threads/--json)\n",
                   a.c_str());
      Usage(argv[0]);
      return kExitUsage;
    }
  }
  return -1;
}

bool WriteJson(const std::string& path, double memcpy_gbps, const Options& opt,
               const std::vector<Row>& rows) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "codec_bench: cannot write %s: %s\n", path.c_str(), std::strerror(errno));
    return false;
  }
  // Spec strings are [a-z0-9_.:=,-]: nothing in them needs JSON escaping.
  std::fprintf(f,
               "{\"memcpy_GBps\": %.6g, \"size_bytes\": %zu, \"threads\": %d, \"split_bytes\": %zu, "
               "\"cpu_isa\": \"%s\", \"results\": [",
               memcpy_gbps, opt.bytes, opt.threads, opt.split_bytes,
               kernels::CpuIsaName(kernels::ActiveIsa()));
  for (size_t i = 0; i < rows.size(); ++i) {
    std::fprintf(f, "%s\n  {\"codec\": \"%s\", \"op\": \"%s\", \"GBps\": %.6g, \"ratio_to_memcpy\": %.6g}",
                 i == 0 ? "" : ",", rows[i].codec.c_str(), rows[i].op.c_str(), rows[i].gbps,
                 rows[i].gbps / memcpy_gbps);
  }
  std::fprintf(f, "\n]}\n");
  const bool ok = std::fclose(f) == 0;
  if (!ok) std::fprintf(stderr, "codec_bench: error writing %s\n", path.c_str());
  return ok;
}

// The part of a tensor one thread works on in one round: [offset, offset +
// count) of input `tensor`, compressed as chunk `chunk`.
struct Slice {
  int tensor = 0;
  size_t offset = 0;
  size_t count = 0;
  uint32_t chunk = 0;
};

// Without --split, thread t owns all of tensor t. With it, one tensor is cut
// into partitions of split_bytes and partition i goes to thread i % threads.
std::vector<std::vector<Slice>> PlanSlices(size_t n, const Options& opt) {
  std::vector<std::vector<Slice>> plan(opt.threads);
  if (opt.split_bytes == 0) {
    for (int t = 0; t < opt.threads; ++t) plan[t].push_back({t, 0, n, 0});
    return plan;
  }
  const size_t per = std::max<size_t>(1, opt.split_bytes / sizeof(float));
  uint32_t chunk = 0;
  for (size_t off = 0; off < n; off += per, ++chunk) {
    plan[chunk % opt.threads].push_back({0, off, std::min(per, n - off), chunk});
  }
  return plan;
}

int RunSummary(const Options& opt) {
  const size_t n = opt.bytes / sizeof(float);
  const size_t bytes = n * sizeof(float);  // a size that is not a multiple of 4 rounds down
  const bool split = opt.split_bytes != 0;
  // Split: one tensor shared by the threads; otherwise one tensor each.
  const int tensors = split ? 1 : opt.threads;
  const double total_bytes = static_cast<double>(bytes) * tensors;
  const std::vector<std::vector<Slice>> plan = PlanSlices(n, opt);
  auto gbps = [&](double seconds) { return total_bytes / seconds / 1e9; };

  std::printf(
      "codec_bench: %zu bytes (%zu floats) x %d thread(s), median of >= %d rounds and >= %.2g s per case, "
      "CPU kernels %s (ZIPWIRE_CPU_ISA)\n",
      bytes, n, opt.threads, opt.min_reps, opt.min_time_s, kernels::CpuIsaName(kernels::ActiveIsa()));
  if (split) {
    std::printf(
        "codec_bench: --split: ONE tensor of %zu bytes in %zu partitions of <= %zu bytes over %d thread(s)\n",
        bytes,
        (n + std::max<size_t>(1, opt.split_bytes / sizeof(float)) - 1) /
            std::max<size_t>(1, opt.split_bytes / sizeof(float)),
        opt.split_bytes, opt.threads);
  }
  std::fflush(stdout);

  std::vector<std::vector<float>> inputs(tensors);
  std::vector<std::vector<float>> dsts(tensors);
  {
    // Generated on the threads themselves so that each buffer's pages are
    // first touched (and placed) by the thread that uses them.
    std::vector<std::thread> gen;
    for (int t = 0; t < tensors; ++t) {
      gen.emplace_back([&, t] {
        inputs[t] = NormalInput(n, static_cast<uint64_t>(t) + 1);
        dsts[t].assign(n, 0.0f);
      });
    }
    for (auto& g : gen) g.join();
  }

  Team team(opt.threads);
  std::vector<Row> rows;

  const Team::Job memcpy_job = [&](int t, uint64_t) {
    for (const Slice& sl : plan[t]) {
      std::memcpy(dsts[sl.tensor].data() + sl.offset, inputs[sl.tensor].data() + sl.offset,
                  sl.count * sizeof(float));
    }
    benchmark::DoNotOptimize(dsts[0].data());
    return Status::Ok();
  };
  // memcpy runs before and after the codecs and the reference is the median of
  // both sets, so a load change on the machine during the run moves the
  // reference too; both halves are printed to show how stable the run was.
  std::vector<double> memcpy_samples;
  auto m0 = MedianSeconds(team, memcpy_job, opt, &memcpy_samples);
  if (!m0.ok()) return kExitError;

  auto print_row = [&](const std::string& codec, const std::string& op, double g) {
    std::printf("  %-28s %-22s %9.3f GB/s\n", codec.c_str(), op.c_str(), g);
    std::fflush(stdout);
  };
  print_row("memcpy (start)", "", gbps(m0.value()));

  int failures = 0;
  const std::vector<std::string> specs = opt.codecs.empty() ? SpecsFor(n) : opt.codecs;
  for (const std::string& spec : specs) {
    auto made = kernels::CreateCodec(spec);
    if (!made.ok()) {
      if (made.status().code() == StatusCode::kNotFound) {
        std::printf("  note: skipping '%s': %s\n", spec.c_str(), made.status().ToString().c_str());
      } else {
        std::fprintf(stderr, "codec_bench: skipping '%s', CreateCodec rejected it: %s\n", spec.c_str(),
                     made.status().ToString().c_str());
        ++failures;
      }
      continue;
    }
    std::shared_ptr<const Codec> codec(std::move(made).value());
    // work[t][i]: thread t's slice i, with its own buffers and EF residual.
    std::vector<std::vector<std::unique_ptr<CodecWork>>> work(opt.threads);
    Status setup;
    for (int t = 0; t < opt.threads && setup.ok(); ++t) {
      for (const Slice& sl : plan[t]) {
        auto w =
            CodecWork::Create(codec, std::span<const float>(inputs[sl.tensor]).subspan(sl.offset, sl.count),
                              static_cast<uint64_t>(sl.tensor), sl.chunk);
        if (!w.ok()) {
          setup = w.status();
          break;
        }
        work[t].push_back(std::move(w).value());
      }
    }
    if (!setup.ok()) {
      std::fprintf(stderr, "codec_bench: %s: setup failed: %s\n", spec.c_str(), setup.ToString().c_str());
      ++failures;
      continue;
    }
    for (Op op : kOps) {
      const Team::Job job = [&](int t, uint64_t round) {
        for (auto& w : work[t]) ZW_RETURN_IF_ERROR(w->Run(op, round));
        return Status::Ok();
      };
      auto s = MedianSeconds(team, job, opt);
      if (!s.ok()) {
        std::fprintf(stderr, "codec_bench: %s %s failed: %s\n", spec.c_str(), OpName(op),
                     s.status().ToString().c_str());
        ++failures;
        continue;
      }
      rows.push_back({spec, OpName(op), gbps(s.value())});
      print_row(spec, OpName(op), rows.back().gbps);
    }
  }

  std::vector<std::vector<float>> scratch(opt.threads);
  std::vector<float> sink(opt.threads);
  // Split: the baseline selects per partition too, as topk does per chunk.
  const Team::Job nth_job = [&](int t, uint64_t) {
    for (const Slice& sl : plan[t]) {
      sink[t] +=
          NthElementTopk(std::span<const float>(inputs[sl.tensor]).subspan(sl.offset, sl.count), scratch[t]);
    }
    benchmark::DoNotOptimize(sink[t]);
    return Status::Ok();
  };
  auto nth = MedianSeconds(team, nth_job, opt);
  if (nth.ok()) {
    rows.push_back({"nth_element", "topk_baseline", gbps(nth.value())});
    print_row("nth_element", "topk_baseline", rows.back().gbps);
  }

  std::vector<double> end_samples;
  auto m1 = MedianSeconds(team, memcpy_job, opt, &end_samples);
  if (!m1.ok()) return kExitError;
  print_row("memcpy (end)", "", gbps(m1.value()));
  memcpy_samples.insert(memcpy_samples.end(), end_samples.begin(), end_samples.end());
  const double memcpy_gbps = gbps(Median(memcpy_samples));

  std::printf("\n%-28s %-22s %10s %10s\n", "codec", "op", "GB/s", "x memcpy");
  std::printf("%-28s %-22s %10.3f %10.3f\n", "memcpy", "", memcpy_gbps, 1.0);
  for (const Row& r : rows) {
    std::printf("%-28s %-22s %10.3f %10.3f\n", r.codec.c_str(), r.op.c_str(), r.gbps, r.gbps / memcpy_gbps);
  }
  if (!opt.json_path.empty()) {
    if (!WriteJson(opt.json_path, memcpy_gbps, opt, rows)) return kExitError;
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  return failures == 0 ? 0 : kExitError;
}

// ---------------------------------------------------------------------------
// Google Benchmark mode.

constexpr size_t kGbSizes[] = {size_t{1} << 16, size_t{1} << 20, size_t{1} << 24};  // bytes

void RegisterGoogleBenchmarks() {
  for (const size_t bytes : kGbSizes) {
    const size_t n = bytes / sizeof(float);
    benchmark::RegisterBenchmark(("memcpy/" + std::to_string(bytes)).c_str(), [n](benchmark::State& state) {
      const std::vector<float> x = NormalInput(n, 1);
      std::vector<float> y(n);
      for (auto _ : state) {
        std::memcpy(y.data(), x.data(), n * sizeof(float));
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      }
      state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * sizeof(float)));
    })->UseRealTime();
    benchmark::RegisterBenchmark(
        ("topk_baseline/nth_element/" + std::to_string(bytes)).c_str(),
        [n](benchmark::State& state) {
          const std::vector<float> x = NormalInput(n, 1);
          std::vector<float> scratch;
          for (auto _ : state) benchmark::DoNotOptimize(NthElementTopk(x, scratch));
          state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * sizeof(float)));
        })
        ->UseRealTime();
    for (const std::string& spec : SpecsFor(n)) {
      auto made = kernels::CreateCodec(spec);
      if (!made.ok()) {
        // Printed once per size only for the first size, to keep the list short.
        if (bytes == kGbSizes[0]) {
          std::fprintf(stderr, "note: skipping '%s': %s\n", spec.c_str(), made.status().ToString().c_str());
        }
        continue;
      }
      std::shared_ptr<const Codec> codec(std::move(made).value());
      for (Op op : kOps) {
        const std::string name = std::string(OpName(op)) + "/" + spec + "/" + std::to_string(bytes);
        benchmark::RegisterBenchmark(name.c_str(), [codec, op, n](benchmark::State& state) {
          // Built inside the case so only the selected cases allocate.
          const std::vector<float> x = NormalInput(n, 1);
          auto w = CodecWork::Create(codec, x, 0);
          if (!w.ok()) {
            state.SkipWithError(w.status().ToString().c_str());
            return;
          }
          uint64_t step = 0;
          for (auto _ : state) {
            const Status s = w.value()->Run(op, ++step);
            if (!s.ok()) {
              state.SkipWithError(s.ToString().c_str());
              break;
            }
          }
          state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * sizeof(float)));
        })->UseRealTime();
      }
    }
  }
}

bool WantsSummary(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--size" || a == "--threads" || a == "--json" || a == "--min-time" || a == "--min-reps" ||
        a == "--codecs" || a == "--split" || a == "--help" || a == "-h") {
      return true;
    }
  }
  return false;
}

}  // namespace
}  // namespace zipwire::perf

int main(int argc, char** argv) {
  namespace perf = zipwire::perf;
  if (perf::WantsSummary(argc, argv)) {
    perf::Options opt;
    const int rc = perf::ParseOptions(argc, argv, &opt);
    if (rc >= 0) return rc;
    return perf::RunSummary(opt);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return perf::kExitUsage;
  perf::RegisterGoogleBenchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
