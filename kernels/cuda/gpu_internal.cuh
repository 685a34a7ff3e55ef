// Shared by the CUDA codec sources: the device-side result record, the
// workspace, Philox4x32-10 as __host__ __device__ code (kernels/philox.h's
// derivation, bit for bit), header writing and the canonical double sum.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/status.h"
#include "kernels/codec.h"
#include "kernels/cuda/gpu_codec.h"
#include "kernels/cuda/gpu_launch.h"

namespace zipwire::kernels::cuda {

// Device-side error codes (DeviceState::error); LastStatus maps them.
enum GpuError : uint32_t {
  kGpuOk = 0,
  kErrNonFiniteInput = 1,  // InvalidArgument: input has a NaN or infinity
  kErrNormOverflow = 2,    // InvalidArgument: dithering l2 norm overflows float
  kErrSketchOverflow = 3,  // InvalidArgument: countsketch counters not finite
  kErrBadHeader = 10,      // Corrupt: magic, version, reserved, sizes
  kErrWrongCodec = 11,     // InvalidArgument: another codec's buffer
  kErrWrongElements = 12,  // InvalidArgument: element count differs
  kErrBadParams = 13,      // Corrupt: parameter block / word
  kErrBadPayload = 14,     // Corrupt: payload contents (codes, indices, padding)
  kErrBadScalar = 15,      // Corrupt: scale / norm not finite and >= +0
  kErrParamMismatch = 16,  // InvalidArgument: parameters differ from this GpuCodec's
  kErrInternal = 17,       // Internal
};

// The per-operation record in device memory; the first 16 bytes are the
// result, the rest is control state of multi-kernel operations.
struct DeviceState {
  unsigned long long encoded_bytes;
  uint32_t error;
  uint32_t detail;
  uint32_t blocks_done;  // last-block-done counter of the reduction passes
  uint32_t max_bits;     // max |x| bit pattern
  float scalar;          // onebit scale, terngrad scale, dithering norm
  uint32_t count;        // entries counted / compacted
  // Exact top-k selection.
  uint32_t prefix;
  uint32_t need;
  uint32_t cutoff_idx;
  uint32_t k;  // entries to select (countsketch: from the buffer)
  // topk_sampled control (mirrors TopkCodec::SampledSelect).
  long long r, too_few, too_many;
  uint32_t done, success, threshold, attempt;
  // Sparse wire layout.
  uint32_t m;
  uint32_t varint;
  unsigned long long index_bytes;
  unsigned long long in_bytes;
  // A Philox stream derived on the device (decoders read the context from the buffer).
  uint32_t key0, key1, hi0, hi1;
  uint32_t rows, cols;
  uint32_t tie_count;
  uint32_t pad;
};

struct GpuCodecWorkspace::Impl {
  size_t max_elements = 0;
  DeviceState* d_state = nullptr;
  DeviceState* h_state = nullptr;  // pinned
  uint8_t* d_scratch = nullptr;
  size_t scratch_bytes = 0;
  ~Impl();
};

// Bump allocator over the workspace scratch (256-byte aligned pieces).
class ScratchCarver {
 public:
  ScratchCarver(uint8_t* base, size_t bytes) : base_(base), bytes_(bytes) {}
  template <typename T>
  T* Take(size_t count) {
    const size_t at = (used_ + 255) & ~size_t{255};
    used_ = at + count * sizeof(T);
    return reinterpret_cast<T*>(base_ + at);
  }
  size_t used() const { return used_; }
  bool fits() const { return used_ <= bytes_; }

 private:
  uint8_t* base_;
  size_t bytes_;
  size_t used_ = 0;
};

inline Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return Internal(std::string("cuda: ") + what + ": " + cudaGetErrorString(e));
}
#define ZW_CUDA_RETURN(expr, what) ZW_RETURN_IF_ERROR(::zipwire::kernels::cuda::CudaStatus((expr), (what)))
// After a kernel launch: reports launch-configuration errors (no sync).
#define ZW_CUDA_LAUNCHED(what) ZW_CUDA_RETURN(cudaGetLastError(), (what))

// ---- Philox4x32-10 -----------------------------------------------------------

struct DevPhilox {
  uint32_t key0, key1, hi0, hi1;
};

__host__ __device__ inline uint4 Philox10(uint4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round != 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c.z;
    c = make_uint4(static_cast<uint32_t>(p1 >> 32) ^ c.y ^ k0, static_cast<uint32_t>(p1),
                   static_cast<uint32_t>(p0 >> 32) ^ c.w ^ k1, static_cast<uint32_t>(p0));
  }
  return c;
}

__host__ __device__ inline DevPhilox MakePhilox(uint64_t seed, uint64_t tensor, uint32_t chunk, uint64_t step,
                                                uint32_t purpose) {
  const uint4 b1 =
      Philox10(make_uint4(static_cast<uint32_t>(tensor), static_cast<uint32_t>(tensor >> 32), chunk, purpose),
               static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint4 b2 = Philox10(
      make_uint4(static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), b1.z, b1.w), b1.x, b1.y);
  return DevPhilox{b2.x, b2.y, b2.z, b2.w};
}

