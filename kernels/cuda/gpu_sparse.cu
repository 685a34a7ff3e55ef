// The sparse and hashed codecs on the GPU: topk (exact), topk_sampled, randomk
// and countsketch. Byte-identical to kernels/codec_topk.cc, codec_randomk.cc and
// codec_countsketch.cc.
//
// Exact top-k (the k largest |x| bit patterns, ties to the lowest index; NaN
// above Inf above every finite value) is a radix select, never a sort:
//   1. a histogram of the top 11 key bits (one read of x, shared-memory bins);
//   2. the bin holding the k-th largest key; an ordered compaction of every
//      entry at or above that bin (count per 4096-entry tile, scan the tile
//      counts, write: two reads of x) gives the candidates, ascending by index;
//   3. two more 10-bit digits over the candidates only give the exact k-th key T
//      and how many of its ties to take; the ties are compacted to find the
//      index of the last tie taken;
//   4. a final ordered compaction of the candidates keeps key > T, and key == T
//      up to that index: the k indices, ascending, as the CPU lists them.
// Data-dependent counts stay on the device: kernels over a device count use a
// fixed grid striding up to the count, and control flow that depends on data
// (topk_sampled's re-picks, its fallback to exact top-k) is a device-side state
// machine whose inactive branch exits at once, so the host never waits.
//
// topk_sampled mirrors TopkCodec::SampledSelect: the same Philox-drawn stratified
// sample, sorted once (descending) so that nth_element's r-th key is sorted[r];
// at most six counting passes, each followed by a one-thread step that applies
// the CPU's exact double arithmetic for the next rank.
//
// randomk: Floyd's algorithm is sequential on the CPU; here step i's choice is
// resolved in parallel. Step i draws t_i and takes j_i = n - k + i instead when
// t_i is already chosen, i.e. when an earlier step drew the same t (found by a
// stable sort of (t, i)) or when t_i = j_p for an earlier step p that itself
// collided; that chain only goes to smaller steps, so each thread follows it.
// The chosen indices are then sorted (ascending, as the CPU's bitmap lists them).
//
// countsketch: counter sums must add their elements in element order, as the
// CPU does, so each row is a stable radix sort of (bucket, signed value) pairs
// followed by one thread per counter summing its run in order. Deterministic and
// exact, but not fast: a sequential sum of about n / c floats per counter.
#include <algorithm>
#include <cfloat>
#include <cstring>
#include <vector>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/gpu_internal.cuh"
#include "kernels/cuda/gpu_testing.h"

