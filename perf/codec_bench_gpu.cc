// zipwire_codec_bench_gpu: GPU throughput of the CUDA codecs against a
// device-to-device copy of the same buffer.
//
//   zipwire_codec_bench_gpu [--size BYTES] [--reps R] [--json FILE]
//                           [--codecs a;b;c] [--dump-input FILE]
//
// On one buffer of BYTES (default 64 MiB) of fp32 standard-normal input in
// device memory, times with CUDA events (one untimed warm-up, then R rounds,
// default 20, the median reported):
//   * cudaMemcpyAsync device-to-device of the buffer (the reference);
//   * per codec: compress, compress_ef (error feedback on a device residual),
//     decompress and decompress_accumulate (of the codec's own encoding).
// GB/s is fp32 bytes per second (1 GB = 1e9 bytes) of the input (compress,
// compress_ef) or of the decoded floats (decompress*), and BYTES for the copy,
// as in zipwire_codec_bench's summary mode. Every op is one stream-ordered
// API call (its kernels plus the small result-record copy back).
// Writes {"device": ..., "size_bytes": N, "d2d_GBps": x, "results":
// [{"codec", "op", "GBps", "ms", "ratio_to_d2d"}]}; --dump-input writes the
// input floats (raw little-endian) so a torch.topk comparison can use the
// same tensor (perf/codec_bench_gpu.sh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/gpu_codec.h"

namespace zipwire::perf {
namespace {

using kernels::CodecContext;
using kernels::cuda::GpuCodec;
using kernels::cuda::GpuCodecWorkspace;
using kernels::cuda::GpuStream;

#define BENCH_CUDA(expr)                                                                        \
  do {                                                                                          \
    const cudaError_t e_ = (expr);                                                              \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "codec_bench_gpu: %s: %s\n", #expr, cudaGetErrorString(e_));         \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

struct Options {
  size_t bytes = size_t{64} << 20;
  int reps = 20;
  std::string json;
  std::string dump;
  std::vector<std::string> codecs = {"onebit",         "fp16",          "bf16",         "terngrad",
                                     "dithering:s=16", "topk:0.01",     "topk_sampled:0.01",
                                     "randomk:0.01",   "countsketch:c=1048576,r=5"};
};

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t at = s.find(sep, pos);
    const std::string item = s.substr(pos, at == std::string::npos ? std::string::npos : at - pos);
    if (!item.empty()) out.push_back(item);
    if (at == std::string::npos) break;
    pos = at + 1;
  }
  return out;
}

bool Parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--size" && (v = next())) {
      o->bytes = std::strtoull(v, nullptr, 10) / 4 * 4;
    } else if (a == "--reps" && (v = next())) {
      o->reps = std::max(1, std::atoi(v));
    } else if (a == "--json" && (v = next())) {
      o->json = v;
    } else if (a == "--dump-input" && (v = next())) {
      o->dump = v;
    } else if (a == "--codecs" && (v = next())) {
      o->codecs = Split(v, ';');
    } else {
      std::fprintf(stderr,
                   "usage: %s [--size BYTES] [--reps R] [--json FILE] [--codecs a;b;c] [--dump-input FILE]\n",
                   argv[0]);
      return false;
    }
  }
  return true;
}

