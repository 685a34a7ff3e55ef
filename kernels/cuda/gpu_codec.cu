// The workspace, the launch dispatch and the dense codecs on the GPU: fp16,
// bf16, onebit, terngrad, dithering. Byte-identical to kernels/codec_*.cc (see
// the wire formats at the top of those files).
//
// Floating-point: every operation that feeds wire bytes or a residual is
// written with the _rn intrinsics (and the library is built with
// --fmad=false), so no contraction changes a rounding the CPU does.
//
// Reductions with a result on the wire (onebit's mean |x|, dithering's l2
// norm) follow the canonical order of helper-notes/canonical_sum.md: one warp
// per 8192-element segment, lane l summing elements l, l+32, ... in double,
// the __shfl_down tree, then the segment totals in order by the last block to
// finish (a sequential sum of n / 8192 doubles).
//
// Error feedback is two passes: pass 1 reads x and r, writes y = x + r into r
// and reduces; pass 2, in reverse block order so that the tail of y written
// last is still in L2, quantises y and writes r = y - decode(y).
//
// Bucketed dithering (bucket = B <= 8192, codec_dithering.cc) replaces the
// grid-wide reduction by one warp per bucket: lane l sums elements l, l+32, ...
// of the bucket in double and the warp tree combines them, the canonical order
// of the bucket alone, so the norm needs no combining pass.
#include <algorithm>
#include <cfloat>
#include <cstring>

#include "kernels/cuda/gpu_internal.cuh"
#include "kernels/cuda/gpu_testing.h"

namespace zipwire::kernels::cuda {

// ---- workspace -------------------------------------------------------------------

GpuCodecWorkspace::Impl::~Impl() {
  if (d_state != nullptr) cudaFree(d_state);
  if (h_state != nullptr) cudaFreeHost(h_state);
  if (d_scratch != nullptr) cudaFree(d_scratch);
}

GpuCodecWorkspace::GpuCodecWorkspace(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuCodecWorkspace::~GpuCodecWorkspace() = default;

Status GpuAvailable() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    return Unavailable(std::string("no usable CUDA device: cudaGetDeviceCount: ") + cudaGetErrorString(e));
  }
  if (count == 0) return Unavailable("no CUDA device present");
  return Status::Ok();
}

Result<std::unique_ptr<GpuCodecWorkspace>> GpuCodecWorkspace::Create(size_t max_elements,
                                                                     const GpuCodec* codec) {
  ZW_RETURN_IF_ERROR(GpuAvailable());
  auto impl = std::make_unique<Impl>();
  impl->max_elements = max_elements;
  size_t bytes = 0;
  if (codec != nullptr) {
    bytes = codec->ScratchBytes(max_elements);
  } else {
    for (const char* spec :
         {"onebit", "topk:0.01", "topk_sampled:0.01", "randomk:0.01", "countsketch", "dithering"}) {
      auto c = GpuCodec::Create(spec);
      if (!c.ok()) return c.status();
      bytes = std::max(bytes, (*c)->ScratchBytes(max_elements));
    }
  }
  ZW_CUDA_RETURN(cudaMalloc(&impl->d_state, sizeof(DeviceState)), "cudaMalloc(state)");
  ZW_CUDA_RETURN(cudaMallocHost(&impl->h_state, sizeof(DeviceState)), "cudaMallocHost(state)");
  std::memset(impl->h_state, 0, sizeof(DeviceState));
  impl->scratch_bytes = bytes;
  if (bytes > 0) {
    const cudaError_t e = cudaMalloc(&impl->d_scratch, bytes);
    if (e != cudaSuccess) {
      return Status(StatusCode::kResourceExhausted,
                    "GPU codec workspace of " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(e));
    }
  }
  return std::unique_ptr<GpuCodecWorkspace>(new GpuCodecWorkspace(std::move(impl)));
}

size_t GpuCodecWorkspace::max_elements() const { return impl_->max_elements; }
const uint64_t* GpuCodecWorkspace::device_encoded_bytes() const {
  return reinterpret_cast<const uint64_t*>(&impl_->d_state->encoded_bytes);
}
uint64_t GpuCodecWorkspace::host_encoded_bytes() const { return impl_->h_state->encoded_bytes; }

Status GpuCodecWorkspace::LastStatus() const {
  const uint32_t e = impl_->h_state->error;
  switch (e) {
    case kGpuOk:
      return Status::Ok();
    case kErrNonFiniteInput:
      return InvalidArgument("gpu codec: input has a NaN or infinity");
    case kErrNormOverflow:
      return InvalidArgument("gpu codec: dithering: the L2 norm overflows float");
    case kErrSketchOverflow:
      return InvalidArgument(
          "gpu codec: countsketch: input has a NaN or infinity, or a counter overflows float");
    case kErrBadHeader:
      return Corrupt("gpu codec: malformed header (magic, version, reserved bytes or sizes)");
    case kErrWrongCodec:
      return InvalidArgument("gpu codec: buffer encoded by another codec");
    case kErrWrongElements:
      return InvalidArgument("gpu codec: buffer encodes a different element count than the output holds");
    case kErrBadParams:
      return Corrupt("gpu codec: bad parameter block or parameter word");
    case kErrBadPayload:
      return Corrupt("gpu codec: malformed payload (codes, indices, counts or padding)");
    case kErrBadScalar:
      return Corrupt("gpu codec: scale or norm is not a finite non-negative number");
    case kErrParamMismatch:
      return InvalidArgument("gpu codec: buffer parameters (k, r, c) differ from this GPU codec's");
    default:
      return Internal("gpu codec: internal error " + std::to_string(e) + " (detail " +
                      std::to_string(impl_->h_state->detail) + ")");
  }
}

// ---- shared kernels --------------------------------------------------------------

namespace {

struct HeaderBlob {
  uint8_t bytes[96];
  uint32_t len;
  unsigned long long total;
};

__global__ void WriteBlobKernel(HeaderBlob blob, uint8_t* out, DeviceState* st) {
  for (uint32_t i = threadIdx.x; i < blob.len; i += blockDim.x) out[i] = blob.bytes[i];
  if (threadIdx.x == 0) st->encoded_bytes = blob.total;
}

Status WriteHeaderBlob(const WireHeader& h, uint64_t total, uint8_t* out, DeviceState* st,
                       cudaStream_t stream) {
  uint8_t bytes[WireHeader::kBytes];
  EncodeHeader(h, std::span<uint8_t, WireHeader::kBytes>(bytes, WireHeader::kBytes));
  return WriteBlob(bytes, sizeof(bytes), total, out, st, stream);
}

WireHeader SimpleHeader(CodecId id, uint64_t n, uint64_t payload, uint32_t word = 0) {
  WireHeader h;
  h.codec = id;
  h.elements = n;
  h.payload_bytes = payload;
  h.param_word = word;
  return h;
}

__global__ void AddIntoKernel(const float* x, float* r, size_t n) {
  const size_t quads = n / 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const float4 a = reinterpret_cast<const float4*>(x)[q];
    float4 b = reinterpret_cast<float4*>(r)[q];
    b.x = __fadd_rn(b.x, a.x);
    b.y = __fadd_rn(b.y, a.y);
    b.z = __fadd_rn(b.z, a.z);
    b.w = __fadd_rn(b.w, a.w);
    reinterpret_cast<float4*>(r)[q] = b;
  }
  if (blockIdx.x == 0 && threadIdx.x < n % 4) {
    const size_t i = quads * 4 + threadIdx.x;
    r[i] = __fadd_rn(r[i], x[i]);
  }
}