namespace zipwire::kernels::cuda {
namespace {

constexpr size_t kParamTopk = 8;
constexpr size_t kParamRandomk = 40;
constexpr size_t kParamSketch = 28;
constexpr size_t kMinSampled = size_t{1} << 16;
constexpr int kTileThreads = 256;
constexpr int kTileItems = 16;
constexpr size_t kTile = size_t{kTileThreads} * kTileItems;
constexpr unsigned kStrideGrid = 1024;  // fixed grids of the kernels over device counts

struct CountRange {
  size_t lo, hi;
};
__host__ __device__ inline CountRange SampledRange(size_t k, size_t n) {
  if (k == 0) return {0, 0};
  const size_t lo = k * 4 / 5 > 1 ? k * 4 / 5 : 1;
  size_t hi = (k * 13 + 9) / 10;
  if (hi < lo) hi = lo;
  if (hi > n) hi = n;
  return {lo, hi};
}

size_t KFor(double v, size_t n) { return static_cast<size_t>(KForDev(v, n)); }

size_t MaxEntries(const GpuCodec::Config& c, size_t n) {
  const size_t k = KFor(c.v, n);
  switch (c.id) {
    case CodecId::kTopk:
    case CodecId::kRandomk:
      return k;
    case CodecId::kTopkSampled:
      return SampledRange(k, n).hi;
    case CodecId::kCountSketch:
      return std::min<size_t>(c.keep, n);
    default:
      return 0;
  }
}

unsigned BitsFor(uint64_t max_value) {
  unsigned b = 0;
  while (b < 64 && (max_value >> b) != 0) ++b;
  return b == 0 ? 1 : b;
}

// ---- scratch layout ----------------------------------------------------------------

struct Scratch {
  uint32_t* hist;         // 4096
  uint32_t* tile_counts;  // tiles + 1
  uint32_t* tile_offsets;
  uint32_t* cand_idx;  // n
  uint32_t* cand_key;  // n
  uint32_t* ties;      // n
  uint32_t* idx;       // max(M, 1)
  float* est;          // n (countsketch)
  uint32_t* keys_in;   // sort buffers, n (countsketch) or k (randomk)
  uint32_t* keys_out;
  uint32_t* vals_in;
  uint32_t* vals_out;
  uint32_t* flags;  // 5M + 1 (varint parse)
  uint32_t* ord;
  uint32_t* ends;  // M + 1
  uint32_t* lens;
  uint32_t* offs;
  unsigned long long* delta;  // M + 1
  unsigned long long* cum;
  void* cub_temp;
  size_t cub_bytes;
  size_t total;
};

size_t CubTempBytes(size_t n, size_t m) {
  size_t best = 0, b = 0;
  const int items = static_cast<int>(std::max<size_t>(n, 1));
  const int mitems = static_cast<int>(std::max<size_t>(5 * m + 1, 1));
  cub::DeviceRadixSort::SortPairs(nullptr, b, static_cast<uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), items);
  best = std::max(best, b);
  cub::DeviceRadixSort::SortKeys(nullptr, b, static_cast<uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
                                 items);
  best = std::max(best, b);
  cub::DeviceRadixSort::SortKeysDescending(nullptr, b, static_cast<uint32_t*>(nullptr),
                                           static_cast<uint32_t*>(nullptr), items);
  best = std::max(best, b);
  cub::DeviceScan::ExclusiveSum(nullptr, b, static_cast<uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
                                mitems);
  best = std::max(best, b);
  cub::DeviceScan::InclusiveSum(nullptr, b, static_cast<unsigned long long*>(nullptr),
                                static_cast<unsigned long long*>(nullptr), mitems);
  best = std::max(best, b);
  return best;
}

Scratch Carve(const GpuCodec::Config& c, size_t n, uint8_t* base, size_t bytes) {
  ScratchCarver cv(base, bytes);
  Scratch s{};
  const size_t m = std::max<size_t>(MaxEntries(c, n), 1);
  const size_t tiles = n / kTile + 2;
  const bool select = c.id != CodecId::kRandomk;
  const size_t sel_n = select ? n + 1 : 1;
  const size_t sort_n = c.id == CodecId::kCountSketch ? n + 1 : c.id == CodecId::kRandomk ? m + 1 : 1;
  const size_t sample_n = c.id == CodecId::kTopkSampled ? std::max<size_t>(1024, n / 100) + 1 : 1;
  s.hist = cv.Take<uint32_t>(4096);
  s.tile_counts = cv.Take<uint32_t>(tiles);
  s.tile_offsets = cv.Take<uint32_t>(tiles);
  s.cand_idx = cv.Take<uint32_t>(sel_n);
  s.cand_key = cv.Take<uint32_t>(sel_n);
  s.ties = cv.Take<uint32_t>(select ? sel_n : m + 1);  // randomk: the duplicate flags
  s.idx = cv.Take<uint32_t>(std::max(m + 1, c.id == CodecId::kRandomk ? m + 1 : size_t{1}));
  s.est = cv.Take<float>(c.id == CodecId::kCountSketch ? n + 1 : 1);
  s.keys_in = cv.Take<uint32_t>(std::max(sort_n, sample_n));
  s.keys_out = cv.Take<uint32_t>(std::max(sort_n, sample_n));
  s.vals_in = cv.Take<uint32_t>(sort_n);
  s.vals_out = cv.Take<uint32_t>(sort_n);
  const bool sparse_wire = c.id == CodecId::kTopk || c.id == CodecId::kTopkSampled;
  const size_t vm = sparse_wire ? m + 1 : 1;
  s.flags = cv.Take<uint32_t>(sparse_wire ? 5 * m + 1 : 1);
  s.ord = cv.Take<uint32_t>(sparse_wire ? 5 * m + 1 : 1);
  s.ends = cv.Take<uint32_t>(vm);
  s.lens = cv.Take<uint32_t>(vm);
  s.offs = cv.Take<uint32_t>(vm);
  s.delta = cv.Take<unsigned long long>(vm);
  s.cum = cv.Take<unsigned long long>(vm);
  s.cub_bytes = CubTempBytes(std::max(sort_n, sample_n), sparse_wire ? m : 0) + 256;
  s.cub_temp = cv.Take<uint8_t>(s.cub_bytes);
  s.total = cv.used() + 256;
  return s;
}

// ---- gates -------------------------------------------------------------------------

enum Gate : int { kAlways = 0, kIfNotSampled = 1, kIfSampled = 2 };
__device__ inline bool Closed(int gate, const DeviceState* st) {
  if (st->error != 0) return true;
  if (gate == kIfNotSampled) return st->success != 0;
  if (gate == kIfSampled) return st->success == 0;
  return false;
}

__device__ inline uint32_t AbsKey(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// Sources of (index, key) pairs: the input itself, or a candidate list.
struct FloatSource {
  const float* x;
  __device__ void Load(size_t q, uint32_t* idx, uint32_t* key) const {
    *idx = static_cast<uint32_t>(q);
    *key = AbsKey(x[q]);
  }
};
struct CandSource {
  const uint32_t* idx;
  const uint32_t* key;
  __device__ void Load(size_t q, uint32_t* i, uint32_t* k) const {
    *i = idx[q];
    *k = key[q];
  }
};

// Predicates over (index, key), parameters read from the state.
struct TopBinsPred {  // key's top 11 bits >= the chosen bin
  __device__ bool operator()(uint32_t, uint32_t key, const DeviceState* st) const { return (key >> 20) >= st->prefix; }
};
struct TiePred {
  __device__ bool operator()(uint32_t, uint32_t key, const DeviceState* st) const { return key == st->threshold; }
};
struct FinalPred {
  __device__ bool operator()(uint32_t idx, uint32_t key, const DeviceState* st) const {
    return key > st->threshold || (key == st->threshold && idx <= st->cutoff_idx);
  }
};
struct AtLeastPred {
  __device__ bool operator()(uint32_t, uint32_t key, const DeviceState* st) const { return key >= st->threshold; }
};

__device__ inline size_t ItemCount(size_t n_host, const uint32_t* n_dev) { return n_dev != nullptr ? *n_dev : n_host; }

// ---- ordered compaction --------------------------------------------------------------

template <class Src, class Pred>
__global__ void __launch_bounds__(kTileThreads)
    TileCountKernel(Src src, Pred pred, size_t n_host, const uint32_t* n_dev, uint32_t* tile_counts, int gate,
                    const DeviceState* st) {
  if (Closed(gate, st)) return;
  const size_t n = ItemCount(n_host, n_dev);
  const size_t tiles = (n + kTile - 1) / kTile;
  __shared__ uint32_t warp_sums[kTileThreads / 32];
  for (size_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    uint32_t cnt = 0;
    for (int j = 0; j < kTileItems; ++j) {
      const size_t q = tile * kTile + size_t(j) * kTileThreads + threadIdx.x;
      if (q < n) {
        uint32_t i, k;
        src.Load(q, &i, &k);
        cnt += pred(i, k, st) ? 1u : 0u;
      }
    }
    const uint32_t ws = __reduce_add_sync(0xffffffffu, cnt);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = ws;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t s = 0;
      for (int w = 0; w < kTileThreads / 32; ++w) s += warp_sums[w];
      tile_counts[tile] = s;
    }
    __syncthreads();
  }
}

// One block: exclusive scan of the tile counts, the total into *count_out.
__global__ void __launch_bounds__(1024)
    TileScanKernel(size_t n_host, const uint32_t* n_dev, const uint32_t* tile_counts, uint32_t* tile_offsets,
                   uint32_t* count_out, int gate, const DeviceState* st) {
  if (Closed(gate, st)) return;
  using Scan = cub::BlockScan<uint32_t, 1024>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ uint32_t carry;
  const size_t n = ItemCount(n_host, n_dev);
  const size_t tiles = (n + kTile - 1) / kTile;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (size_t base = 0; base < tiles; base += 1024) {
    const size_t t = base + threadIdx.x;
    const uint32_t v = t < tiles ? tile_counts[t] : 0u;
    uint32_t excl, agg;
    Scan(temp).ExclusiveSum(v, excl, agg);
    if (t < tiles) tile_offsets[t] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += agg;
    __syncthreads();
  }
  if (threadIdx.x == 0) *count_out = carry;
}

// Warp w of the block takes items [512w, 512w + 512) of the tile, 32 at a time
// (coalesced), keeps them in registers with their ballots, and writes the kept
// ones at tile offset + warp offset + rank: the output is in item order.
template <class Src, class Pred>
__global__ void __launch_bounds__(kTileThreads)
    TileWriteKernel(Src src, Pred pred, size_t n_host, const uint32_t* n_dev, const uint32_t* tile_offsets,
                    uint32_t* out_idx, uint32_t* out_key, int gate, const DeviceState* st) {
  if (Closed(gate, st)) return;
  __shared__ uint32_t warp_base[kTileThreads / 32];
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const size_t n = ItemCount(n_host, n_dev);
  const size_t tiles = (n + kTile - 1) / kTile;
  for (size_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    uint32_t idx[kTileItems], key[kTileItems], ballot[kTileItems];
    uint32_t cnt = 0;
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) {
      const size_t q = tile * kTile + size_t{warp} * (32 * kTileItems) + size_t(j) * 32 + lane;
      bool keep = false;
      idx[j] = 0;
      key[j] = 0;
      if (q < n) {
        src.Load(q, &idx[j], &key[j]);
        keep = pred(idx[j], key[j], st);
      }
      ballot[j] = __ballot_sync(0xffffffffu, keep);
      cnt += __popc(ballot[j]);
    }
    if (lane == 0) warp_base[warp] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t at = tile_offsets[tile];
      for (int w = 0; w < kTileThreads / 32; ++w) {
        const uint32_t c = warp_base[w];
        warp_base[w] = at;
        at += c;
      }
    }
    __syncthreads();
    uint32_t at = warp_base[warp];
    const uint32_t below = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) {
      if ((ballot[j] >> lane) & 1u) {
        const uint32_t r = at + __popc(ballot[j] & below);
        out_idx[r] = idx[j];
        if (out_key != nullptr) out_key[r] = key[j];
      }
      at += __popc(ballot[j]);
    }
    __syncthreads();
  }
}

unsigned TileGrid(size_t n_bound) {
  const size_t tiles = n_bound / kTile + 1;
  return static_cast<unsigned>(std::min<size_t>(tiles, kStrideGrid));
}

template <class Src, class Pred>
Status Compact(Src src, Pred pred, size_t n_bound, const uint32_t* n_dev, uint32_t* out_idx, uint32_t* out_key,
               uint32_t* count_out, int gate, const Scratch& s, DeviceState* st, cudaStream_t stream) {
  const unsigned grid = TileGrid(n_bound);
  TileCountKernel<<<grid, kTileThreads, 0, stream>>>(src, pred, n_bound, n_dev, s.tile_counts, gate, st);
  TileScanKernel<<<1, 1024, 0, stream>>>(n_bound, n_dev, s.tile_counts, s.tile_offsets, count_out, gate, st);
  TileWriteKernel<<<grid, kTileThreads, 0, stream>>>(src, pred, n_bound, n_dev, s.tile_offsets, out_idx, out_key,
                                                    gate, st);
  ZW_CUDA_LAUNCHED("compaction");
  return Status::Ok();
}