__host__ __device__ inline uint4 PhiloxBlock(const DevPhilox& s, uint64_t block) {
  return Philox10(make_uint4(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), s.hi0, s.hi1),
                  s.key0, s.key1);
}

__host__ __device__ inline uint32_t Word(const uint4& b, uint32_t w) {
  return w == 0 ? b.x : w == 1 ? b.y : w == 2 ? b.z : b.w;
}

__host__ __device__ inline uint32_t PhiloxU32(const DevPhilox& s, uint64_t position) {
  return Word(PhiloxBlock(s, position >> 2), static_cast<uint32_t>(position & 3));
}

// ---- arithmetic shared by the kernels and their host tests --------------------
// Round-to-nearest float operations: intrinsics on the device (never
// contracted), plain operations on the host (x86-64 SSE, no FMA).
__host__ __device__ inline uint32_t BitsOf(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
__host__ __device__ inline float FloatOf(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
__host__ __device__ inline float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ inline float SubRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__host__ __device__ inline float DivRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// PhiloxUniform: the top 24 bits through int32, times 2^-24 (exact).
__host__ __device__ inline float DevUniform(uint32_t u) {
  return MulRn(static_cast<float>(static_cast<int32_t>(u >> 8)), 0x1p-24f);
}

// dithering's draw: the 16-bit halfword h of a block's little-endian words
// (h in [0, 8): word h / 2, the high half for odd h), as a float in [0, 1)
// with resolution 2^-16 (kernels/codec_dithering.cc Uniform16).
__host__ __device__ inline uint32_t Half(const uint4& b, uint32_t h) {
  return (Word(b, h >> 1) >> ((h & 1u) << 4)) & 0xffffu;
}
__host__ __device__ inline float DevUniform16(uint32_t h) {
  return MulRn(static_cast<float>(static_cast<int32_t>(h)), 0x1p-16f);
}

// terngrad's code of x against scale: 01 +scale, 10 -scale, 00 zero.
__host__ __device__ inline uint32_t TerngradCodeOf(float x, float scale, uint32_t u) {
  const uint32_t xb = BitsOf(x);
  const float a = FloatOf(xb & 0x7fffffffu);
  const uint32_t fire = MulRn(DevUniform(u), scale) < a ? 1u : 0u;
  return fire * (1u + (xb >> 31));
}

// dithering's quantiser (kernels/codec_dithering.cc Quantise), per element.
struct DitherQuant {
  uint32_t s;
  bool natural;
  float norm, mult, inv, below_scale;
  int32_t min_exp;
};
__host__ __device__ inline DitherQuant MakeDitherQuant(uint32_t s, bool natural, float norm) {
  DitherQuant q;
  q.s = s;
  q.natural = natural;
  q.norm = norm;
  q.mult = DivRn(static_cast<float>(s), norm);
  q.inv = DivRn(1.0f, norm);
  q.below_scale = natural ? FloatOf((127u + s - 1) << 23) : 0.0f;  // 2^(s-1), s <= 32
  q.min_exp = 1 - static_cast<int32_t>(s);
  return q;
}
// The level l in [0, s] of x for the uniform draw uf.
__host__ __device__ inline uint32_t DitherLevelOf(const DitherQuant& q, float x, float uf) {
  if (q.norm == 0.0f) return 0;
  const float ax = FloatOf(BitsOf(x) & 0x7fffffffu);
  const uint32_t s = q.s;
  if (!q.natural) {
    const float lv = MulRn(ax, q.mult);
    const float sf = static_cast<float>(s);
    const int32_t fl = static_cast<int32_t>(sf < lv ? sf : lv);  // truncation, as the CPU's cast
    const float p = SubRn(lv, static_cast<float>(fl));
    const uint32_t l = static_cast<uint32_t>(fl) + (uf < p ? 1u : 0u);
    return l < s ? l : s;
  }
  const float r0 = MulRn(ax, q.inv);
  const float r = 1.0f < r0 ? 1.0f : r0;
  const uint32_t rb = BitsOf(r);
  const int32_t e = static_cast<int32_t>(rb >> 23) - 127;
  const float f = MulRn(static_cast<float>(rb & 0x7fffffu), 0x1p-23f);
  uint32_t l;
  if (e >= q.min_exp) {
    l = static_cast<uint32_t>(static_cast<int32_t>(s) + e) + (uf < f ? 1u : 0u);
  } else {
    l = uf < MulRn(r, q.below_scale) ? 1u : 0u;
  }
  return l < s ? l : s;
}
__host__ __device__ inline uint32_t DitherCodeOf(const DitherQuant& q, float x, float uf) {
  const uint32_t l = DitherLevelOf(q, x, uf);
  return l == 0 ? 0u : (l << 1 | BitsOf(x) >> 31);
}

// ---- bytes ---------------------------------------------------------------------

__device__ inline void StoreLe32Dev(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
__device__ inline void StoreLe64Dev(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
__device__ inline uint32_t LoadLe32Dev(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
__device__ inline uint64_t LoadLe64Dev(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

__device__ inline void WriteHeaderDev(uint8_t* out, CodecId codec, uint32_t param_bytes, uint64_t elements,
                                      uint64_t payload_bytes, uint32_t param_word) {
  StoreLe32Dev(out, WireHeader::kMagic);
  out[4] = WireHeader::kVersion;
  out[5] = static_cast<uint8_t>(codec);
  out[6] = static_cast<uint8_t>(param_bytes);
  out[7] = static_cast<uint8_t>(param_bytes >> 8);
  StoreLe64Dev(out + 8, elements);
  StoreLe64Dev(out + 16, payload_bytes);
  StoreLe32Dev(out + 24, param_word);
  StoreLe32Dev(out + 28, 0);
}

// The first error wins; later ones keep it.
__device__ inline void SetError(DeviceState* st, uint32_t code) { atomicCAS(&st->error, 0u, code); }

// ParseHeader + the codec/element checks of ValidateHeader, on the device, for
// a buffer of in_bytes bytes. Returns the error code (0 when valid) and fills
// the fields. Run by one thread.
struct DevHeader {
  uint32_t codec, param_bytes, param_word;
  uint64_t elements, payload_bytes;
};
__device__ inline uint32_t ParseHeaderDev(const uint8_t* in, uint64_t in_bytes, CodecId want, uint64_t n,
                                          DevHeader* h) {
  if (in_bytes < WireHeader::kBytes) return kErrBadHeader;
  if (LoadLe32Dev(in) != WireHeader::kMagic || in[4] != WireHeader::kVersion) return kErrBadHeader;
  h->codec = in[5];
  h->param_bytes = static_cast<uint32_t>(in[6] | (in[7] << 8));
  h->elements = LoadLe64Dev(in + 8);
  h->payload_bytes = LoadLe64Dev(in + 16);
  h->param_word = LoadLe32Dev(in + 24);
  if (h->codec > static_cast<uint32_t>(CodecId::kCountSketch)) return kErrBadHeader;
  if (LoadLe32Dev(in + 28) != 0) return kErrBadHeader;
  const uint64_t after = in_bytes - WireHeader::kBytes;
  if (h->param_bytes > after || h->payload_bytes != after - h->param_bytes) return kErrBadHeader;
  if (h->codec != static_cast<uint32_t>(want)) return kErrWrongCodec;
  if (h->elements != n) return kErrWrongElements;
  return kGpuOk;
}

// KFor on the device (same double arithmetic; round() is exact).
__host__ __device__ inline uint64_t KForDev(double v, uint64_t n) {
  if (n == 0) return 0;
  double k = v < 1.0 ? fmax(1.0, round(v * static_cast<double>(n))) : v;
  return k >= static_cast<double>(n) ? n : static_cast<uint64_t>(k);
}
__host__ __device__ inline bool IsRatioOrCountDev(double v) {
  if (!(v > 0.0)) return false;
  if (v < 1.0) return true;
  return v <= 4294967295.0 && v == floor(v);
}

// ---- the canonical double sum (helper-notes/canonical_sum.md) ---------------
constexpr size_t kCanonicalSegment = 8192;

// The warp tree of the canonical order: for off in 16..1, lane[l] += lane[l+off].
__device__ inline double CanonicalWarpTree(double v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = __dadd_rn(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

// Launch helpers.
constexpr int kThreads = 256;
inline unsigned BlocksFor(size_t items, size_t per_block) {
  const size_t b = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(b == 0 ? 1 : b);
}

// Sparse codecs (gpu_sparse.cu).
size_t SparseScratchBytes(const GpuCodec::Config& c, size_t n);
Status SparseCompress(const GpuCodec::Config& c, const float* x, size_t n, uint8_t* out,
                      const CodecContext& ctx, GpuCodecWorkspace::Impl& ws, cudaStream_t stream);
// d_in_bytes: when not null the buffer's size is read from there on the device
// (error feedback decoding its own output); in_bytes is then an upper bound.
Status SparseDecode(const GpuCodec::Config& c, const uint8_t* in, size_t in_bytes,
                    const unsigned long long* d_in_bytes, float* out, size_t n, bool accumulate, float alpha,
                    GpuCodecWorkspace::Impl& ws, cudaStream_t stream);

// Writes `len` (<= 96) host bytes to out and sets the encoded size, from a
// kernel argument: no host-to-device copy (a pageable one would synchronise).
Status WriteBlob(const uint8_t* bytes, size_t len, uint64_t total, uint8_t* out, DeviceState* st,
                 cudaStream_t stream);

// y = x + r into r (r += x), elementwise.
Status AddInto(const float* x, float* r, size_t n, cudaStream_t stream);

}  // namespace zipwire::kernels::cuda
