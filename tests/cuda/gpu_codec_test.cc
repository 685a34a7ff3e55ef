// CUDA codecs against the CPU codecs: for every codec, sizes and seeds, the GPU
// encode must give the CPU's bytes, GPU decode (and decode-accumulate) the
// CPU's floats, and GPU error feedback the CPU's bytes and residual.
//
// Every test skips, naming the reason, where no CUDA device is usable.
#include "kernels/cuda/gpu_codec.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/codec.h"
#include "kernels/cuda/gpu_launch.h"
#include "kernels/cuda/gpu_testing.h"
#include "kernels/error_feedback.h"
#include "kernels/philox.h"

namespace zipwire::kernels::cuda {
namespace {

constexpr size_t k64MiB = size_t{64} << 20 >> 2;  // floats in 64 MiB

// Device memory freed on scope exit.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) : count_(count) {
    if (cudaMalloc(&p_, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  ~DeviceBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  void Upload(const std::vector<T>& v) {
    ASSERT_EQ(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Download(size_t count) const {
    std::vector<T> v(count);
    EXPECT_EQ(cudaMemcpy(v.data(), p_, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }

 private:
  T* p_ = nullptr;
  size_t count_;
};

// Bitwise equality, any NaN equal to any NaN (see gpu_codec.h on NaN payloads).
::testing::AssertionResult SameFloats(const std::vector<float>& want, const std::vector<float>& got) {
  if (want.size() != got.size()) {
    return ::testing::AssertionFailure() << "sizes " << want.size() << " vs " << got.size();
  }
  for (size_t i = 0; i < want.size(); ++i) {
    uint32_t a, b;
    std::memcpy(&a, &want[i], 4);
    std::memcpy(&b, &got[i], 4);
    if (a != b && !(std::isnan(want[i]) && std::isnan(got[i]))) {
      return ::testing::AssertionFailure() << "element " << i << ": cpu " << want[i] << " (0x" << std::hex
                                           << a << ") gpu " << got[i] << " (0x" << b << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult SameBytes(const std::vector<uint8_t>& want, const std::vector<uint8_t>& got) {
  if (want.size() != got.size()) {
    return ::testing::AssertionFailure() << "encoded sizes: cpu " << want.size() << " gpu " << got.size();
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] != got[i]) {
      return ::testing::AssertionFailure() << "first differing byte " << i << " of " << want.size()
                                           << ": cpu " << int{want[i]} << " gpu " << int{got[i]};
    }
  }
  return ::testing::AssertionSuccess();
}

std::vector<float> Normal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Codecs that accept NaN/Inf (bytes compared) and those that reject them.
bool AcceptsNonFinite(CodecId id) {
  return id == CodecId::kFp16 || id == CodecId::kBf16 || id == CodecId::kOnebit || id == CodecId::kTopk ||
         id == CodecId::kTopkSampled || id == CodecId::kRandomk;
}

std::vector<std::string> Specs() {
  return {"fp16",
          "bf16",
          "onebit",
          "terngrad",
          "dithering:s=16",
          "dithering:levels=natural,s=7",
          "dithering:norm=max,s=255",
          "dithering:bucket=0,s=16",
          "dithering:bucket=128,levels=natural,s=5",
          "dithering:bucket=256,norm=max,s=300",
          "topk:0.01",
          "topk:37",
          "topk_sampled:0.01",
          "randomk:0.01",
          "randomk:0.05,scale=1",
          "countsketch:c=1024,k=256,r=5",
          "countsketch:c=4096,k=512,r=4"};
}

class GpuCodecTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const Status gpu = GpuAvailable();
    if (!gpu.ok()) GTEST_SKIP() << "no CUDA device, GPU codec tests skipped: " << gpu.ToString();
    auto cpu = CreateCodec(GetParam());
    ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
    cpu_ = std::shared_ptr<const Codec>(std::move(cpu).value());
    auto gpu_codec = GpuCodec::Create(GetParam());
    ASSERT_TRUE(gpu_codec.ok()) << gpu_codec.status().ToString();
    gpu_ = std::move(gpu_codec).value();
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  GpuStream stream() const { return reinterpret_cast<GpuStream>(stream_); }

  // Encodes x on the GPU; returns the bytes, or the device-reported status.
  Result<std::vector<uint8_t>> GpuEncode(const std::vector<float>& x, const CodecContext& ctx,
                                         GpuCodecWorkspace& ws) {
    DeviceBuffer<float> dx(x.size());
    const size_t cap = gpu_->MaxCompressedBytes(x.size());
    DeviceBuffer<uint8_t> dout(cap);
    dx.Upload(x);
    ZW_RETURN_IF_ERROR(gpu_->Compress(dx.get(), x.size(), dout.get(), cap, ctx, ws, stream()));
    if (cudaStreamSynchronize(stream_) != cudaSuccess) return Internal("sync failed");
    ZW_RETURN_IF_ERROR(ws.LastStatus());
    uint64_t dev_bytes = 0;
    cudaMemcpy(&dev_bytes, ws.device_encoded_bytes(), 8, cudaMemcpyDeviceToHost);
    EXPECT_EQ(dev_bytes, ws.host_encoded_bytes());
    return dout.Download(ws.host_encoded_bytes());
  }

  // Decodes (or accumulates into `start`) the bytes on the GPU.
  Result<std::vector<float>> GpuDecode(const std::vector<uint8_t>& bytes, size_t n, bool acc, float alpha,
                                       const std::vector<float>& start, GpuCodecWorkspace& ws) {
    DeviceBuffer<uint8_t> din(bytes.size());
    DeviceBuffer<float> dout(n);
    if (!bytes.empty()) din.Upload(bytes);
    dout.Upload(start);
    const Status launched =
        acc ? gpu_->DecompressAccumulate(din.get(), bytes.size(), dout.get(), n, alpha, ws, stream())
            : gpu_->Decompress(din.get(), bytes.size(), dout.get(), n, ws, stream());
    ZW_RETURN_IF_ERROR(launched);
    if (cudaStreamSynchronize(stream_) != cudaSuccess) return Internal("sync failed");
    const Status st = ws.LastStatus();
    std::vector<float> out = dout.Download(n);
    // On error the output must be untouched.
    if (!st.ok()) {
      EXPECT_TRUE(SameFloats(start, out)) << "a failed GPU decode wrote its output";
      return st;
    }
    return out;
  }

  // CPU encode into an exactly-sized buffer.
  Result<std::vector<uint8_t>> CpuEncode(const std::vector<float>& x, const CodecContext& ctx) {
    std::vector<uint8_t> buf(cpu_->MaxCompressedBytes(x.size()));
    ZW_ASSIGN_OR_RETURN(size_t n, cpu_->Compress(x, buf, ctx));
    buf.resize(n);
    return buf;
  }

  // The whole comparison for one input.
  void Check(const std::vector<float>& x, const CodecContext& ctx, GpuCodecWorkspace& ws) {
    const size_t n = x.size();
    SCOPED_TRACE(GetParam() + " n=" + std::to_string(n) + " seed=" + std::to_string(ctx.seed));
    auto cpu_bytes = CpuEncode(x, ctx);
    auto gpu_bytes = GpuEncode(x, ctx, ws);
    ASSERT_EQ(cpu_bytes.ok(), gpu_bytes.ok())
        << "cpu: " << cpu_bytes.status().ToString() << " gpu: " << gpu_bytes.status().ToString();
    if (!cpu_bytes.ok()) {
      EXPECT_EQ(cpu_bytes.status().code(), gpu_bytes.status().code()) << gpu_bytes.status().ToString();
      return;
    }
    ASSERT_TRUE(SameBytes(*cpu_bytes, *gpu_bytes));

    // Decode and decode-accumulate of the (identical) bytes.
    std::vector<float> cpu_out(n, 7.0f);
    ASSERT_TRUE(cpu_->Decompress(*cpu_bytes, cpu_out).ok());
    auto gpu_out = GpuDecode(*cpu_bytes, n, false, 1.0f, std::vector<float>(n, 7.0f), ws);
    ASSERT_TRUE(gpu_out.ok()) << gpu_out.status().ToString();
    EXPECT_TRUE(SameFloats(cpu_out, *gpu_out)) << "decode";

    const std::vector<float> start = Normal(n, static_cast<uint32_t>(ctx.seed) + 99, 0.5f);
    std::vector<float> cpu_acc = start;
    ASSERT_TRUE(cpu_->DecompressAccumulate(*cpu_bytes, cpu_acc, -0.75f).ok());
    auto gpu_acc = GpuDecode(*cpu_bytes, n, true, -0.75f, start, ws);
    ASSERT_TRUE(gpu_acc.ok()) << gpu_acc.status().ToString();
    EXPECT_TRUE(SameFloats(cpu_acc, *gpu_acc)) << "decode-accumulate";
  }

  // Two error-feedback steps (the second starts from a nonzero residual).
  void CheckFeedback(const std::vector<float>& x1, const std::vector<float>& x2, const CodecContext& ctx,
                     GpuCodecWorkspace& ws) {
    const size_t n = x1.size();
    SCOPED_TRACE(GetParam() + " error feedback n=" + std::to_string(n));
    ErrorFeedback ef(cpu_);
    const ResidualKey key{ctx.tensor_id, ctx.chunk_index};
    DeviceBuffer<float> dx(n), dr(n);
    const size_t cap = gpu_->MaxCompressedBytes(n);
    DeviceBuffer<uint8_t> dout(cap);
    ASSERT_EQ(cudaMemset(dr.get(), 0, std::max<size_t>(n, 1) * 4), cudaSuccess);
    CodecContext c = ctx;
    for (const auto* x : {&x1, &x2}) {
      std::vector<uint8_t> buf(cap);
      auto cpu_n = ef.Compress(key, *x, buf, c);
      dx.Upload(*x);
      ASSERT_TRUE(gpu_->CompressWithFeedback(dx.get(), dr.get(), n, dout.get(), cap, c, ws, stream()).ok());
      ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      const Status gpu_status = ws.LastStatus();
      ASSERT_EQ(cpu_n.ok(), gpu_status.ok()) << cpu_n.status().ToString() << " / " << gpu_status.ToString();
      if (cpu_n.ok()) {
        buf.resize(*cpu_n);
        EXPECT_TRUE(SameBytes(buf, dout.Download(ws.host_encoded_bytes()))) << "step " << c.step;
      } else {
        EXPECT_EQ(cpu_n.status().code(), gpu_status.code());
      }
      const auto residual = ef.Residual(key);
      EXPECT_TRUE(SameFloats(std::vector<float>(residual.begin(), residual.end()), dr.Download(n)))
          << "residual after step " << c.step;
      ++c.step;
    }
  }

  std::shared_ptr<const Codec> cpu_;
  std::unique_ptr<GpuCodec> gpu_;
  cudaStream_t stream_ = nullptr;
};

TEST_P(GpuCodecTest, SmallAndMediumSizesMatchCpu) {
  auto ws = GpuCodecWorkspace::Create((size_t{1} << 20) + 1, gpu_.get());
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  for (size_t n :
       {size_t{0}, size_t{1}, size_t{31}, size_t{33}, size_t{4097}, size_t{65536 + 77}, size_t{1} << 20}) {
    for (uint64_t seed : {1ull, 2ull, 0x9e3779b97f4a7c15ull}) {
      const CodecContext ctx{seed, 40 + seed, static_cast<uint32_t>(seed * 3), seed * 11};
      Check(Normal(n, static_cast<uint32_t>(seed) + static_cast<uint32_t>(n)), ctx, **ws);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_P(GpuCodecTest, SixtyFourMiBMatchesCpu) {
  auto ws = GpuCodecWorkspace::Create(k64MiB, gpu_.get());
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  Check(Normal(k64MiB, 5), CodecContext{77, 3, 1, 12}, **ws);
}

TEST_P(GpuCodecTest, NonFiniteInputsMatchCpu) {
  auto ws = GpuCodecWorkspace::Create(4097, gpu_.get());
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t n : {size_t{1}, size_t{33}, size_t{4097}}) {
    std::vector<float> x = Normal(n, 3);
    x[0] = nan;
    if (n > 1) x[n / 2] = -inf;
    if (n > 2) x[n - 1] = inf;
    if (n > 3) x[1] = -nan;
    // Both sides must agree: bytes where the codec accepts non-finite input,
    // the same error code where it rejects it.
    Check(x, CodecContext{9, 1, 0, 0}, **ws);
    if (!AcceptsNonFinite(gpu_->id())) {
      std::vector<uint8_t> buf(cpu_->MaxCompressedBytes(n));
      EXPECT_EQ(cpu_->Compress(x, buf, CodecContext{}).status().code(), StatusCode::kInvalidArgument);
    }
  }
}

TEST_P(GpuCodecTest, ErrorFeedbackMatchesCpu) {
  auto ws = GpuCodecWorkspace::Create(k64MiB, gpu_.get());
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  for (size_t n : {size_t{0}, size_t{1}, size_t{31}, size_t{33}, size_t{4097}, size_t{1} << 20}) {
    CheckFeedback(Normal(n, 10), Normal(n, 11), CodecContext{5, 6, 7, 8}, **ws);
    if (HasFatalFailure()) return;
  }
  CheckFeedback(Normal(k64MiB, 12), Normal(k64MiB, 13), CodecContext{5, 6, 7, 8}, **ws);
}

// Corrupt buffers: the GPU decoder returns the CPU decoder's code and leaves
// the output untouched (checked inside GpuDecode).
TEST_P(GpuCodecTest, CorruptBuffersAreRejectedLikeCpu) {
  auto ws = GpuCodecWorkspace::Create(4097, gpu_.get());
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  const size_t n = 4097;
  auto good = CpuEncode(Normal(n, 4), CodecContext{1, 2, 3, 4});
  ASSERT_TRUE(good.ok());
  std::vector<std::vector<uint8_t>> bad;
  bad.push_back(std::vector<uint8_t>(good->begin(), good->end() - 1));  // truncated
  bad.push_back(*good);
  bad.back()[0] ^= 1;  // magic
  bad.push_back(*good);
  bad.back()[28] = 1;                                                      // reserved
  bad.push_back(std::vector<uint8_t>(good->begin(), good->begin() + 16));  // short header
  bad.push_back(*good);
  bad.back()[bad.back().size() - 1] ^= 0xff;  // last payload byte (padding, codes, values)
  for (size_t i = 0; i < bad.size(); ++i) {
    std::vector<float> cpu_out(n, 3.0f);
    const Status cpu = cpu_->Decompress(bad[i], cpu_out);
    auto gpu = GpuDecode(bad[i], n, false, 1.0f, std::vector<float>(n, 3.0f), **ws);
    EXPECT_EQ(cpu.ok(), gpu.ok()) << "case " << i << ": cpu " << cpu.ToString() << " gpu "
                                  << gpu.status().ToString();
    if (!cpu.ok() && !gpu.ok()) {
      EXPECT_EQ(cpu.code(), gpu.status().code()) << "case " << i;
    }
    if (cpu.ok() && gpu.ok()) {
      EXPECT_TRUE(SameFloats(cpu_out, *gpu)) << "case " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllCodecs, GpuCodecTest, ::testing::ValuesIn(Specs()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string s = info.param;
                           for (char& ch : s) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return s;
                         });

// Host-side argument checks need no device.
TEST(GpuCodecApiTest, UnknownAndCpuOnlySpecsAreRejected) {
  EXPECT_FALSE(GpuCodec::Create("nosuchcodec").ok());
  EXPECT_EQ(GpuCodec::Create("none").status().code(), StatusCode::kNotSupported);
  auto c = GpuCodec::Create("topk:0.01");
  ASSERT_TRUE(c.ok());
  auto cpu = CreateCodec("topk:0.01");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*c)->MaxCompressedBytes(12345), (*cpu)->MaxCompressedBytes(12345));
}

// The kernels' Philox port (__host__ __device__, run here on the host) draws
// what kernels/philox.h draws, for every purpose and a spread of positions.
TEST(GpuCodecApiTest, PhiloxPortMatchesCpu) {
  for (uint32_t purpose = 1; purpose <= 5; ++purpose) {
    const PhiloxStream cpu(0x0123456789abcdefull, 77, 5, 1234567, static_cast<PhiloxPurpose>(purpose));
    for (uint64_t p : {0ull, 1ull, 2ull, 3ull, 4ull, 1023ull, 65537ull, 0xfffffffffull}) {
      EXPECT_EQ(testing::PhiloxDraw(0x0123456789abcdefull, 77, 5, 1234567, purpose, p), cpu.U32(p))
          << "purpose " << purpose << " position " << p;
    }
  }
}

// The parallel resolution of Floyd's draw picks the CPU's indices (read back
// from a CPU randomk encoding of x_i = i + 1).
TEST(GpuCodecApiTest, RandomkParallelFloydMatchesCpu) {
  for (size_t n : {size_t{1}, size_t{2}, size_t{31}, size_t{4097}, size_t{100000}}) {
    for (size_t k : {size_t{1}, (n + 99) / 100, n / 2, n}) {
      if (k == 0) continue;
      auto cpu = CreateCodec("randomk:" + std::to_string(k));
      ASSERT_TRUE(cpu.ok());
      std::vector<float> x(n);
      for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>(i + 1);
      const CodecContext ctx{11, 22, 3, 44};
      std::vector<uint8_t> buf((*cpu)->MaxCompressedBytes(n));
      auto bytes = (*cpu)->Compress(x, buf, ctx);
      ASSERT_TRUE(bytes.ok());
      std::vector<uint32_t> want;
      for (size_t i = 0; i < k; ++i) {
        float v;
        std::memcpy(&v, buf.data() + 32 + 40 + 4 * i, 4);
        want.push_back(static_cast<uint32_t>(v) - 1);
      }
      EXPECT_EQ(want, testing::RandomkIndices(11, 22, 3, 44, n, k)) << "n=" << n << " k=" << k;
    }
  }
}

// The kernels' per-element quantisers (run on the host) give the codes in the
// CPU encodings, for the norm / scale the CPU put on the wire.
TEST(GpuCodecApiTest, DitheringAndTerngradQuantisersMatchCpu) {
  const CodecContext ctx{3, 1, 4, 159};
  for (size_t n : {size_t{33}, size_t{4097}, size_t{100003}}) {
    std::vector<float> x = Normal(n, static_cast<uint32_t>(n));
    x[n / 3] = 0.0f;
    x[n / 2] = -0.0f;
    x[n - 1] = 1e-30f;  // deep below the natural levels
    for (const char* spec :
         {"dithering:s=16", "dithering:s=1", "dithering:s=7,levels=natural", "dithering:s=32,levels=natural",
          "dithering:s=255,norm=max", "dithering:s=65535", "dithering:s=3,levels=natural,norm=max",
          "dithering:s=16,bucket=0", "dithering:s=7,levels=natural,bucket=0", "dithering:s=300,bucket=128",
          "dithering:s=5,levels=natural,norm=max,bucket=512"}) {
      auto cpu = CreateCodec(spec);
      ASSERT_TRUE(cpu.ok()) << spec;
      auto gpu = GpuCodec::Create(spec);
      ASSERT_TRUE(gpu.ok());
      const GpuCodec::Config& c = (*gpu)->config();
      std::vector<uint8_t> buf((*cpu)->MaxCompressedBytes(n));
      ASSERT_TRUE((*cpu)->Compress(x, buf, ctx).ok());
      const size_t bucket = c.bucket_log2 == 0 ? n : size_t{1} << c.bucket_log2;
      const size_t m = c.bucket_log2 == 0 ? 1 : (n + bucket - 1) / bucket;
      std::vector<float> norms(m);
      std::memcpy(norms.data(), buf.data() + 32, 4 * m);
      const size_t at = 32 + 4 * m;  // the code stream
      const uint32_t w = static_cast<uint32_t>(std::bit_width(c.s)) + 1;
      const std::vector<uint32_t> codes =
          testing::DitheringCodes(x.data(), n, c.s, c.natural, norms.data(), c.bucket_log2, ctx);
      size_t mismatches = 0, first = n;
      for (size_t i = 0; i < n; ++i) {
        uint64_t v = 0;
        const size_t bit = i * w;
        for (size_t b = 0; b < 4 && at + bit / 8 + b < buf.size(); ++b)
          v |= uint64_t{buf[at + bit / 8 + b]} << (8 * b);
        const uint32_t want = static_cast<uint32_t>((v >> (bit % 8)) & ((1u << w) - 1));
        if (want != codes[i]) {
          ++mismatches;
          first = std::min(first, i);
        }
      }
      EXPECT_EQ(mismatches, 0u) << spec << " n=" << n << ", first at " << first;
    }
    auto tern = CreateCodec("terngrad");
    ASSERT_TRUE(tern.ok());
    std::vector<uint8_t> buf((*tern)->MaxCompressedBytes(n));
    ASSERT_TRUE((*tern)->Compress(x, buf, ctx).ok());
    float scale;
    std::memcpy(&scale, buf.data() + 32, 4);
    const std::vector<uint32_t> codes = testing::TerngradCodes(x.data(), n, scale, ctx);
    size_t mismatches = 0;
    for (size_t i = 0; i < n; ++i) mismatches += ((buf[36 + i / 4] >> (2 * (i % 4))) & 3u) != codes[i];
    EXPECT_EQ(mismatches, 0u) << "terngrad n=" << n;
  }
}

TEST(GpuCodecApiTest, WorkspaceCreationReportsMissingDevice) {
  const Status gpu = GpuAvailable();
  auto ws = GpuCodecWorkspace::Create(1024);
  if (!gpu.ok()) {
    // No device: Create must fail with the same reason, not pretend.
    EXPECT_FALSE(ws.ok());
    GTEST_SKIP() << "no CUDA device: " << gpu.ToString();
  }
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  auto c = GpuCodec::Create("onebit");
  ASSERT_TRUE(c.ok());
  // Too many elements for the workspace: an argument error before any launch.
  EXPECT_EQ((*c)->Compress(nullptr, 4096, nullptr, 0, CodecContext{}, **ws, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace zipwire::kernels::cuda