unsigned GridFor(size_t items) {
  const size_t b = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b == 0 ? 1 : (b > 65535u * 16 ? 65535u * 16 : b));
}

// ---- fp16 / bf16 ---------------------------------------------------------------

__device__ inline uint16_t FloatToHalfDev(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {
    if (ax == 0x7f800000u) return sign | 0x7c00u;
    return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x477ff000u) return sign | 0x7c00u;
  if (ax >= 0x38800000u) {
    const uint32_t odd = (ax >> 13) & 1u;
    return static_cast<uint16_t>(sign | ((ax - (112u << 23) + 0xfffu + odd) >> 13));
  }
  const uint32_t e = ax >> 23;
  const uint32_t m = e == 0 ? (ax & 0x7fffffu) : ((ax & 0x7fffffu) | 0x800000u);
  const uint32_t shift = 126u - (e == 0 ? 1u : e);
  if (shift >= 25) return sign;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

__device__ inline float HalfToFloatDev(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float mag = __fmul_rn(static_cast<float>(mant), 0x1p-24f);
    return __uint_as_float(sign | __float_as_uint(mag));
  }
  if (exp == 31) {
    const uint32_t quiet = mant != 0 ? 0x00400000u : 0u;
    return __uint_as_float(sign | 0x7f800000u | quiet | (mant << 13));
  }
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

__device__ inline uint16_t FloatToBf16Dev(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
__device__ inline float Bf16ToFloatDev(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

template <bool kBf16>
__device__ inline uint16_t ToHalf(float f) {
  if constexpr (kBf16) {
    return FloatToBf16Dev(f);
  } else {
    return FloatToHalfDev(f);
  }
}
template <bool kBf16>
__device__ inline float FromHalf(uint16_t h) {
  if constexpr (kBf16) {
    return Bf16ToFloatDev(h);
  } else {
    return HalfToFloatDev(h);
  }
}

// y = x (+ r); payload gets half(y); with error feedback r = y + (-1 * decode).
template <bool kBf16, bool kEf>
__device__ inline uint16_t HalfOne(float x, float* r) {
  float y = x;
  if constexpr (kEf) y = __fadd_rn(*r, x);
  const uint16_t h = ToHalf<kBf16>(y);
  if constexpr (kEf) *r = __fadd_rn(y, __fmul_rn(-1.0f, FromHalf<kBf16>(h)));
  return h;
}

template <bool kBf16, bool kEf>
__global__ void HalfEncodeKernel(const float* x, float* r, size_t n, uint8_t* payload) {
  const size_t quads = n / 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const float4 a = reinterpret_cast<const float4*>(x)[q];
    float4 b = make_float4(0.f, 0.f, 0.f, 0.f);
    if constexpr (kEf) b = reinterpret_cast<float4*>(r)[q];
    const uint32_t h0 = HalfOne<kBf16, kEf>(a.x, &b.x), h1 = HalfOne<kBf16, kEf>(a.y, &b.y);
    const uint32_t h2 = HalfOne<kBf16, kEf>(a.z, &b.z), h3 = HalfOne<kBf16, kEf>(a.w, &b.w);
    if constexpr (kEf) reinterpret_cast<float4*>(r)[q] = b;
    reinterpret_cast<uint2*>(payload)[q] = make_uint2(h0 | (h1 << 16), h2 | (h3 << 16));
  }
  if (blockIdx.x == 0 && threadIdx.x < n % 4) {
    const size_t i = quads * 4 + threadIdx.x;
    float rv = kEf ? r[i] : 0.0f;
    const uint16_t h = HalfOne<kBf16, kEf>(x[i], &rv);
    if constexpr (kEf) r[i] = rv;
    payload[2 * i] = static_cast<uint8_t>(h);
    payload[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
}

// ValidateSimple on the device: header, no parameters, n elements, payload size.
__global__ void ValidateSimpleKernel(const uint8_t* in, unsigned long long in_bytes, CodecId id,
                                     unsigned long long n, unsigned long long payload, DeviceState* st) {
  DevHeader h{};
  uint32_t e = ParseHeaderDev(in, in_bytes, id, n, &h);
  if (e == kGpuOk && (h.param_bytes != 0 || h.param_word != 0)) e = kErrBadParams;
  if (e == kGpuOk && h.payload_bytes != payload) e = kErrBadPayload;
  if (e != kGpuOk) SetError(st, e);
}

template <bool kBf16, bool kAcc>
__global__ void HalfDecodeKernel(const uint8_t* payload, float* out, size_t n, float alpha,
                                 const DeviceState* st) {
  if (st->error != 0) return;
  const size_t quads = n / 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const uint2 w = reinterpret_cast<const uint2*>(payload)[q];
    float4 v = make_float4(
        FromHalf<kBf16>(static_cast<uint16_t>(w.x)), FromHalf<kBf16>(static_cast<uint16_t>(w.x >> 16)),
        FromHalf<kBf16>(static_cast<uint16_t>(w.y)), FromHalf<kBf16>(static_cast<uint16_t>(w.y >> 16)));
    if constexpr (kAcc) {
      const float4 a = reinterpret_cast<float4*>(out)[q];
      v = make_float4(__fadd_rn(a.x, __fmul_rn(alpha, v.x)), __fadd_rn(a.y, __fmul_rn(alpha, v.y)),
                      __fadd_rn(a.z, __fmul_rn(alpha, v.z)), __fadd_rn(a.w, __fmul_rn(alpha, v.w)));
    }
    reinterpret_cast<float4*>(out)[q] = v;
  }
  if (blockIdx.x == 0 && threadIdx.x < n % 4) {
    const size_t i = quads * 4 + threadIdx.x;
    const float v = FromHalf<kBf16>(static_cast<uint16_t>(payload[2 * i] | (payload[2 * i + 1] << 8)));
    out[i] = kAcc ? __fadd_rn(out[i], __fmul_rn(alpha, v)) : v;
  }
}

// ---- the reduction pass (onebit, terngrad, dithering) ---------------------------

enum ReduceMode { kAbsSum = 0, kSquares = 1, kMaxAbs = 2 };
enum FinalKind { kFinalOnebit = 0, kFinalDitherL2 = 1, kFinalMax = 2 };

struct ReduceArgs {
  const float* x;
  float* r;  // error feedback: y = x + r is written back here
  size_t n;
  uint32_t* sign_words;  // onebit: the payload's words, else null
  double* seg_sum;
  uint32_t* seg_count;
  uint8_t* scalar_out;  // the payload's first 4 bytes (scale / norm)
  DeviceState* st;
};

// Warp w of the grid reduces canonical segment w; the last block to finish
// combines the segment totals in order and finalises the scalar.
template <int kMode, int kFinal, bool kEf>
__global__ void __launch_bounds__(kThreads) ReduceKernel(ReduceArgs a) {
  const unsigned lane = threadIdx.x & 31;
  const size_t seg = size_t{blockIdx.x} * (kThreads / 32) + threadIdx.x / 32;
  const size_t base = seg * kCanonicalSegment;
  double acc = 0.0;
  uint32_t finite = 0, max_bits = 0;
  if (base < a.n) {
    constexpr int kUnroll = 8;
    for (int j0 = 0; j0 < 256; j0 += kUnroll) {
      float v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const size_t i = base + size_t(j0 + u) * 32 + lane;
        v[u] = 0.0f;
        if (i < a.n) {
          v[u] = a.x[i];
          if constexpr (kEf) {
            v[u] = __fadd_rn(a.r[i], v[u]);
            a.r[i] = v[u];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const size_t i = base + size_t(j0 + u) * 32 + lane;
        const uint32_t bits = __float_as_uint(v[u]) & 0x7fffffffu;
        if constexpr (kMode == kAbsSum) {
          const bool fin = (bits & 0x7f800000u) != 0x7f800000u;
          acc = __dadd_rn(acc, static_cast<double>(__uint_as_float(fin ? bits : 0u)));
          const uint32_t sign_ballot = __ballot_sync(0xffffffffu, v[u] < 0.0f);
          finite += __popc(__ballot_sync(0xffffffffu, fin && i < a.n));
          const size_t word = (base >> 5) + size_t(j0 + u);
          if (lane == 0 && word * 32 < a.n) a.sign_words[word] = sign_ballot;
        } else if constexpr (kMode == kSquares) {
          const double d = static_cast<double>(v[u]);
          acc = __dadd_rn(acc, __dmul_rn(d, d));
        } else {
          max_bits = max(max_bits, bits);
        }
      }
    }
  }
  if constexpr (kMode == kMaxAbs) {
    max_bits = __reduce_max_sync(0xffffffffu, max_bits);
    if (lane == 0 && max_bits != 0) atomicMax(&a.st->max_bits, max_bits);
  } else {
    acc = CanonicalWarpTree(acc);
    if (lane == 0 && base < a.n) {
      a.seg_sum[seg] = acc;
      if constexpr (kMode == kAbsSum) a.seg_count[seg] = finite;
    }
  }
  // Last block done: combine. Every writer fences its segment total before
  // the block signals (the threadFenceReduction pattern).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&a.st->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last || threadIdx.x != 0) return;
  __threadfence();
  DeviceState* st = a.st;
  const size_t segments = (a.n + kCanonicalSegment - 1) / kCanonicalSegment;
  float scalar = 0.0f;
  uint32_t error = kGpuOk;
  if constexpr (kMode == kMaxAbs) {
    const uint32_t m = atomicAdd(&st->max_bits, 0u);
    if (m >= 0x7f800000u) error = kErrNonFiniteInput;
    scalar = __uint_as_float(m);
  } else {
    double sum = 0.0;
    unsigned long long count = 0;
#pragma unroll 16
    for (size_t s = 0; s < segments; ++s) {
      sum = __dadd_rn(sum, __ldcg(a.seg_sum + s));
      if constexpr (kMode == kAbsSum) count += __ldcg(a.seg_count + s);
    }
    if constexpr (kFinal == kFinalOnebit) {
      scalar = count > 0 ? __double2float_rn(__ddiv_rn(sum, static_cast<double>(count))) : 0.0f;
    } else {
      if (!isfinite(sum)) {
        error = kErrNonFiniteInput;
      } else {
        scalar = __double2float_rn(__dsqrt_rn(sum));
        if (!(scalar <= FLT_MAX)) error = kErrNormOverflow;
      }
    }
  }
  if (error != kGpuOk) {
    SetError(st, error);
    st->encoded_bytes = 0;
  } else {
    st->scalar = scalar;
    StoreLe32Dev(a.scalar_out, __float_as_uint(scalar));
  }
  st->blocks_done = 0;
}

template <int kMode, int kFinal>
Status LaunchReduce(const ReduceArgs& a, bool ef, cudaStream_t stream) {
  const size_t segments = (a.n + kCanonicalSegment - 1) / kCanonicalSegment;
  const unsigned grid = BlocksFor(segments, kThreads / 32);
  if (ef) {
    ReduceKernel<kMode, kFinal, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    ReduceKernel<kMode, kFinal, false><<<grid, kThreads, 0, stream>>>(a);
  }
  ZW_CUDA_LAUNCHED("reduce kernel");
  return Status::Ok();
}

// Reverse block order for pass 2 (the tail of pass 1's data is in L2).
__device__ inline size_t ReversedBlock() { return size_t{gridDim.x} - 1 - blockIdx.x; }

// ---- onebit --------------------------------------------------------------------

constexpr size_t kWordBits = 32;
size_t OnebitPayload(size_t n) { return 4 + 4 * ((n + kWordBits - 1) / kWordBits); }

__device__ inline float SignFlip(float v, uint32_t bit) {
  return __uint_as_float(__float_as_uint(v) ^ (bit << 31));
}

// r = y + (-1 * scale) with y's sign: DecompressAccumulate(alpha = -1) of onebit.
__global__ void OnebitResidualKernel(float* r, size_t n, const DeviceState* st) {
  const float v = __fmul_rn(-1.0f, st->scalar);
  const size_t q = ReversedBlock() * blockDim.x + threadIdx.x;
  if (q * 4 + 3 < n) {
    float4 y = reinterpret_cast<float4*>(r)[q];
    y.x = __fadd_rn(y.x, SignFlip(v, y.x < 0.0f));
    y.y = __fadd_rn(y.y, SignFlip(v, y.y < 0.0f));
    y.z = __fadd_rn(y.z, SignFlip(v, y.z < 0.0f));
    y.w = __fadd_rn(y.w, SignFlip(v, y.w < 0.0f));
    reinterpret_cast<float4*>(r)[q] = y;
  } else {
    for (size_t i = q * 4; i < n; ++i) r[i] = __fadd_rn(r[i], SignFlip(v, r[i] < 0.0f));
  }
}

__global__ void OnebitValidateKernel(const uint8_t* in, unsigned long long in_bytes, unsigned long long n,
                                     DeviceState* st) {
  DevHeader h{};
  const unsigned long long words = (n + 31) / 32;
  uint32_t e = ParseHeaderDev(in, in_bytes, CodecId::kOnebit, n, &h);
  if (e == kGpuOk && (h.param_bytes != 0 || h.param_word != 0)) e = kErrBadParams;
  if (e == kGpuOk && h.payload_bytes != 4 + 4 * words) e = kErrBadPayload;
  if (e == kGpuOk) {
    const float scale = __uint_as_float(LoadLe32Dev(in + 32));
    if (!(scale >= 0.0f && scale <= FLT_MAX) || signbit(scale)) e = kErrBadScalar;
  }
  if (e == kGpuOk && n % 32 != 0) {
    const uint32_t last = LoadLe32Dev(in + 36 + 4 * (words - 1));
    if ((last >> (n % 32)) != 0) e = kErrBadPayload;
  }
  if (e != kGpuOk) SetError(st, e);
}

template <bool kAcc>
__global__ void OnebitDecodeKernel(const uint8_t* in, float* out, size_t n, float alpha,
                                   const DeviceState* st) {
  if (st->error != 0) return;
  const float scale = __uint_as_float(LoadLe32Dev(in + 32));
  const float v = kAcc ? __fmul_rn(alpha, scale) : scale;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(in + 36);
  const size_t quads = (n + 3) / 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const uint32_t word = words[q / 8] >> (4 * (q % 8));
    if (q * 4 + 3 < n) {
      float4 d = make_float4(SignFlip(v, word & 1u), SignFlip(v, (word >> 1) & 1u),
                             SignFlip(v, (word >> 2) & 1u), SignFlip(v, (word >> 3) & 1u));
      if constexpr (kAcc) {
        const float4 a = reinterpret_cast<float4*>(out)[q];
        d = make_float4(__fadd_rn(a.x, d.x), __fadd_rn(a.y, d.y), __fadd_rn(a.z, d.z), __fadd_rn(a.w, d.w));
      }
      reinterpret_cast<float4*>(out)[q] = d;
    } else {
      for (size_t i = q * 4; i < n; ++i) {
        const float d = SignFlip(v, (word >> (i - q * 4)) & 1u);
        out[i] = kAcc ? __fadd_rn(out[i], d) : d;
      }
    }
  }
}

// ---- terngrad --------------------------------------------------------------------

size_t TerngradPayload(size_t n) { return 4 + (n + 3) / 4; }

// Thread w encodes elements [16w, 16w + 16) into code word w (bytes 4w..4w+3).
template <bool kEf>
__global__ void TerngradEncodeKernel(float* y_or_x, size_t n, uint8_t* codes, DevPhilox ph,
                                     const DeviceState* st) {
  if (st->error != 0) return;
  const size_t w = ReversedBlock() * blockDim.x + threadIdx.x;
  const size_t first = w * 16;
  if (first >= n) return;
  const float scale = st->scalar;
  const float back = __fmul_rn(-1.0f, scale);
  const size_t len = n - first < 16 ? n - first : 16;
  float v[16];
  if (len == 16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 f = reinterpret_cast<const float4*>(y_or_x + first)[k];
      v[4 * k] = f.x, v[4 * k + 1] = f.y, v[4 * k + 2] = f.z, v[4 * k + 3] = f.w;
    }
  } else {
    for (int j = 0; j < 16; ++j) v[j] = j < static_cast<int>(len) ? y_or_x[first + j] : 0.0f;
  }
  uint32_t word = 0;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint4 u = PhiloxBlock(ph, w * 4 + b);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = 4 * b + k;
      const uint32_t code = TerngradCodeOf(v[j], scale, Word(u, k));
      word |= code << (2 * j);
      if constexpr (kEf) {
        const uint32_t bits = code == 0 ? 0u : (__float_as_uint(back) ^ ((code >> 1) << 31));
        v[j] = __fadd_rn(v[j], __uint_as_float(bits));
      }
    }
  }
  if (len == 16) {
    reinterpret_cast<uint32_t*>(codes)[w] = word;
    if constexpr (kEf) {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        reinterpret_cast<float4*>(y_or_x + first)[k] =
            make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    }
  } else {
    const size_t bytes = (len + 3) / 4;
    for (size_t b = 0; b < bytes; ++b) codes[4 * w + b] = static_cast<uint8_t>(word >> (8 * b));
    if constexpr (kEf) {
      for (size_t j = 0; j < len; ++j) y_or_x[first + j] = v[j];
    }
  }
}