// ---- exact top-k ---------------------------------------------------------------------

// Histogram of the top 11 key bits of all n entries.
template <class Src>
__global__ void __launch_bounds__(kThreads) TopHistKernel(Src src, size_t n, uint32_t* hist, int gate,
                                                          const DeviceState* st) {
  if (Closed(gate, st)) return;
  __shared__ uint32_t h[2048];
  for (int b = threadIdx.x; b < 2048; b += blockDim.x) h[b] = 0;
  __syncthreads();
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < n; q += stride) {
    uint32_t i, k;
    src.Load(q, &i, &k);
    // Lanes with the same bin add once (normal data crowds a few bins).
    const uint32_t bin = k >> 20;
    const uint32_t peers = __match_any_sync(__activemask(), bin);
    if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&h[bin], __popc(peers));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 2048; b += blockDim.x) {
    if (h[b] != 0) atomicAdd(&hist[b], h[b]);
  }
}

// Histogram of a lower 10-bit digit among candidates matching the prefix so far.
__global__ void __launch_bounds__(kThreads) DigitHistKernel(const uint32_t* keys, const uint32_t* count, int shift,
                                                            uint32_t* hist, int gate, const DeviceState* st) {
  if (Closed(gate, st)) return;
  __shared__ uint32_t h[1024];
  for (int b = threadIdx.x; b < 1024; b += blockDim.x) h[b] = 0;
  __syncthreads();
  const uint32_t prefix = st->prefix;
  const size_t n = *count;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < n; q += stride) {
    const uint32_t k = keys[q];
    if ((k >> (shift + 10)) == prefix) atomicAdd(&h[(k >> shift) & 1023u], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 1024; b += blockDim.x) {
    if (h[b] != 0) atomicAdd(&hist[b], h[b]);
  }
}

// Picks the bin of the need-th largest key (stage 0: need = k); extends the prefix.
__global__ void PickKernel(const uint32_t* hist, int bins, int stage, uint32_t k, int gate, DeviceState* st) {
  if (Closed(gate, st)) return;
  uint32_t need = stage == 0 ? k : st->need;
  int b = bins - 1;
  while (b > 0 && hist[b] < need) need -= hist[b--];
  st->prefix = stage == 0 ? static_cast<uint32_t>(b) : (st->prefix << 10) | static_cast<uint32_t>(b);
  st->need = need;
  if (stage == 2) {
    st->threshold = st->prefix;
    st->cutoff_idx = 0xffffffffu;
  }
}

__global__ void CutoffKernel(const uint32_t* ties, const uint32_t* tie_count, int gate, DeviceState* st) {
  if (Closed(gate, st)) return;
  if (st->need >= 1 && st->need <= *tie_count) st->cutoff_idx = ties[st->need - 1];
}

__global__ void IotaKernel(uint32_t* idx, size_t n, uint32_t* count_out, int gate, const DeviceState* st) {
  if (Closed(gate, st)) return;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) idx[i] = static_cast<uint32_t>(i);
  if (blockIdx.x == 0 && threadIdx.x == 0) *count_out = static_cast<uint32_t>(n);
}

// The k selected indices of `src` (n entries, keys = |x| bits), ascending, into
// s.idx, and k into *count_out.
template <class Src>
Status SelectTopk(Src src, size_t n, size_t k, uint32_t* count_out, int gate, const Scratch& s, DeviceState* st,
                  cudaStream_t stream) {
  if (k == 0) return Status::Ok();  // *count_out stays 0 (the state was reset)
  if (k >= n) {
    IotaKernel<<<BlocksFor(n, kThreads), kThreads, 0, stream>>>(s.idx, n, count_out, gate, st);
    ZW_CUDA_LAUNCHED("iota");
    return Status::Ok();
  }
  ZW_CUDA_RETURN(cudaMemsetAsync(s.hist, 0, 4096 * sizeof(uint32_t), stream), "hist reset");
  const unsigned grid = static_cast<unsigned>(std::min<size_t>(BlocksFor(n, kThreads * 16), 2048));
  TopHistKernel<<<grid, kThreads, 0, stream>>>(src, n, s.hist, gate, st);
  PickKernel<<<1, 1, 0, stream>>>(s.hist, 2048, 0, static_cast<uint32_t>(k), gate, st);
  ZW_CUDA_LAUNCHED("top histogram");
  // Candidates: entries at or above the chosen top bin.
  ZW_RETURN_IF_ERROR(Compact(src, TopBinsPred{}, n, nullptr, s.cand_idx, s.cand_key, &st->count, gate, s, st, stream));
  const CandSource cand{s.cand_idx, s.cand_key};
  DigitHistKernel<<<kStrideGrid / 4, kThreads, 0, stream>>>(s.cand_key, &st->count, 10, s.hist + 2048, gate, st);
  PickKernel<<<1, 1, 0, stream>>>(s.hist + 2048, 1024, 1, 0, gate, st);
  DigitHistKernel<<<kStrideGrid / 4, kThreads, 0, stream>>>(s.cand_key, &st->count, 0, s.hist + 3072, gate, st);
  PickKernel<<<1, 1, 0, stream>>>(s.hist + 3072, 1024, 2, 0, gate, st);
  ZW_CUDA_LAUNCHED("digit histograms");
  // The index of the last tie taken, then the final selection.
  ZW_RETURN_IF_ERROR(Compact(cand, TiePred{}, n, &st->count, s.ties, nullptr, &st->tie_count, gate, s, st, stream));
  CutoffKernel<<<1, 1, 0, stream>>>(s.ties, &st->tie_count, gate, st);
  ZW_CUDA_LAUNCHED("cutoff");
  return Compact(cand, FinalPred{}, n, &st->count, s.idx, nullptr, count_out, gate, s, st, stream);
}

// ---- topk / topk_sampled wire ------------------------------------------------------------

__device__ inline uint32_t VarintLen(uint32_t v) {
  return 1 + (v >= (1u << 7)) + (v >= (1u << 14)) + (v >= (1u << 21)) + (v >= (1u << 28));
}

__global__ void LensKernel(const uint32_t* idx, size_t bound, const DeviceState* st, uint32_t* lens) {
  const size_t m = st->m;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < bound; i += stride) {
    lens[i] = i < m && st->error == 0 ? VarintLen(i == 0 ? idx[0] : idx[i] - idx[i - 1]) : 0u;
  }
}

__global__ void SparseHeaderKernel(uint8_t* out, CodecId id, double v, unsigned long long n, const uint32_t* lens,
                                   const uint32_t* offs, DeviceState* st) {
  if (st->error != 0) return;
  const uint32_t m = st->m;
  const unsigned long long varint_bytes = m == 0 ? 0 : static_cast<unsigned long long>(offs[m - 1]) + lens[m - 1];
  const bool varint = varint_bytes < 4ull * m;
  const unsigned long long index_bytes = varint ? varint_bytes : 4ull * m;
  const unsigned long long payload = 4 + index_bytes + 4ull * m;
  WriteHeaderDev(out, id, kParamTopk, n, payload, varint ? 1u : 0u);
  StoreLe64Dev(out + WireHeader::kBytes, static_cast<uint64_t>(__double_as_longlong(v)));
  StoreLe32Dev(out + WireHeader::kBytes + kParamTopk, m);
  st->varint = varint ? 1u : 0u;
  st->index_bytes = index_bytes;
  st->encoded_bytes = WireHeader::kBytes + kParamTopk + payload;
}

