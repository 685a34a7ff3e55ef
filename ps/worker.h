// The worker role: the user-facing push/pull API of zipwire.
//
//   auto worker = Worker::Create({.scheduler = "127.0.0.1:9000"});
//   worker->Declare(0, n, {.codec = "onebit"});
//   std::future<Status> f = worker->PushPull(0, grad, out);
//
// Every worker declares the same tensors (collectively, like BytePS). A
// round on a tensor is one push followed by one pull; the aggregate a pull
// returns is the mean over all workers of that round's pushes, never
// missing one.
#pragma once

#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "core/status.h"
#include "offload/timings.h"
#include "transport/bootstrap.h"

namespace zipwire::ps {

struct WorkerOptions {
  std::string scheduler = "127.0.0.1:9000";  // ZIPWIRE_SCHEDULER
  std::string transport = "tcp";             // ZIPWIRE_TRANSPORT
  std::string host = "127.0.0.1";            // address to listen on for the data path
  std::chrono::milliseconds timeout{30000};  // bootstrap and declaration waits
  std::optional<uint32_t> worker_id;         // ZIPWIRE_WORKER_ID: fixed rank; else registration order
};

struct TensorOptions {
  std::string codec = "onebit";  // kernels::CodecSpec text
  bool worker_error_feedback = true;
  bool server_error_feedback = true;
};

struct WorkerStats {
  uint64_t bytes_sent = 0;      // compressed push bytes this worker put on the wire
  uint64_t bytes_received = 0;  // compressed aggregate bytes the servers wrote back
  uint64_t dense_bytes = 0;     // fp32 bytes of the same pushes (one direction)
};

class Worker {
 public:
  // Applies ZIPWIRE_* overrides (SCHEDULER, TRANSPORT, INFLIGHT_CHUNKS,
  // WORKER_THREADS, PARTITION_BYTES) on top of `options`.
  static Result<std::unique_ptr<Worker>> Create(WorkerOptions options);
  virtual ~Worker() = default;

  virtual const transport::ClusterView& cluster() const = 0;
  virtual uint32_t rank() const = 0;  // 0 .. num_workers-1

  virtual Status Declare(uint64_t tensor_id, size_t elements, const TensorOptions& options) = 0;

  // push and pull in one round; `in` and `out` may alias.
  virtual std::future<Status> PushPull(uint64_t tensor_id, std::span<const float> in,
                                       std::span<float> out) = 0;
  virtual std::future<Status> Push(uint64_t tensor_id, std::span<const float> in) = 0;
  virtual std::future<Status> Pull(uint64_t tensor_id, std::span<float> out) = 0;

  virtual WorkerStats stats() const = 0;
  virtual const offload::TimingLog& timings() const = 0;

  // Tells every server this worker is done and leaves the cluster.
  virtual Status Shutdown() = 0;
};

}  // namespace zipwire::ps