__global__ void TerngradValidateKernel(const uint8_t* in, unsigned long long in_bytes, unsigned long long n,
                                       DeviceState* st) {
  DevHeader h{};
  uint32_t e = ParseHeaderDev(in, in_bytes, CodecId::kTerngrad, n, &h);
  if (e == kGpuOk && (h.param_bytes != 0 || h.param_word != 0)) e = kErrBadParams;
  if (e == kGpuOk && h.payload_bytes != 4 + (n + 3) / 4) e = kErrBadPayload;
  if (e == kGpuOk) {
    const float scale = __uint_as_float(LoadLe32Dev(in + 32));
    if (!(scale >= 0.0f && scale <= FLT_MAX) || signbit(scale)) e = kErrBadScalar;
  }
  if (e == kGpuOk && n % 4 != 0 && (in[36 + (n + 3) / 4 - 1] >> (2 * (n % 4))) != 0) e = kErrBadPayload;
  if (e != kGpuOk) SetError(st, e);
}

// Every code byte: no 11 code.
__global__ void TerngradCodesKernel(const uint8_t* codes, size_t bytes, DeviceState* st) {
  if (st->error != 0) return;
  uint32_t bad = 0;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t b = size_t{blockIdx.x} * blockDim.x + threadIdx.x; b < bytes; b += stride)
    bad |= codes[b] & (codes[b] >> 1) & 0x55u;
  if (__syncthreads_or(bad != 0) && threadIdx.x == 0) SetError(st, kErrBadPayload);
}