__global__ void SparseWriteKernel(uint8_t* out, const float* x, const uint32_t* idx, const uint32_t* offs,
                                  const DeviceState* st) {
  if (st->error != 0) return;
  const size_t m = st->m;
  uint8_t* p = out + WireHeader::kBytes + kParamTopk + 4;
  const bool varint = st->varint != 0;
  uint8_t* values = p + st->index_bytes;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += stride) {
    const uint32_t at = idx[i];
    if (varint) {
      uint32_t d = i == 0 ? at : at - idx[i - 1];
      uint8_t* q = p + offs[i];
      while (d >= 0x80u) {
        *q++ = static_cast<uint8_t>(d | 0x80u);
        d >>= 7;
      }
      *q = static_cast<uint8_t>(d);
    } else {
      StoreLe32Dev(p + 4 * i, at);
    }
    StoreLe32Dev(values + 4 * i, __float_as_uint(x[at]));
  }
}

Status WriteSparse(CodecId id, double v, const float* x, size_t n, size_t m_bound, uint8_t* out, const Scratch& s,
                   DeviceState* st, cudaStream_t stream) {
  const size_t bound = std::max<size_t>(m_bound, 1);
  LensKernel<<<BlocksFor(bound, kThreads), kThreads, 0, stream>>>(s.idx, bound, st, s.lens);
  size_t temp = s.cub_bytes;
  ZW_CUDA_RETURN(cub::DeviceScan::ExclusiveSum(s.cub_temp, temp, s.lens, s.offs, static_cast<int>(bound), stream),
                 "varint offsets");
  SparseHeaderKernel<<<1, 1, 0, stream>>>(out, id, v, n, s.lens, s.offs, st);
  SparseWriteKernel<<<BlocksFor(bound, kThreads), kThreads, 0, stream>>>(out, x, s.idx, s.offs, st);
  ZW_CUDA_LAUNCHED("sparse write");
  return Status::Ok();
}

// ---- topk_sampled control ------------------------------------------------------------

struct SampledParams {
  size_t n, k, m, stride, lo, hi;
  double per_sample;
};

__global__ void SampleKernel(const float* x, SampledParams p, DevPhilox ph, uint32_t* s) {
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < p.m; i += stride) {
    const uint32_t u = PhiloxU32(ph, i);
    const size_t pos = i * p.stride + static_cast<size_t>((static_cast<uint64_t>(u) * p.stride) >> 32);
    s[i] = AbsKey(x[pos]);
  }
}

__device__ inline long long RankFor(double count, const SampledParams& p) {
  const double r = count / p.per_sample - 1.0;
  double c = round(r);
  const double top = static_cast<double>(p.m - 1);
  c = c < 0.0 ? 0.0 : (top < c ? top : c);  // std::clamp
  return static_cast<long long>(c);
}

__global__ void SampledInitKernel(SampledParams p, DeviceState* st) {
  st->r = RankFor(static_cast<double>(p.k), p);
  st->too_few = -1;
  st->too_many = static_cast<long long>(p.m);
  st->done = 0;
  st->success = 0;
  st->count = 0;
}

// Counts entries with key >= sorted[r] (the CPU's ThresholdCandidates count).
__global__ void __launch_bounds__(kThreads) CountAtLeastKernel(const float* x, size_t n, const uint32_t* sorted,
                                                               DeviceState* st) {
  if (st->done != 0) return;
  const uint32_t t = sorted[st->r];
  uint32_t cnt = 0;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) cnt += AbsKey(x[i]) >= t;
  cnt = __reduce_add_sync(0xffffffffu, cnt);
  if ((threadIdx.x & 31) == 0 && cnt != 0) atomicAdd(&st->count, cnt);
}

// One attempt's decision, exactly TopkCodec::SampledSelect's loop body.
__global__ void SampledDecideKernel(SampledParams p, const uint32_t* sorted, DeviceState* st) {
  if (st->done != 0) return;
  const size_t c = st->count;
  st->count = 0;
  long long r = st->r;
  if (c <= p.hi) {
    if (c >= p.lo) {
      st->success = 1;
      st->done = 1;
      st->threshold = sorted[r];
      return;
    }
    st->too_few = max(st->too_few, r);
    const double denom = fmax(1.0, static_cast<double>(c));
    long long next =
        RankFor(static_cast<double>(p.k) * (static_cast<double>(r) + 1.0) * p.per_sample / denom, p);
    if (next <= st->too_few || next >= st->too_many) next = st->too_few + (st->too_many - st->too_few) / 2;
    r = next;
  } else {
    st->too_many = min(st->too_many, r);
    r = st->too_few + (st->too_many - st->too_few) / 2;
  }
  st->r = r;
  if (r <= st->too_few || r >= st->too_many) st->done = 1;
  if (++st->attempt == 6) st->done = 1;
}

// ---- topk decode ------------------------------------------------------------------------

__global__ void SparseValidateKernel(const uint8_t* in, unsigned long long in_bytes_host,
                                     const unsigned long long* in_bytes_dev, CodecId id, unsigned long long n,
                                     unsigned long long m_bound, DeviceState* st) {
  if (st->error != 0) return;
  const unsigned long long in_bytes = in_bytes_dev != nullptr ? *in_bytes_dev : in_bytes_host;
  DevHeader h{};
  uint32_t e = ParseHeaderDev(in, in_bytes, id, n, &h);
  if (e == kGpuOk && h.param_bytes != kParamTopk) e = kErrBadParams;
  if (e == kGpuOk && h.param_word != 0 && h.param_word != 1) e = kErrBadParams;
  double v = 0;
  if (e == kGpuOk) {
    v = __longlong_as_double(static_cast<long long>(LoadLe64Dev(in + WireHeader::kBytes)));
    if (!IsRatioOrCountDev(v)) e = kErrBadParams;
  }
  const uint64_t payload = h.payload_bytes;
  if (e == kGpuOk && payload < 4) e = kErrBadPayload;
  uint64_t m = 0;
  if (e == kGpuOk) {
    m = LoadLe32Dev(in + WireHeader::kBytes + kParamTopk);
    const uint64_t k = KForDev(v, n);
    if (id == CodecId::kTopk) {
      if (m != k) e = kErrBadPayload;
    } else {
      const CountRange r = SampledRange(k, n);
      if (m < r.lo || m > r.hi) e = kErrBadPayload;
    }
  }
  if (e == kGpuOk && m > m_bound) e = kErrParamMismatch;
  if (e == kGpuOk && payload - 4 < 4 * m) e = kErrBadPayload;
  const uint64_t index_bytes = payload - 4 - 4 * m;
  if (e == kGpuOk && h.param_word == 0 && index_bytes != 4 * m) e = kErrBadPayload;
  // m varints of at most 5 bytes: a longer block always leaves bytes over.
  if (e == kGpuOk && h.param_word == 1 && index_bytes > 5 * m) e = kErrBadPayload;
  if (e != kGpuOk) {
    SetError(st, e);
    return;
  }
  st->m = static_cast<uint32_t>(m);
  st->varint = h.param_word;
  st->index_bytes = index_bytes;
}

__global__ void RawIndicesKernel(const uint8_t* in, size_t n, uint32_t* idx, DeviceState* st) {
  if (st->error != 0 || st->varint != 0) return;
  const size_t m = st->m;
  const uint8_t* p = in + WireHeader::kBytes + kParamTopk + 4;
  bool bad = false;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += stride) {
    const uint32_t cur = LoadLe32Dev(p + 4 * i);
    if (i > 0 && cur <= LoadLe32Dev(p + 4 * (i - 1))) bad = true;
    if (cur >= n) bad = true;
    idx[i] = cur;
  }
  if (bad) SetError(st, kErrBadPayload);
}