// Median milliseconds of `reps` timed rounds of fn (after one warm-up).
double TimeMs(cudaStream_t stream, int reps, const std::function<bool()>& fn) {
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  if (!fn()) return -1;
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    BENCH_CUDA(cudaEventRecord(start, stream));
    if (!fn()) return -1;
    BENCH_CUDA(cudaEventRecord(stop, stream));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    BENCH_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Row {
  std::string codec, op;
  double ms, gbps;
};

int Main(int argc, char** argv) {
  Options o;
  if (!Parse(argc, argv, &o)) return 2;
  const auto gpu = kernels::cuda::GpuAvailable();
  if (!gpu.ok()) {
    std::fprintf(stderr, "codec_bench_gpu: %s\n", gpu.ToString().c_str());
    return 1;
  }
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  const size_t n = o.bytes / 4;
  std::vector<float> host(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto& v : host) v = dist(rng);
  if (!o.dump.empty()) {
    FILE* f = std::fopen(o.dump.c_str(), "wb");
    if (f == nullptr || std::fwrite(host.data(), 4, n, f) != n) {
      std::fprintf(stderr, "codec_bench_gpu: cannot write %s\n", o.dump.c_str());
      return 1;
    }
    std::fclose(f);
  }

  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreate(&stream));
  const GpuStream gs = reinterpret_cast<GpuStream>(stream);
  float *d_x, *d_y, *d_r, *d_acc;
  BENCH_CUDA(cudaMalloc(&d_x, std::max<size_t>(n, 1) * 4));
  BENCH_CUDA(cudaMalloc(&d_y, std::max<size_t>(n, 1) * 4));
  BENCH_CUDA(cudaMalloc(&d_r, std::max<size_t>(n, 1) * 4));
  BENCH_CUDA(cudaMalloc(&d_acc, std::max<size_t>(n, 1) * 4));
  BENCH_CUDA(cudaMemcpy(d_x, host.data(), n * 4, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemset(d_acc, 0, n * 4));

  const double gb = static_cast<double>(n) * 4 / 1e9;
  const double d2d_ms = TimeMs(stream, o.reps, [&] {
    return cudaMemcpyAsync(d_y, d_x, n * 4, cudaMemcpyDeviceToDevice, stream) == cudaSuccess;
  });
  const double d2d = gb / (d2d_ms / 1e3);
  std::printf("device %s, %zu bytes, d2d copy %.3f ms = %.1f GB/s\n", prop.name, o.bytes, d2d_ms, d2d);

  std::vector<Row> rows;
  for (const std::string& spec : o.codecs) {
    auto codec = GpuCodec::Create(spec);
    if (!codec.ok()) {
      std::fprintf(stderr, "codec_bench_gpu: skipping '%s': %s\n", spec.c_str(), codec.status().ToString().c_str());
      continue;
    }
    const GpuCodec& c = **codec;
    auto ws = GpuCodecWorkspace::Create(n, &c);
    if (!ws.ok()) {
      std::fprintf(stderr, "codec_bench_gpu: %s: %s\n", spec.c_str(), ws.status().ToString().c_str());
      return 1;
    }
    GpuCodecWorkspace& w = **ws;
    const size_t cap = c.MaxCompressedBytes(n);
    uint8_t* d_out;
    BENCH_CUDA(cudaMalloc(&d_out, std::max<size_t>(cap, 16)));
    BENCH_CUDA(cudaMemset(d_r, 0, n * 4));
    CodecContext ctx{1, 2, 3, 4};
    bool failed = false;
    auto check = [&](const Status& s) {
      if (!s.ok()) {
        std::fprintf(stderr, "codec_bench_gpu: %s: %s\n", spec.c_str(), s.ToString().c_str());
        failed = true;
      }
      return s.ok();
    };
    auto op = [&](const char* name, const std::function<Status()>& fn) {
      const double ms = TimeMs(stream, o.reps, [&] { return check(fn()); });
      BENCH_CUDA(cudaStreamSynchronize(stream));
      if (!check(w.LastStatus()) || ms < 0) return;
      rows.push_back({spec, name, ms, gb / (ms / 1e3)});
      std::printf("%-28s %-22s %9.3f ms %8.1f GB/s  %.3fx d2d\n", spec.c_str(), name, ms, gb / (ms / 1e3),
                  gb / (ms / 1e3) / d2d);
    };
    op("compress", [&] { return c.Compress(d_x, n, d_out, cap, ctx, w, gs); });
    op("compress_ef", [&] { return c.CompressWithFeedback(d_x, d_r, n, d_out, cap, ctx, w, gs); });
    // Decode the codec's own encoding of x.
    if (check(c.Compress(d_x, n, d_out, cap, ctx, w, gs))) {
      BENCH_CUDA(cudaStreamSynchronize(stream));
      const size_t bytes = w.host_encoded_bytes();
      if (check(w.LastStatus())) {
        op("decompress", [&] { return c.Decompress(d_out, bytes, d_y, n, w, gs); });
        op("decompress_accumulate", [&] { return c.DecompressAccumulate(d_out, bytes, d_acc, n, 1.0f, w, gs); });
      }
    }
    cudaFree(d_out);
    if (failed) std::fprintf(stderr, "codec_bench_gpu: %s had errors\n", spec.c_str());
  }

  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "codec_bench_gpu: cannot write %s\n", o.json.c_str());
      return 1;
    }
    std::fprintf(f, "{\"device\": \"%s\", \"size_bytes\": %zu, \"d2d_GBps\": %.6f, \"d2d_ms\": %.6f, \"results\": [",
                 prop.name, o.bytes, d2d, d2d_ms);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::fprintf(f, "%s\n  {\"codec\": \"%s\", \"op\": \"%s\", \"GBps\": %.6f, \"ms\": %.6f, \"ratio_to_d2d\": %.6f}",
                   i == 0 ? "" : ",", rows[i].codec.c_str(), rows[i].op.c_str(), rows[i].gbps, rows[i].ms,
                   rows[i].gbps / d2d);
    }
    std::fprintf(f, "\n]}\n");
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace zipwire::perf

int main(int argc, char** argv) { return zipwire::perf::Main(argc, argv); }