template <bool kAcc>
__global__ void TerngradDecodeKernel(const uint8_t* in, float* out, size_t n, float alpha,
                                     const DeviceState* st) {
  if (st->error != 0) return;
  const float scale = __uint_as_float(LoadLe32Dev(in + 32));
  const uint32_t vb = __float_as_uint(kAcc ? __fmul_rn(alpha, scale) : scale);
  const uint8_t* codes = in + 36;
  const size_t quads = (n + 3) / 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const uint32_t byte = codes[q];
    for (size_t j = 0; j < 4 && q * 4 + j < n; ++j) {
      const uint32_t code = (byte >> (2 * j)) & 3u;
      const float d = __uint_as_float(code == 0 ? 0u : (vb ^ ((code >> 1) << 31)));
      const size_t i = q * 4 + j;
      out[i] = kAcc ? __fadd_rn(out[i], d) : d;
    }
  }
}

// ---- dithering --------------------------------------------------------------------

constexpr uint32_t kNaturalBit = 1u << 16;
constexpr uint32_t kMaxNormBit = 1u << 17;
constexpr uint32_t kBucketShift = 18;  // log2(B) in bits [18, 23); 0: one norm per chunk

uint32_t DitherBits(uint32_t s) { return static_cast<uint32_t>(32 - __builtin_clz(s)) + 1; }
__host__ __device__ inline size_t DitherNorms(size_t n, uint32_t bucket_log2) {
  if (bucket_log2 == 0) return 1;
  return (n >> bucket_log2) + ((n & ((size_t{1} << bucket_log2) - 1)) != 0 ? 1 : 0);
}
size_t DitherPayload(size_t n, uint32_t w, size_t norms) {
  const size_t bits = n * w;
  return 4 * norms + bits / 8 + (bits % 8 != 0 ? 1 : 0);
}