__global__ void VarintFlagsKernel(const uint8_t* in, size_t bound, uint32_t* flags, const DeviceState* st) {
  const bool active = st->error == 0 && st->varint != 0;
  const size_t ib = active ? st->index_bytes : 0;
  const uint8_t* p = in + WireHeader::kBytes + kParamTopk + 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t b = size_t{blockIdx.x} * blockDim.x + threadIdx.x; b < bound; b += stride)
    flags[b] = b < ib && (p[b] & 0x80u) == 0 ? 1u : 0u;
}

__global__ void VarintEndsKernel(const uint8_t* in, const uint32_t* flags, const uint32_t* ord, uint32_t* ends,
                                 DeviceState* st) {
  if (st->error != 0 || st->varint == 0) return;
  const size_t ib = st->index_bytes;
  const size_t m = st->m;
  const uint8_t* p = in + WireHeader::kBytes + kParamTopk + 4;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t b = size_t{blockIdx.x} * blockDim.x + threadIdx.x; b < ib; b += stride) {
    if (flags[b] != 0 && ord[b] < m) ends[ord[b]] = static_cast<uint32_t>(b);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // Exactly m terminators and the block ends on one (no bytes left over).
    const size_t total = ib == 0 ? 0 : ord[ib - 1] + flags[ib - 1];
    if (total != m || (ib > 0 && (p[ib - 1] & 0x80u) != 0)) SetError(st, kErrBadPayload);
  }
}

__global__ void VarintDeltaKernel(const uint8_t* in, const uint32_t* ends, size_t bound, unsigned long long* delta,
                                  DeviceState* st) {
  const bool active = st->error == 0 && st->varint != 0;
  const size_t m = active ? st->m : 0;
  const uint8_t* p = in + WireHeader::kBytes + kParamTopk + 4;
  bool bad = false;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t v = size_t{blockIdx.x} * blockDim.x + threadIdx.x; v < bound; v += stride) {
    unsigned long long d = 0;
    if (v < m) {
      const size_t start = v == 0 ? 0 : size_t{ends[v - 1]} + 1;
      const size_t end = ends[v];
      if (end < start || end - start > 4) {
        bad = true;  // more than 5 bytes: the CPU fails on overflow at shift 28
      } else {
        for (size_t b = start; b <= end; ++b) {
          const uint32_t byte = p[b];
          const int shift = static_cast<int>(7 * (b - start));
          if (shift == 28 && byte > 0x0f) bad = true;
          d |= static_cast<unsigned long long>(byte & 0x7fu) << shift;
        }
        if (p[end] == 0 && end != start) bad = true;  // overlong
        if (v > 0 && d == 0) bad = true;
      }
    }
    delta[v] = d;
  }
  if (bad) SetError(st, kErrBadPayload);
}

__global__ void VarintIndicesKernel(const unsigned long long* cum, size_t n, uint32_t* idx, DeviceState* st) {
  if (st->error != 0 || st->varint == 0) return;
  const size_t m = st->m;
  bool bad = false;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += stride) {
    const unsigned long long cur = cum[i];
    if (cur >= n) bad = true;
    idx[i] = static_cast<uint32_t>(cur);
  }
  if (bad) SetError(st, kErrBadPayload);
}

// ---- output (shared by the sparse decoders) ---------------------------------------------

__global__ void ZeroKernel(float* out, size_t n, const DeviceState* st) {
  if (st->error != 0) return;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = 0.0f;
}

// out[idx[i]] (+)= (alpha *) value i; values are little-endian floats at `values`
// (any alignment) or, when `dense` is set, dense[idx[i]] (countsketch estimates).
__global__ void ScatterKernel(const uint32_t* idx, const uint8_t* values, const float* dense, const uint32_t* count,
                              size_t m_host, float* out, bool acc, float alpha, const DeviceState* st) {
  if (st->error != 0) return;
  const size_t m = count != nullptr ? *count : m_host;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += stride) {
    const uint32_t at = idx[i];
    const float v = dense != nullptr ? dense[at] : __uint_as_float(LoadLe32Dev(values + 4 * i));
    out[at] = acc ? __fadd_rn(out[at], __fmul_rn(alpha, v)) : v;
  }
}

// Values of a topk buffer: after the (validated) index block.
__global__ void TopkScatterKernel(const uint8_t* in, const uint32_t* idx, float* out, bool acc, float alpha,
                                  const DeviceState* st) {
  if (st->error != 0) return;
  const size_t m = st->m;
  const uint8_t* values = in + WireHeader::kBytes + kParamTopk + 4 + st->index_bytes;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += stride) {
    const uint32_t at = idx[i];
    const float v = __uint_as_float(LoadLe32Dev(values + 4 * i));
    out[at] = acc ? __fadd_rn(out[at], __fmul_rn(alpha, v)) : v;
  }
}

Status TopkDecode(const GpuCodec::Config& c, const uint8_t* in, size_t in_bytes,
                  const unsigned long long* d_in_bytes, float* out, size_t n, bool acc, float alpha,
                  const Scratch& s, DeviceState* st, cudaStream_t stream) {
  const size_t m_bound = MaxEntries(c, n);
  SparseValidateKernel<<<1, 1, 0, stream>>>(in, in_bytes, d_in_bytes, c.id, n, m_bound, st);
  const unsigned grid = BlocksFor(std::max<size_t>(m_bound, 1), kThreads);
  RawIndicesKernel<<<std::min(grid, 4096u), kThreads, 0, stream>>>(in, n, s.idx, st);
  // Varint: terminators, their ordinals, each varint's bytes, the running sum.
  const size_t vb = 5 * m_bound + 1;
  VarintFlagsKernel<<<std::min(BlocksFor(vb, kThreads), 4096u), kThreads, 0, stream>>>(in, vb, s.flags, st);
  size_t temp = s.cub_bytes;
  ZW_CUDA_RETURN(cub::DeviceScan::ExclusiveSum(s.cub_temp, temp, s.flags, s.ord, static_cast<int>(vb), stream),
                 "varint scan");
  VarintEndsKernel<<<std::min(BlocksFor(vb, kThreads), 4096u), kThreads, 0, stream>>>(in, s.flags, s.ord, s.ends, st);
  const size_t db = m_bound + 1;
  VarintDeltaKernel<<<std::min(BlocksFor(db, kThreads), 4096u), kThreads, 0, stream>>>(in, s.ends, db, s.delta, st);
  temp = s.cub_bytes;
  ZW_CUDA_RETURN(cub::DeviceScan::InclusiveSum(s.cub_temp, temp, s.delta, s.cum, static_cast<int>(db), stream),
                 "varint sum");
  VarintIndicesKernel<<<std::min(grid, 4096u), kThreads, 0, stream>>>(s.cum, n, s.idx, st);
  if (!acc) ZeroKernel<<<std::min(BlocksFor(n, kThreads), 65535u), kThreads, 0, stream>>>(out, n, st);
  TopkScatterKernel<<<std::min(grid, 4096u), kThreads, 0, stream>>>(in, s.idx, out, acc, alpha, st);
  ZW_CUDA_LAUNCHED("topk decode");
  return Status::Ok();
}

// ---- randomk -----------------------------------------------------------------------------

