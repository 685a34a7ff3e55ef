// The worker side of the chunked pipeline:
//   compress (pool) → write into the server's slot (transport) → [server]
//   → aggregate lands in our slot → decompress into the output (pool)
// with a bounded in-flight window: at most `window` chunks are between
// admission and the return of their aggregate, so compressing chunk i+1
// overlaps sending chunk i without an unbounded queue. Each tensor has at
// most one round in flight, which bounds the admission queue by the number of
// declared chunks.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "core/status.h"
#include "kernels/codec.h"
#include "kernels/error_feedback.h"
#include "offload/thread_pool.h"
#include "offload/timings.h"
#include "transport/backend.h"

namespace zipwire::offload {

struct ChunkRoute {
  uint32_t chunk_index = 0;
  size_t offset = 0;  // elements
  size_t count = 0;
  uint32_t local_handle = 0;  // imm the server uses when it writes the aggregate back
  transport::PeerId server = transport::kInvalidPeer;
  transport::RemoteRegion server_region;  // the server's registration holding our slot
  uint64_t server_offset = 0;             // our slot's offset in it
  uint32_t server_handle = 0;             // imm for our push
  uint64_t send_offset = 0;               // in TensorRoute::send_region
  uint64_t recv_offset = 0;               // in TensorRoute::recv_region
  uint64_t slot_bytes = 0;                // capacity of each of the two slots
};

struct TensorRoute {
  uint64_t id = 0;
  size_t elements = 0;
  std::shared_ptr<const kernels::Codec> codec;
  std::shared_ptr<kernels::ErrorFeedback> error_feedback;  // null: no worker-side EF
  transport::MemoryRegion send_region;
  transport::MemoryRegion recv_region;
  std::vector<ChunkRoute> chunks;
};

struct PipelineOptions {
  size_t window_chunks = 8;    // ZIPWIRE_INFLIGHT_CHUNKS
  size_t compute_threads = 1;  // ZIPWIRE_WORKER_THREADS
  uint64_t seed = 0;           // codec randomness
};

class WorkerPipeline {
 public:
  using ControlHandler = std::function<void(transport::PeerId, std::vector<uint8_t>)>;
  using PeerErrorHandler = std::function<void(transport::PeerId, const Status&)>;

  WorkerPipeline(transport::Backend* backend, PipelineOptions options);
  ~WorkerPipeline();

  // Control messages and peer failures are handed to the owner (ps layer)
  // from the progress thread. Set before Start.
  void SetControlHandler(ControlHandler handler) { control_handler_ = std::move(handler); }
  void SetPeerErrorHandler(PeerErrorHandler handler) { peer_error_handler_ = std::move(handler); }

  void Start();  // starts the progress thread
  void Stop();   // fails open rounds with kCancelled and joins

  Status AddTensor(TensorRoute route);

  // Starts a round: every chunk is compressed and pushed. The future
  // completes when all chunks were accepted by their servers. `input` must
  // stay valid until then; `output` (may be empty) until the pull future.
  std::future<Status> Push(uint64_t tensor_id, std::span<const float> input, std::span<float> output,
                           std::future<Status>* pull_future);
  // Decodes the round's aggregate into `output` once it has arrived.
  std::future<Status> Pull(uint64_t tensor_id, std::span<float> output);

  Status SendControl(transport::PeerId peer, std::span<const uint8_t> bytes);

  const TimingLog& timings() const { return timings_; }
  uint64_t wire_bytes_sent() const { return wire_bytes_sent_.load(std::memory_order_relaxed); }
  uint64_t wire_bytes_received() const { return wire_bytes_received_.load(std::memory_order_relaxed); }

 private:
  struct ChunkState {
    bool admitted = false;
    bool acked = false;
    bool arrived = false;
    bool decoding = false;
    uint64_t arrived_bytes = 0;
    uint32_t wire_bytes = 0;
    Clock::time_point t_admit, t_compressed, t_acked, t_arrived;
  };
  struct Round {
    bool active = false;  // pushed and not yet fully pulled
    bool pushed_all = false;
    uint64_t step = 0;  // rounds so far on this tensor
    std::span<const float> input;
    std::span<float> output;
    bool have_output = false;
    size_t acked = 0, decoded = 0;
    Status status;
    std::promise<Status> push_promise, pull_promise;
    bool push_set = false, pull_set = false, pull_requested = false;
    Clock::time_point submitted;
  };
  struct Tensor {
    TensorRoute route;
    std::vector<ChunkState> chunks;
    Round round;
  };
  struct HandleRef {
    uint32_t tensor = 0;  // index into tensors_
    uint32_t chunk = 0;
  };

  void ProgressLoop();
  void Admit(std::unique_lock<std::mutex>& lock);
  void ReleaseSlotLocked();
  void CompressAndSend(uint32_t tensor_index, uint32_t chunk);
  void Decode(uint32_t tensor_index, uint32_t chunk);
  void OnWriteDone(const transport::Completion& c);
  void OnAggregate(const transport::Completion& c);
  void FailRoundLocked(Tensor& t, const Status& status);
  void FailAll(const Status& status);
  void MaybeFinishPullLocked(Tensor& t);
  Tensor* FindTensorLocked(uint64_t id, uint32_t* index);

  transport::Backend* backend_;
  PipelineOptions options_;
  ThreadPool pool_;
  TimingLog timings_;
  ControlHandler control_handler_;
  PeerErrorHandler peer_error_handler_;

  std::mutex mu_;
  std::vector<std::unique_ptr<Tensor>> tensors_;
  std::vector<HandleRef> handles_;  // local_handle → chunk
  std::deque<HandleRef> waiting_;   // chunks waiting for a window slot
  size_t in_flight_ = 0;
  Status broken_;  // set once a peer failed: every later call fails

  std::atomic<bool> running_{false};
  std::thread progress_;
  std::atomic<uint64_t> wire_bytes_sent_{0};
  std::atomic<uint64_t> wire_bytes_received_{0};
  std::atomic<uint64_t> next_send_context_{0};
};

}  // namespace zipwire::offload