// Bucketed: warp k of the grid computes the norm of bucket k (elements
// [k*B, min(n, (k+1)*B)), B <= 8192): lane l sums the squares of elements
// k*B + l, k*B + l + 32, ... in increasing order in double, then the warp tree
// (the canonical order of the bucket alone, as CanonicalSquareSumOfSum on the
// CPU), or the max |y|; it writes norm k into the payload, or the error. Under
// error feedback it also writes y = x + r into r (so on error r holds y).
template <bool kMax, bool kEf>
__global__ void __launch_bounds__(kThreads)
    DitherBucketNormKernel(const float* x, float* r, size_t n, uint32_t bucket_log2, float* norms,
                           DeviceState* st) {
  const unsigned lane = threadIdx.x & 31;
  const size_t k = size_t{blockIdx.x} * (kThreads / 32) + threadIdx.x / 32;
  const size_t b0 = k << bucket_log2;
  if (b0 >= n) return;  // k is the same for the whole warp
  const size_t end = min(n, b0 + (size_t{1} << bucket_log2));
  double acc = 0.0;
  uint32_t max_bits = 0;
  for (size_t i = b0 + lane; i < end; i += 32) {
    float v = x[i];
    if constexpr (kEf) {
      v = __fadd_rn(r[i], v);
      r[i] = v;
    }
    if constexpr (kMax) {
      max_bits = max(max_bits, __float_as_uint(v) & 0x7fffffffu);
    } else {
      const double d = static_cast<double>(v);
      acc = __dadd_rn(acc, __dmul_rn(d, d));
    }
  }
  uint32_t error = kGpuOk;
  float norm = 0.0f;
  if constexpr (kMax) {
    max_bits = __reduce_max_sync(0xffffffffu, max_bits);
    if (max_bits >= 0x7f800000u) error = kErrNonFiniteInput;
    norm = __uint_as_float(max_bits);
  } else {
    acc = CanonicalWarpTree(acc);
    if (!isfinite(acc)) {
      error = kErrNonFiniteInput;
    } else {
      norm = __double2float_rn(__dsqrt_rn(acc));
      if (!(norm <= FLT_MAX)) error = kErrNormOverflow;
    }
  }
  if (lane != 0) return;
  if (error != kGpuOk) {
    SetError(st, error);
    st->encoded_bytes = 0;
  } else {
    norms[k] = norm;
  }
}

struct DitherArgs {
  float* y;  // x, or y in r under error feedback (updated to the residual)
  size_t n;
  uint8_t* codes;
  const float* norms;  // bucketed: the payload's norms; null: st->scalar
  uint32_t bucket_log2;
  uint32_t s;
  uint32_t w;
  DevPhilox ph;
  const DeviceState* st;
};

__device__ inline float NaturalLevel(float norm, uint32_t l, uint32_t s) {
  // std::ldexp(norm, l - s): one rounding (exact in double, then to float).
  return l == 0
             ? 0.0f
             : __double2float_rn(ldexp(static_cast<double>(norm), static_cast<int>(l) - static_cast<int>(s)));
}

// Thread t of a warp quantises elements 8t..8t+7 of the warp's 256 with the
// eight 16-bit draws of one Philox block (element j's draw is halfword j % 8
// of block j / 8: word (j % 8) / 2, the high half for odd j); the codes are
// OR-ed into the warp's 8w words in shared memory, then stored. A thread's
// eight elements share a bucket (B is a multiple of 128).
template <bool kNatural, bool kEf>
__global__ void __launch_bounds__(kThreads) DitherEncodeKernel(DitherArgs a) {
  __shared__ uint32_t words[kThreads / 32][8 * 18];
  if (a.st->error != 0) return;
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const size_t group = ReversedBlock() * (kThreads / 32) + warp;  // 256 elements each
  const size_t first = group * 256 + 8 * lane;
  const uint32_t s = a.s, w = a.w;
  for (uint32_t i = lane; i < 8 * w; i += 32) words[warp][i] = 0;
  __syncwarp();
  float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const bool full = first + 7 < a.n;
  if (full) {
    const float4 f0 = *reinterpret_cast<const float4*>(a.y + first);
    const float4 f1 = *reinterpret_cast<const float4*>(a.y + first + 4);
    v[0] = f0.x, v[1] = f0.y, v[2] = f0.z, v[3] = f0.w;
    v[4] = f1.x, v[5] = f1.y, v[6] = f1.z, v[7] = f1.w;
  } else {
    for (int j = 0; j < 8; ++j) v[j] = first + j < a.n ? a.y[first + j] : 0.0f;
  }
  if (first < a.n) {
    const float norm = a.norms == nullptr ? a.st->scalar : a.norms[first >> a.bucket_log2];
    const uint4 u = PhiloxBlock(a.ph, first / 8);
    const DitherQuant dq = MakeDitherQuant(s, kNatural, norm);
    const float step = __fdiv_rn(norm, static_cast<float>(s));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (first + j >= a.n) break;
      const uint32_t l = DitherLevelOf(dq, v[j], DevUniform16(Half(u, j)));
      const uint32_t xb = __float_as_uint(v[j]);
      const uint32_t code = l == 0 ? 0u : (l << 1 | xb >> 31);
      const uint32_t bit = (8 * lane + j) * w;
      const uint32_t sh = bit & 31;
      atomicOr(&words[warp][bit >> 5], code << sh);
      if (sh + w > 32) atomicOr(&words[warp][(bit >> 5) + 1], code >> (32 - sh));
      if constexpr (kEf) {
        const float mag = kNatural ? NaturalLevel(norm, l, s) : __fmul_rn(static_cast<float>(l), step);
        const float val = __uint_as_float(__float_as_uint(mag) | (code & 1u) << 31);
        v[j] = __fadd_rn(v[j], __fmul_rn(-1.0f, val));
      }
    }
    if constexpr (kEf) {
      if (full) {
        *reinterpret_cast<float4*>(a.y + first) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(a.y + first + 4) = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        for (int j = 0; j < 8 && first + j < a.n; ++j) a.y[first + j] = v[j];
      }
    }
  }
  __syncwarp();
  const size_t total_bytes = (a.n * w + 7) / 8;
  for (uint32_t i = lane; i < 8 * w; i += 32) {
    const size_t byte = (group * 8 * w + i) * 4;
    if (byte + 4 <= total_bytes) {
      reinterpret_cast<uint32_t*>(a.codes)[byte / 4] = words[warp][i];
    } else {
      for (size_t b = 0; b < 4 && byte + b < total_bytes; ++b)
        a.codes[byte + b] = static_cast<uint8_t>(words[warp][i] >> (8 * b));
    }
  }
}

// Code j of the bit stream, reading only bytes inside [0, bytes).
__device__ inline uint32_t DitherCode(const uint8_t* codes, size_t bytes, size_t j, uint32_t w) {
  const size_t bit = j * w;
  const size_t at = bit / 8;
  uint32_t v = 0;
  for (size_t b = 0; b < 4 && at + b < bytes; ++b) v |= static_cast<uint32_t>(codes[at + b]) << (8 * b);
  return (v >> (bit % 8)) & ((1u << w) - 1u);
}