// Step i of Floyd's draw: t_i, or j_i = n - k + i when t_i is already chosen,
// i.e. when an earlier step drew t_i (dup[i]) or t_i = j_p of an earlier step p
// that itself collided; the chain only goes to smaller steps.
__host__ __device__ inline uint32_t FloydChoice(size_t i, const uint32_t* t, const uint32_t* dup, size_t n,
                                                size_t k) {
  const size_t base = n - k;
  size_t cur = i;
  bool collided = false;
  while (true) {
    if (dup[cur] != 0) {
      collided = true;
      break;
    }
    const size_t v = t[cur];
    if (v < base || v - base >= cur) break;  // not j_p of an earlier step p
    cur = v - base;                          // collided iff step p collided
  }
  return static_cast<uint32_t>(collided ? base + i : t[i]);
}

__global__ void RandomkDrawKernel(size_t n, size_t k, DevPhilox ph_host, bool from_state, const DeviceState* st,
                                  uint32_t* t, uint32_t* steps) {
  const DevPhilox ph = from_state ? DevPhilox{st->key0, st->key1, st->hi0, st->hi1} : ph_host;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < k; i += stride) {
    const uint64_t u = PhiloxU32(ph, i);
    const uint64_t j = n - k + i;
    t[i] = static_cast<uint32_t>((u * (j + 1)) >> 32);
    steps[i] = static_cast<uint32_t>(i);
  }
}

// dup[step] = an earlier step drew the same t (sorted stably by t).
__global__ void RandomkDupKernel(const uint32_t* t_sorted, const uint32_t* steps_sorted, size_t k, uint32_t* dup) {
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t q = size_t{blockIdx.x} * blockDim.x + threadIdx.x; q < k; q += stride)
    dup[steps_sorted[q]] = q > 0 && t_sorted[q] == t_sorted[q - 1] ? 1u : 0u;
}

__global__ void RandomkChooseKernel(const uint32_t* t, const uint32_t* dup, size_t n, size_t k, uint32_t* chosen) {
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < k; i += stride)
    chosen[i] = FloydChoice(i, t, dup, n, k);
}

// Values x[idx[i]] * f, with x86's NaN propagation (the NaN operand, made quiet).
__global__ void RandomkValuesKernel(const float* x, const uint32_t* idx, size_t k, float f, uint8_t* values,
                                    const DeviceState* st) {
  if (st->error != 0) return;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < k; i += stride) {
    const float v = x[idx[i]];
    const uint32_t bits = isnan(v) ? (__float_as_uint(v) | 0x00400000u) : __float_as_uint(__fmul_rn(v, f));
    reinterpret_cast<uint32_t*>(values)[i] = bits;
  }
}

// The indices of (n, k) for the stream in ph (or in the state), ascending, into s.idx.
Status RandomkIndices(size_t n, size_t k, const DevPhilox& ph, bool from_state, const Scratch& s, DeviceState* st,
                      cudaStream_t stream) {
  const unsigned grid = std::min(BlocksFor(k, kThreads), 4096u);
  RandomkDrawKernel<<<grid, kThreads, 0, stream>>>(n, k, ph, from_state, st, s.keys_in, s.vals_in);
  const int bits = static_cast<int>(BitsFor(n));
  size_t temp = s.cub_bytes;
  ZW_CUDA_RETURN(cub::DeviceRadixSort::SortPairs(s.cub_temp, temp, s.keys_in, s.keys_out, s.vals_in, s.vals_out,
                                                 static_cast<int>(k), 0, bits, stream),
                 "randomk sort");
  RandomkDupKernel<<<grid, kThreads, 0, stream>>>(s.keys_out, s.vals_out, k, s.ties);
  RandomkChooseKernel<<<grid, kThreads, 0, stream>>>(s.keys_in, s.ties, n, k, s.vals_in);
  temp = s.cub_bytes;
  ZW_CUDA_RETURN(cub::DeviceRadixSort::SortKeys(s.cub_temp, temp, s.vals_in, s.idx, static_cast<int>(k), 0, bits,
                                                stream),
                 "randomk index sort");
  ZW_CUDA_LAUNCHED("randomk indices");
  return Status::Ok();
}

__global__ void RandomkValidateKernel(const uint8_t* in, unsigned long long in_bytes_host,
                                      const unsigned long long* in_bytes_dev, unsigned long long n,
                                      unsigned long long k_host, DeviceState* st) {
  if (st->error != 0) return;
  const unsigned long long in_bytes = in_bytes_dev != nullptr ? *in_bytes_dev : in_bytes_host;
  DevHeader h{};
  uint32_t e = ParseHeaderDev(in, in_bytes, CodecId::kRandomk, n, &h);
  if (e == kGpuOk && h.param_bytes != kParamRandomk) e = kErrBadParams;
  const uint8_t* p = in + WireHeader::kBytes;
  if (e == kGpuOk) {
    const double v = __longlong_as_double(static_cast<long long>(LoadLe64Dev(p)));
    const uint32_t flags = LoadLe32Dev(p + 36);
    if (!IsRatioOrCountDev(v) || (flags & ~1u) != 0) {
      e = kErrBadParams;
    } else {
      const uint64_t k = KForDev(v, n);
      if (h.param_word != k) {
        e = kErrBadParams;
      } else if (h.payload_bytes != 4 * k) {
        e = kErrBadPayload;
      } else if (k != k_host) {
        e = kErrParamMismatch;
      }
    }
  }
  if (e != kGpuOk) {
    SetError(st, e);
    return;
  }
  const DevPhilox ph = MakePhilox(LoadLe64Dev(p + 8), LoadLe64Dev(p + 16), LoadLe32Dev(p + 24), LoadLe64Dev(p + 28), 3);
  st->key0 = ph.key0;
  st->key1 = ph.key1;
  st->hi0 = ph.hi0;
  st->hi1 = ph.hi1;
}

// ---- countsketch ---------------------------------------------------------------------------

__device__ inline uint32_t Bucket(uint32_t u, uint32_t c) {
  return static_cast<uint32_t>((static_cast<uint64_t>(u >> 1) * c) >> 31);
}
__device__ inline float Signed(uint32_t u, float v) { return __uint_as_float(__float_as_uint(v) ^ (u << 31)); }

__device__ inline uint32_t SketchDraw(const DevPhilox& ph, size_t j, uint32_t row, uint32_t rows) {
  const uint64_t blocks_per = (rows + 3) / 4;
  return Word(PhiloxBlock(ph, j * blocks_per + row / 4), row % 4);
}

__global__ void SketchHashKernel(const float* x, size_t n, uint32_t row, uint32_t rows, uint32_t cols, DevPhilox ph,
                                 uint32_t* keys, uint32_t* vals) {
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t j = size_t{blockIdx.x} * blockDim.x + threadIdx.x; j < n; j += stride) {
    const uint32_t u = SketchDraw(ph, j, row, rows);
    keys[j] = Bucket(u, cols);
    vals[j] = __float_as_uint(Signed(u, x[j]));
  }
}

__device__ inline size_t LowerBound(const uint32_t* a, size_t n, uint32_t v) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Counter b of this row: its values in element order (the sort is stable),
// summed from 0.0f as the CPU's `s[bucket] += v` does.
__global__ void SketchSumKernel(const uint32_t* keys, const uint32_t* vals, size_t n, uint32_t row, uint32_t cols,
                                uint8_t* counters, DeviceState* st) {
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  uint32_t max_bits = 0;
  for (size_t b = size_t{blockIdx.x} * blockDim.x + threadIdx.x; b < cols; b += stride) {
    const size_t lo = LowerBound(keys, n, static_cast<uint32_t>(b));
    const size_t hi = LowerBound(keys, n, static_cast<uint32_t>(b) + 1);
    float acc = 0.0f;
    for (size_t q = lo; q < hi; ++q) acc = __fadd_rn(acc, __uint_as_float(vals[q]));
    const uint32_t bits = __float_as_uint(acc);
    reinterpret_cast<uint32_t*>(counters)[size_t{row} * cols + b] = bits;
    max_bits = max(max_bits, bits & 0x7fffffffu);
  }
  max_bits = __reduce_max_sync(0xffffffffu, max_bits);
  if ((threadIdx.x & 31) == 0 && max_bits != 0) atomicMax(&st->max_bits, max_bits);
}

__global__ void SketchFinishKernel(DeviceState* st) {
  if (st->max_bits >= 0x7f800000u) {
    SetError(st, kErrSketchOverflow);
    st->encoded_bytes = 0;
  }
}

__global__ void SketchValidateKernel(const uint8_t* in, unsigned long long in_bytes_host,
                                     const unsigned long long* in_bytes_dev, unsigned long long n, uint32_t rows,
                                     uint32_t cols, uint32_t keep, DeviceState* st) {
  if (st->error != 0) return;
  const unsigned long long in_bytes = in_bytes_dev != nullptr ? *in_bytes_dev : in_bytes_host;
  DevHeader h{};
  uint32_t e = ParseHeaderDev(in, in_bytes, CodecId::kCountSketch, n, &h);
  if (e == kGpuOk && h.param_bytes != kParamSketch) e = kErrBadParams;
  const uint8_t* p = in + WireHeader::kBytes;
  if (e == kGpuOk) {
    const uint32_t r = h.param_word, c = LoadLe32Dev(p + 20), k = LoadLe32Dev(p + 24);
    if (r < 1 || r > 64 || c < 1 || c > (1u << 26) || k < 1) {
      e = kErrBadParams;
    } else if (h.payload_bytes != 4ull * r * c) {
      e = kErrBadPayload;
    } else if (r != rows || c != cols || k != keep) {
      e = kErrParamMismatch;
    }
  }
  if (e != kGpuOk) {
    SetError(st, e);
    return;
  }
  const DevPhilox ph = MakePhilox(LoadLe64Dev(p), LoadLe64Dev(p + 8), LoadLe32Dev(p + 16), 0, 5);
  st->key0 = ph.key0;
  st->key1 = ph.key1;
  st->hi0 = ph.hi0;
  st->hi1 = ph.hi1;
}

__global__ void SketchCountersKernel(const uint8_t* counters, size_t count, DeviceState* st) {
  if (st->error != 0) return;
  bool bad = false;
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t i = size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += stride)
    bad |= (reinterpret_cast<const uint32_t*>(counters)[i] & 0x7fffffffu) >= 0x7f800000u;
  if (bad) SetError(st, kErrBadPayload);
}

// Median estimate of every element (insertion sort of the r row estimates).
__global__ void SketchEstimateKernel(const uint8_t* counters, size_t n, uint32_t rows, uint32_t cols, float* est,
                                     const DeviceState* st) {
  if (st->error != 0) return;
  const DevPhilox ph{st->key0, st->key1, st->hi0, st->hi1};
  const float* s = reinterpret_cast<const float*>(counters);
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  for (size_t j = size_t{blockIdx.x} * blockDim.x + threadIdx.x; j < n; j += stride) {
    float vals[64];
    for (uint32_t row = 0; row < rows; ++row) {
      const uint32_t u = SketchDraw(ph, j, row, rows);
      const float v = Signed(u, s[size_t{row} * cols + Bucket(u, cols)]);
      uint32_t b = row;
      for (; b > 0 && vals[b - 1] > v; --b) vals[b] = vals[b - 1];
      vals[b] = v;
    }
    est[j] = rows % 2 == 1 ? vals[rows / 2] : __fmul_rn(__fadd_rn(vals[rows / 2 - 1], vals[rows / 2]), 0.5f);
  }
}

}  // namespace

// ---- entry points ---------------------------------------------------------------------------

size_t SparseScratchBytes(const GpuCodec::Config& c, size_t n) { return Carve(c, n, nullptr, 0).total; }

Status SparseCompress(const GpuCodec::Config& c, const float* x, size_t n, uint8_t* out, const CodecContext& ctx,
                      GpuCodecWorkspace::Impl& ws, cudaStream_t stream) {
  const Scratch s = Carve(c, n, ws.d_scratch, ws.scratch_bytes);
  DeviceState* st = ws.d_state;
  switch (c.id) {
    case CodecId::kTopk:
    case CodecId::kTopkSampled: {
      const size_t k = KFor(c.v, n);
      int exact_gate = kAlways;
      if (c.id == CodecId::kTopkSampled && n >= kMinSampled) {
        SampledParams p{};
        p.n = n;
        p.k = k;
        p.m = std::max<size_t>(1024, n / 100);
        p.stride = n / p.m;
        const CountRange range = SampledRange(k, n);
        p.lo = range.lo;
        p.hi = range.hi;
        p.per_sample = static_cast<double>(n) / static_cast<double>(p.m);
        const DevPhilox ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, 4);
        SampleKernel<<<BlocksFor(p.m, kThreads), kThreads, 0, stream>>>(x, p, ph, s.keys_in);
        size_t temp = s.cub_bytes;
        ZW_CUDA_RETURN(cub::DeviceRadixSort::SortKeysDescending(s.cub_temp, temp, s.keys_in, s.keys_out,
                                                                static_cast<int>(p.m), 0, 32, stream),
                       "sample sort");
        SampledInitKernel<<<1, 1, 0, stream>>>(p, st);
        const unsigned grid = std::min(BlocksFor(n, kThreads * 16), 2048u);
        for (int attempt = 0; attempt < 6; ++attempt) {
          CountAtLeastKernel<<<grid, kThreads, 0, stream>>>(x, n, s.keys_out, st);
          SampledDecideKernel<<<1, 1, 0, stream>>>(p, s.keys_out, st);
        }
        ZW_CUDA_LAUNCHED("topk_sampled threshold");
        ZW_RETURN_IF_ERROR(Compact(FloatSource{x}, AtLeastPred{}, n, nullptr, s.idx, nullptr, &st->m, kIfSampled, s,
                                   st, stream));
        exact_gate = kIfNotSampled;
      }
      ZW_RETURN_IF_ERROR(SelectTopk(FloatSource{x}, n, k, &st->m, exact_gate, s, st, stream));
      return WriteSparse(c.id, c.v, x, n, MaxEntries(c, n), out, s, st, stream);
    }
    case CodecId::kRandomk: {
      const size_t k = KFor(c.v, n);
      uint8_t params[kParamRandomk];
      const auto put64 = [&](size_t at, uint64_t v) {
        for (int i = 0; i < 8; ++i) params[at + i] = static_cast<uint8_t>(v >> (8 * i));
      };
      uint64_t vbits;
      std::memcpy(&vbits, &c.v, 8);
      put64(0, vbits);
      put64(8, ctx.seed);
      put64(16, ctx.tensor_id);
      for (int i = 0; i < 4; ++i) params[24 + i] = static_cast<uint8_t>(ctx.chunk_index >> (8 * i));
      put64(28, ctx.step);
      const uint32_t flags = c.scaled ? 1u : 0u;
      for (int i = 0; i < 4; ++i) params[36 + i] = static_cast<uint8_t>(flags >> (8 * i));
      WireHeader h;
      h.codec = CodecId::kRandomk;
      h.param_bytes = kParamRandomk;
      h.elements = n;
      h.payload_bytes = 4 * k;
      h.param_word = static_cast<uint32_t>(k);
      uint8_t head[WireHeader::kBytes + kParamRandomk];
      EncodeHeader(h, std::span<uint8_t, WireHeader::kBytes>(head, WireHeader::kBytes));
      std::memcpy(head + WireHeader::kBytes, params, kParamRandomk);
      ZW_RETURN_IF_ERROR(WriteBlob(head, sizeof(head), WireHeader::kBytes + kParamRandomk + 4 * k, out, st, stream));
      if (k > 0) {
        const DevPhilox ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, ctx.step, 3);
        ZW_RETURN_IF_ERROR(RandomkIndices(n, k, ph, false, s, st, stream));
        const float f = c.scaled ? static_cast<float>(static_cast<double>(n) / static_cast<double>(k)) : 1.0f;
        RandomkValuesKernel<<<std::min(BlocksFor(k, kThreads), 4096u), kThreads, 0, stream>>>(
            x, s.idx, k, f, out + WireHeader::kBytes + kParamRandomk, st);
        ZW_CUDA_LAUNCHED("randomk values");
      }
      return Status::Ok();
    }
    case CodecId::kCountSketch: {
      const size_t counters = size_t{c.rows} * c.cols;
      const DevPhilox ph = MakePhilox(ctx.seed, ctx.tensor_id, ctx.chunk_index, 0, 5);
      uint8_t* dst = out + WireHeader::kBytes + kParamSketch;
      const unsigned grid = std::min(BlocksFor(n, kThreads), 65535u);
      const int bits = static_cast<int>(BitsFor(c.cols - 1));
      for (uint32_t row = 0; row < c.rows; ++row) {
        if (n > 0) {
          SketchHashKernel<<<grid, kThreads, 0, stream>>>(x, n, row, c.rows, c.cols, ph, s.keys_in, s.vals_in);
          size_t temp = s.cub_bytes;
          ZW_CUDA_RETURN(cub::DeviceRadixSort::SortPairs(s.cub_temp, temp, s.keys_in, s.keys_out, s.vals_in,
                                                         s.vals_out, static_cast<int>(n), 0, bits, stream),
                         "countsketch sort");
        }
        SketchSumKernel<<<std::min(BlocksFor(c.cols, kThreads), 65535u), kThreads, 0, stream>>>(
            s.keys_out, s.vals_out, n, row, c.cols, dst, st);
        ZW_CUDA_LAUNCHED("countsketch row");
      }
      uint8_t head[WireHeader::kBytes + kParamSketch];
      WireHeader h;
      h.codec = CodecId::kCountSketch;
      h.param_bytes = kParamSketch;
      h.elements = n;
      h.payload_bytes = 4 * counters;
      h.param_word = c.rows;
      EncodeHeader(h, std::span<uint8_t, WireHeader::kBytes>(head, WireHeader::kBytes));
      uint8_t* p = head + WireHeader::kBytes;
      for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(ctx.seed >> (8 * i));
      for (int i = 0; i < 8; ++i) p[8 + i] = static_cast<uint8_t>(ctx.tensor_id >> (8 * i));
      for (int i = 0; i < 4; ++i) p[16 + i] = static_cast<uint8_t>(ctx.chunk_index >> (8 * i));
      for (int i = 0; i < 4; ++i) p[20 + i] = static_cast<uint8_t>(c.cols >> (8 * i));
      for (int i = 0; i < 4; ++i) p[24 + i] = static_cast<uint8_t>(c.keep >> (8 * i));
      ZW_RETURN_IF_ERROR(WriteBlob(head, sizeof(head), WireHeader::kBytes + kParamSketch + 4 * counters, out, st,
                                   stream));
      SketchFinishKernel<<<1, 1, 0, stream>>>(st);
      ZW_CUDA_LAUNCHED("countsketch finish");
      return Status::Ok();
    }
    default:
      return Internal("SparseCompress: not a sparse codec");
  }
}