__global__ void DitherValidateKernel(const uint8_t* in, unsigned long long in_bytes, unsigned long long n,
                                     DeviceState* st) {
  DevHeader h{};
  uint32_t e = ParseHeaderDev(in, in_bytes, CodecId::kDithering, n, &h);
  const uint32_t s = h.param_word & 0xffffu;
  const bool natural = (h.param_word & kNaturalBit) != 0;
  const uint32_t bucket_log2 = (h.param_word >> kBucketShift) & 0x1fu;
  if (e == kGpuOk && h.param_bytes != 0) e = kErrBadParams;
  if (e == kGpuOk && ((h.param_word >> (kBucketShift + 5)) != 0 || s == 0 || (natural && s > 32) ||
                      (bucket_log2 != 0 && (bucket_log2 < 7 || bucket_log2 > 13)))) {
    e = kErrBadParams;
  }
  uint32_t w = 0;
  if (e == kGpuOk) {
    w = static_cast<uint32_t>(32 - __clz(s)) + 1;
    const unsigned long long bits = n * w;
    if (h.payload_bytes != 4 * DitherNorms(n, bucket_log2) + bits / 8 + (bits % 8 != 0 ? 1 : 0))
      e = kErrBadPayload;
  }
  if (e == kGpuOk) {
    // The norms are checked by DitherCodesKernel.
    const unsigned long long used = n * w;
    if (used % 8 != 0 && (in[32 + h.payload_bytes - 1] >> (used % 8)) != 0) e = kErrBadPayload;
  }
  if (e != kGpuOk) {
    SetError(st, e);
    return;
  }
  st->rows = s;  // reused fields: s, and the natural flag | log2(B) << 1
  st->cols = (natural ? 1u : 0u) | bucket_log2 << 1;
}

// Every norm finite and >= +0, every code's level <= s and no signed zero.
__global__ void DitherCodesKernel(const uint8_t* in, size_t n, DeviceState* st) {
  // One read of the error for the whole block: another block may set it
  // meanwhile, and every thread must reach the barriers below or none.
  __shared__ uint32_t skip;
  if (threadIdx.x == 0) skip = atomicAdd(&st->error, 0u);
  __syncthreads();
  if (skip != 0) return;
  const uint32_t s = st->rows;
  const uint32_t bucket_log2 = st->cols >> 1;
  const size_t m = DitherNorms(n, bucket_log2);
  const uint32_t w = static_cast<uint32_t>(32 - __clz(s)) + 1;
  const size_t bytes = (n * w + 7) / 8;
  const uint32_t max_code = s << 1 | 1u;
  const uint8_t* codes = in + 32 + 4 * m;
  uint32_t bad = 0, bad_norm = 0;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t k = size_t{blockIdx.x} * blockDim.x + threadIdx.x; k < m; k += stride) {
    bad_norm |= LoadLe32Dev(in + 32 + 4 * k) >= 0x7f800000u;  // sign set, infinite or NaN
  }
  for (size_t j = size_t{blockIdx.x} * blockDim.x + threadIdx.x; j < n; j += stride) {
    const uint32_t v = DitherCode(codes, bytes, j, w);
    bad |= (v > max_code) | (v == 1u);
  }
  if (__syncthreads_or(bad_norm != 0) && threadIdx.x == 0) SetError(st, kErrBadScalar);
  if (__syncthreads_or(bad != 0) && threadIdx.x == 0) SetError(st, kErrBadPayload);
}

template <bool kAcc>
__global__ void DitherDecodeKernel(const uint8_t* in, float* out, size_t n, float alpha,
                                   const DeviceState* st) {
  if (st->error != 0) return;
  const uint32_t s = st->rows;
  const bool natural = (st->cols & 1u) != 0;
  const uint32_t bucket_log2 = st->cols >> 1;
  const size_t m = DitherNorms(n, bucket_log2);
  const uint32_t w = static_cast<uint32_t>(32 - __clz(s)) + 1;
  const size_t bytes = (n * w + 7) / 8;
  const uint8_t* codes = in + 32 + 4 * m;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t j = size_t{blockIdx.x} * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float norm = __uint_as_float(LoadLe32Dev(in + 32 + 4 * (bucket_log2 == 0 ? 0 : j >> bucket_log2)));
    const float step = __fdiv_rn(norm, static_cast<float>(s));
    const uint32_t v = DitherCode(codes, bytes, j, w);
    const uint32_t l = v >> 1;
    const float mag = natural ? NaturalLevel(norm, l, s) : __fmul_rn(static_cast<float>(l), step);
    const float val = __uint_as_float(__float_as_uint(mag) | (v & 1u) << 31);
    out[j] = kAcc ? __fadd_rn(out[j], __fmul_rn(alpha, val)) : val;
  }
}

// ---- dispatch ------------------------------------------------------------------------

struct Common {
  GpuCodecWorkspace::Impl& ws;
  cudaStream_t stream;
};

Status Begin(const Common& c) {
  ZW_CUDA_RETURN(cudaMemsetAsync(c.ws.d_state, 0, sizeof(DeviceState), c.stream), "reset state");
  return Status::Ok();
}
Status End(const Common& c) {
  ZW_CUDA_RETURN(
      cudaMemcpyAsync(c.ws.h_state, c.ws.d_state, sizeof(DeviceState), cudaMemcpyDeviceToHost, c.stream),
      "result copy");
  return Status::Ok();
}

ReduceArgs MakeReduceArgs(const float* x, float* r, size_t n, uint8_t* out, GpuCodecWorkspace::Impl& ws) {
  ScratchCarver carve(ws.d_scratch, ws.scratch_bytes);
  const size_t segments = (n + kCanonicalSegment - 1) / kCanonicalSegment;
  ReduceArgs a{};
  a.x = x;
  a.r = r;
  a.n = n;
  a.seg_sum = carve.Take<double>(segments + 1);
  a.seg_count = carve.Take<uint32_t>(segments + 1);
  a.scalar_out = out + WireHeader::kBytes;
  a.st = ws.d_state;
  return a;
}

size_t DenseScratch(size_t n) {
  const size_t segments = (n + kCanonicalSegment - 1) / kCanonicalSegment + 1;
  return segments * 12 + 1024;
}