Status SparseDecode(const GpuCodec::Config& c, const uint8_t* in, size_t in_bytes,
                    const unsigned long long* d_in_bytes, float* out, size_t n, bool accumulate, float alpha,
                    GpuCodecWorkspace::Impl& ws, cudaStream_t stream) {
  const Scratch s = Carve(c, n, ws.d_scratch, ws.scratch_bytes);
  DeviceState* st = ws.d_state;
  switch (c.id) {
    case CodecId::kTopk:
    case CodecId::kTopkSampled:
      return TopkDecode(c, in, in_bytes, d_in_bytes, out, n, accumulate, alpha, s, st, stream);
    case CodecId::kRandomk: {
      const size_t k = KFor(c.v, n);
      RandomkValidateKernel<<<1, 1, 0, stream>>>(in, in_bytes, d_in_bytes, n, k, st);
      ZW_CUDA_LAUNCHED("randomk validate");
      if (k > 0) ZW_RETURN_IF_ERROR(RandomkIndices(n, k, DevPhilox{}, true, s, st, stream));
      if (!accumulate) ZeroKernel<<<std::min(BlocksFor(n, kThreads), 65535u), kThreads, 0, stream>>>(out, n, st);
      if (k > 0) {
        ScatterKernel<<<std::min(BlocksFor(k, kThreads), 4096u), kThreads, 0, stream>>>(
            s.idx, in + WireHeader::kBytes + kParamRandomk, nullptr, nullptr, k, out, accumulate, alpha, st);
      }
      ZW_CUDA_LAUNCHED("randomk decode");
      return Status::Ok();
    }
    case CodecId::kCountSketch: {
      SketchValidateKernel<<<1, 1, 0, stream>>>(in, in_bytes, d_in_bytes, n, c.rows, c.cols, c.keep, st);
      const uint8_t* counters = in + WireHeader::kBytes + kParamSketch;
      const size_t count = size_t{c.rows} * c.cols;
      SketchCountersKernel<<<std::min(BlocksFor(count, kThreads), 4096u), kThreads, 0, stream>>>(counters, count, st);
      SketchEstimateKernel<<<std::min(BlocksFor(n, kThreads), 65535u), kThreads, 0, stream>>>(counters, n, c.rows,
                                                                                               c.cols, s.est, st);
      ZW_CUDA_LAUNCHED("countsketch estimate");
      const size_t k = std::min<size_t>(c.keep, n);
      ZW_RETURN_IF_ERROR(SelectTopk(FloatSource{s.est}, n, k, &st->m, kAlways, s, st, stream));
      if (!accumulate) ZeroKernel<<<std::min(BlocksFor(n, kThreads), 65535u), kThreads, 0, stream>>>(out, n, st);
      if (k > 0) {
        ScatterKernel<<<std::min(BlocksFor(k, kThreads), 4096u), kThreads, 0, stream>>>(
            s.idx, nullptr, s.est, nullptr, k, out, accumulate, alpha, st);
      }
      ZW_CUDA_LAUNCHED("countsketch decode");
      return Status::Ok();
    }
    default:
      return Internal("SparseDecode: not a sparse codec");
  }
}

}  // namespace zipwire::kernels::cuda

namespace zipwire::kernels::cuda::testing {
std::vector<uint32_t> RandomkIndices(uint64_t seed, uint64_t tensor, uint32_t chunk, uint64_t step, size_t n,
                                     size_t k) {
  // The kernels' steps, run on the host: draws, a stable sort of (t, step),
  // the duplicate flags, FloydChoice, ascending order.
  const DevPhilox ph = MakePhilox(seed, tensor, chunk, step, 3);
  std::vector<uint32_t> t(k), order(k), dup(k), chosen(k);
  for (size_t i = 0; i < k; ++i) {
    const uint64_t u = PhiloxU32(ph, i);
    t[i] = static_cast<uint32_t>((u * (n - k + i + 1)) >> 32);
    order[i] = static_cast<uint32_t>(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return t[a] < t[b]; });
  for (size_t q = 0; q < k; ++q) dup[order[q]] = q > 0 && t[order[q]] == t[order[q - 1]] ? 1u : 0u;
  for (size_t i = 0; i < k; ++i) chosen[i] = FloydChoice(i, t.data(), dup.data(), n, k);
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}
}  // namespace zipwire::kernels::cuda::testing