Status CompressDense(const GpuCodec::Config& c, const float* x, float* residual, size_t n, uint8_t* out,
                     const CodecContext& ctx, const Common& cm) {
  const bool ef = residual != nullptr;
  DeviceState* st = cm.ws.d_state;
  cudaStream_t stream = cm.stream;
  switch (c.id) {
    case CodecId::kFp16:
    case CodecId::kBf16: {
      ZW_RETURN_IF_ERROR(
          WriteHeaderBlob(SimpleHeader(c.id, n, 2 * n), WireHeader::kBytes + 2 * n, out, st, stream));
      const unsigned grid = GridFor(n / 4);
      uint8_t* payload = out + WireHeader::kBytes;
      const bool bf = c.id == CodecId::kBf16;
      if (bf && ef) HalfEncodeKernel<true, true><<<grid, kThreads, 0, stream>>>(x, residual, n, payload);
      if (bf && !ef) HalfEncodeKernel<true, false><<<grid, kThreads, 0, stream>>>(x, residual, n, payload);
      if (!bf && ef) HalfEncodeKernel<false, true><<<grid, kThreads, 0, stream>>>(x, residual, n, payload);
      if (!bf && !ef) HalfEncodeKernel<false, false><<<grid, kThreads, 0, stream>>>(x, residual, n, payload);
      ZW_CUDA_LAUNCHED("half encode");
      return Status::Ok();
    }
    case CodecId::kOnebit: {
      const size_t payload = OnebitPayload(n);
      ZW_RETURN_IF_ERROR(
          WriteHeaderBlob(SimpleHeader(c.id, n, payload), WireHeader::kBytes + payload, out, st, stream));
      ReduceArgs a = MakeReduceArgs(x, residual, n, out, cm.ws);
      a.sign_words = reinterpret_cast<uint32_t*>(out + WireHeader::kBytes + 4);
      ZW_RETURN_IF_ERROR((LaunchReduce<kAbsSum, kFinalOnebit>(a, ef, stream)));
      if (ef && n > 0) {
        OnebitResidualKernel<<<BlocksFor((n + 3) / 4, kThreads), kThreads, 0, stream>>>(residual, n, st);
        ZW_CUDA_LAUNCHED("onebit residual");
      }
      return Status::Ok();
    }
    case CodecId::kTerngrad: {
      const size_t payload = TerngradPayload(n);
      ZW_RETURN_IF_ERROR(
          WriteHeaderBlob(SimpleHeader(c.id, n, payload), WireHeader::kBytes + payload, out, st, stream));
      const ReduceArgs a = MakeReduceArgs(x, residual, n, out, cm.ws);
      ZW_RETURN_IF_ERROR((LaunchReduce<kMaxAbs, kFinalMax>(a, ef, stream)));
      if (n > 0) {
        const DevPhilox ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, 2);
        const unsigned grid = BlocksFor((n + 15) / 16, kThreads);
        uint8_t* codes = out + WireHeader::kBytes + 4;
        if (ef) {
          TerngradEncodeKernel<true><<<grid, kThreads, 0, stream>>>(residual, n, codes, ph, st);
        } else {
          TerngradEncodeKernel<false><<<grid, kThreads, 0, stream>>>(const_cast<float*>(x), n, codes, ph, st);
        }
        ZW_CUDA_LAUNCHED("terngrad encode");
      }
      return Status::Ok();
    }
    case CodecId::kDithering: {
      const uint32_t w = DitherBits(c.s);
      const size_t m = DitherNorms(n, c.bucket_log2);
      const size_t payload = DitherPayload(n, w, m);
      const uint32_t word = c.s | (c.natural ? kNaturalBit : 0u) | (c.max_norm ? kMaxNormBit : 0u) |
                            c.bucket_log2 << kBucketShift;
      ZW_RETURN_IF_ERROR(WriteHeaderBlob(SimpleHeader(c.id, n, payload, word), WireHeader::kBytes + payload,
                                         out, st, stream));
      float* norms = reinterpret_cast<float*>(out + WireHeader::kBytes);
      if (c.bucket_log2 == 0) {
        const ReduceArgs a = MakeReduceArgs(x, residual, n, out, cm.ws);
        if (c.max_norm) {
          ZW_RETURN_IF_ERROR((LaunchReduce<kMaxAbs, kFinalMax>(a, ef, stream)));
        } else {
          ZW_RETURN_IF_ERROR((LaunchReduce<kSquares, kFinalDitherL2>(a, ef, stream)));
        }
      } else if (m > 0) {
        const unsigned grid = BlocksFor(m, kThreads / 32);
        float* r = residual;
        if (c.max_norm && ef)
          DitherBucketNormKernel<true, true>
              <<<grid, kThreads, 0, stream>>>(x, r, n, c.bucket_log2, norms, st);
        if (c.max_norm && !ef)
          DitherBucketNormKernel<true, false>
              <<<grid, kThreads, 0, stream>>>(x, r, n, c.bucket_log2, norms, st);
        if (!c.max_norm && ef)
          DitherBucketNormKernel<false, true>
              <<<grid, kThreads, 0, stream>>>(x, r, n, c.bucket_log2, norms, st);
        if (!c.max_norm && !ef)
          DitherBucketNormKernel<false, false>
              <<<grid, kThreads, 0, stream>>>(x, r, n, c.bucket_log2, norms, st);
        ZW_CUDA_LAUNCHED("dithering bucket norms");
      }
      if (n > 0) {
        DitherArgs d{};
        d.y = ef ? residual : const_cast<float*>(x);
        d.n = n;
        d.codes = out + WireHeader::kBytes + 4 * m;
        d.norms = c.bucket_log2 == 0 ? nullptr : norms;
        d.bucket_log2 = c.bucket_log2;
        d.s = c.s;
        d.w = w;
        d.ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, 1);
        d.st = st;
        const unsigned grid = BlocksFor((n + 255) / 256, kThreads / 32);
        if (c.natural && ef) DitherEncodeKernel<true, true><<<grid, kThreads, 0, stream>>>(d);
        if (c.natural && !ef) DitherEncodeKernel<true, false><<<grid, kThreads, 0, stream>>>(d);
        if (!c.natural && ef) DitherEncodeKernel<false, true><<<grid, kThreads, 0, stream>>>(d);
        if (!c.natural && !ef) DitherEncodeKernel<false, false><<<grid, kThreads, 0, stream>>>(d);
        ZW_CUDA_LAUNCHED("dithering encode");
      }
      return Status::Ok();
    }
    default:
      return Internal("CompressDense: not a dense codec");
  }
}

Status DecodeDense(const GpuCodec::Config& c, const uint8_t* in, size_t in_bytes, float* out, size_t n,
                   bool acc, float alpha, const Common& cm) {
  DeviceState* st = cm.ws.d_state;
  cudaStream_t stream = cm.stream;
  switch (c.id) {
    case CodecId::kFp16:
    case CodecId::kBf16: {
      ValidateSimpleKernel<<<1, 1, 0, stream>>>(in, in_bytes, c.id, n, 2 * n, st);
      const unsigned grid = GridFor(n / 4);
      const uint8_t* p = in + WireHeader::kBytes;
      const bool bf = c.id == CodecId::kBf16;
      if (bf && acc) HalfDecodeKernel<true, true><<<grid, kThreads, 0, stream>>>(p, out, n, alpha, st);
      if (bf && !acc) HalfDecodeKernel<true, false><<<grid, kThreads, 0, stream>>>(p, out, n, alpha, st);
      if (!bf && acc) HalfDecodeKernel<false, true><<<grid, kThreads, 0, stream>>>(p, out, n, alpha, st);
      if (!bf && !acc) HalfDecodeKernel<false, false><<<grid, kThreads, 0, stream>>>(p, out, n, alpha, st);
      ZW_CUDA_LAUNCHED("half decode");
      return Status::Ok();
    }
    case CodecId::kOnebit: {
      OnebitValidateKernel<<<1, 1, 0, stream>>>(in, in_bytes, n, st);
      const unsigned grid = GridFor((n + 3) / 4);
      if (acc) {
        OnebitDecodeKernel<true><<<grid, kThreads, 0, stream>>>(in, out, n, alpha, st);
      } else {
        OnebitDecodeKernel<false><<<grid, kThreads, 0, stream>>>(in, out, n, alpha, st);
      }
      ZW_CUDA_LAUNCHED("onebit decode");
      return Status::Ok();
    }
    case CodecId::kTerngrad: {
      TerngradValidateKernel<<<1, 1, 0, stream>>>(in, in_bytes, n, st);
      const size_t bytes = (n + 3) / 4;
      TerngradCodesKernel<<<GridFor(bytes), kThreads, 0, stream>>>(in + 36, bytes, st);
      const unsigned grid = GridFor(bytes);
      if (acc) {
        TerngradDecodeKernel<true><<<grid, kThreads, 0, stream>>>(in, out, n, alpha, st);
      } else {
        TerngradDecodeKernel<false><<<grid, kThreads, 0, stream>>>(in, out, n, alpha, st);
      }
      ZW_CUDA_LAUNCHED("terngrad decode");
      return Status::Ok();
    }
    case CodecId::kDithering: {
      DitherValidateKernel<<<1, 1, 0, stream>>>(in, in_bytes, n, st);
      DitherCodesKernel<<<GridFor(n), kThreads, 0, stream>>>(in, n, st);
      if (acc) {
        DitherDecodeKernel<true><<<GridFor(n), kThreads, 0, stream>>>(in, out, n, alpha, st);
      } else {
        DitherDecodeKernel<false><<<GridFor(n), kThreads, 0, stream>>>(in, out, n, alpha, st);
      }
      ZW_CUDA_LAUNCHED("dithering decode");
      return Status::Ok();
    }
    default:
      return Internal("DecodeDense: not a dense codec");
  }
}

bool IsDense(CodecId id) {
  return id == CodecId::kFp16 || id == CodecId::kBf16 || id == CodecId::kOnebit || id == CodecId::kTerngrad ||
         id == CodecId::kDithering;
}

}  // namespace

Status WriteBlob(const uint8_t* bytes, size_t len, uint64_t total, uint8_t* out, DeviceState* st,
                 cudaStream_t stream) {
  HeaderBlob blob{};
  if (len > sizeof(blob.bytes)) return Internal("WriteBlob: header block too long");
  std::memcpy(blob.bytes, bytes, len);
  blob.len = static_cast<uint32_t>(len);
  blob.total = total;
  WriteBlobKernel<<<1, 128, 0, stream>>>(blob, out, st);
  ZW_CUDA_LAUNCHED("header kernel");
  return Status::Ok();
}

Status AddInto(const float* x, float* r, size_t n, cudaStream_t stream) {
  if (n == 0) return Status::Ok();
  AddIntoKernel<<<GridFor(n / 4), kThreads, 0, stream>>>(x, r, n);
  ZW_CUDA_LAUNCHED("add");
  return Status::Ok();
}

size_t ScratchBytesFor(const GpuCodec::Config& c, size_t n) {
  if (IsDense(c.id)) return DenseScratch(n);
  return SparseScratchBytes(c, n);
}

Status LaunchCompress(const GpuCodec::Config& c, const float* x, float* residual, size_t n, uint8_t* out,
                      size_t out_capacity, const CodecContext& ctx, GpuCodecWorkspace::Impl& ws,
                      GpuStream stream) {
  const size_t need = ScratchBytesFor(c, n);
  if (need > ws.scratch_bytes) {
    return InvalidArgument("gpu codec: workspace scratch of " + std::to_string(ws.scratch_bytes) +
                           " bytes is smaller than the " + std::to_string(need) + " this codec needs");
  }
  const Common cm{ws, stream};
  ZW_RETURN_IF_ERROR(Begin(cm));
  if (IsDense(c.id)) {
    ZW_RETURN_IF_ERROR(CompressDense(c, x, residual, n, out, ctx, cm));
  } else {
    // Sparse codecs: y = x + r first, then encode y and decode-accumulate it
    // back with alpha = -1, exactly as kernels::ErrorFeedback does.
    if (residual != nullptr) ZW_RETURN_IF_ERROR(AddInto(x, residual, n, stream));
    const float* y = residual != nullptr ? residual : x;
    ZW_RETURN_IF_ERROR(SparseCompress(c, y, n, out, ctx, ws, stream));
    if (residual != nullptr) {
      ZW_RETURN_IF_ERROR(SparseDecode(c, out, out_capacity, &ws.d_state->encoded_bytes, residual, n, true,
                                      -1.0f, ws, stream));
    }
  }
  return End(cm);
}

Status LaunchDecode(const GpuCodec::Config& c, const uint8_t* in, size_t in_bytes, float* out, size_t n,
                    bool accumulate, float alpha, GpuCodecWorkspace::Impl& ws, GpuStream stream) {
  const size_t need = ScratchBytesFor(c, n);
  if (need > ws.scratch_bytes) {
    return InvalidArgument("gpu codec: workspace scratch of " + std::to_string(ws.scratch_bytes) +
                           " bytes is smaller than the " + std::to_string(need) + " this codec needs");
  }
  const Common cm{ws, stream};
  ZW_RETURN_IF_ERROR(Begin(cm));
  if (IsDense(c.id)) {
    ZW_RETURN_IF_ERROR(DecodeDense(c, in, in_bytes, out, n, accumulate, alpha, cm));
  } else {
    ZW_RETURN_IF_ERROR(SparseDecode(c, in, in_bytes, nullptr, out, n, accumulate, alpha, ws, stream));
  }
  return End(cm);
}

}  // namespace zipwire::kernels::cuda

namespace zipwire::kernels::cuda::testing {
uint32_t PhiloxDraw(uint64_t seed, uint64_t tensor, uint32_t chunk, uint64_t step, uint32_t purpose,
                    uint64_t position) {
  return PhiloxU32(MakePhilox(seed, tensor, chunk, step, purpose), position);
}
}  // namespace zipwire::kernels::cuda::testing

namespace zipwire::kernels::cuda::testing {
std::vector<uint32_t> DitheringCodes(const float* x, size_t n, uint32_t s, bool natural, const float* norms,
                                     uint32_t bucket_log2, const CodecContext& ctx) {
  const DevPhilox ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, 1);
  std::vector<uint32_t> codes(n);
  for (size_t i = 0; i < n; ++i) {
    const DitherQuant q = MakeDitherQuant(s, natural, norms[bucket_log2 == 0 ? 0 : i >> bucket_log2]);
    codes[i] =
        DitherCodeOf(q, x[i], DevUniform16(Half(PhiloxBlock(ph, i / 8), static_cast<uint32_t>(i % 8))));
  }
  return codes;
}
std::vector<uint32_t> TerngradCodes(const float* x, size_t n, float scale, const CodecContext& ctx) {
  const DevPhilox ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, 2);
  std::vector<uint32_t> codes(n);
  for (size_t i = 0; i < n; ++i) codes[i] = TerngradCodeOf(x[i], scale, PhiloxU32(ph, i));
  return codes;
}
}  // namespace zipwire::kernels::cuda::testing
