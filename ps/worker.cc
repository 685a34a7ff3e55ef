#include "ps/worker.h"

#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "kernels/codec.h"
#include "kernels/error_feedback.h"
#include "offload/aligned_buffer.h"
#include "offload/chunk_header.h"
#include "offload/chunking.h"
#include "offload/registered_buffer.h"
#include "offload/worker_pipeline.h"
#include "ps/protocol.h"
#include "transport/backend.h"

namespace zipwire::ps {

namespace {

using transport::PeerId;

class WorkerImpl final : public Worker {
 public:
  ~WorkerImpl() override { (void)Shutdown(); }

  Status Init(WorkerOptions options) {
    options_ = options;
    ZW_ASSIGN_OR_RETURN(options_.scheduler, EnvString("SCHEDULER", options.scheduler));
    ZW_ASSIGN_OR_RETURN(options_.transport, EnvString("TRANSPORT", options.transport));
    ZW_ASSIGN_OR_RETURN(options_.worker_id, EnvIndex("WORKER_ID", options.worker_id));
    ZW_ASSIGN_OR_RETURN(partition_bytes_, offload::PartitionBytesFromEnv());
    offload::PipelineOptions pipe;
    ZW_ASSIGN_OR_RETURN(uint64_t window, EnvUint("INFLIGHT_CHUNKS", pipe.window_chunks));
    ZW_ASSIGN_OR_RETURN(uint64_t threads, EnvUint("WORKER_THREADS", pipe.compute_threads));
    if (window == 0 || threads == 0 || threads > 256) {
      return InvalidArgument("ZIPWIRE_INFLIGHT_CHUNKS and ZIPWIRE_WORKER_THREADS must be in 1..256");
    }
    pipe.window_chunks = window;
    pipe.compute_threads = threads;

    transport::BackendOptions bo;
    bo.listen_host = options_.host;
    ZW_ASSIGN_OR_RETURN(backend_, transport::CreateBackend(options_.transport, bo));
    ZW_ASSIGN_OR_RETURN(std::string address, backend_->Listen());
    ZW_ASSIGN_OR_RETURN(
        boot_, transport::BootstrapClient::Join(options_.scheduler, transport::Role::kWorker, address,
                                                options_.timeout, options_.worker_id));
    const transport::ClusterView& view = boot_->view();
    backend_->SetLocalRank(view.self_rank);
    for (const auto& server : view.WithRole(transport::Role::kServer)) {
      ZW_RETURN_IF_ERROR(backend_->Connect(server.rank, server.address)
                             .WithContext("connecting to server " + std::to_string(server.role_rank)));
      servers_.push_back(server.rank);
    }
    if (servers_.empty()) return FailedPrecondition("the cluster has no servers");
    pipeline_ = std::make_unique<offload::WorkerPipeline>(backend_.get(), pipe);
    pipeline_->SetControlHandler([this](PeerId peer, std::vector<uint8_t> bytes) { OnControl(peer, bytes); });
    pipeline_->SetPeerErrorHandler([this](PeerId peer, const Status& status) {
      std::lock_guard<std::mutex> lock(mu_);
      // Servers close their connections once every worker said goodbye.
      // A server closes once every worker said goodbye; the BYE_ACK it sent
      // first arrives before the close, so an acknowledged server is done.
      if (leaving_ && acked_servers_.count(peer)) return;
      ZW_LOG(kError, "server rank " << peer << " failed: " << status.ToString());
      if (broken_.ok()) broken_ = status;
      cv_.notify_all();
    });
    pipeline_->Start();
    return Status::Ok();
  }

  const transport::ClusterView& cluster() const override { return boot_->view(); }
  uint32_t rank() const override { return boot_->view().self_rank; }

  Status Declare(uint64_t tensor_id, size_t elements, const TensorOptions& options) override {
    // Declarations hand out handles and slots in order: one at a time.
    std::lock_guard<std::mutex> declaring(declare_mu_);
    if (tensor_id > UINT32_MAX) return InvalidArgument("tensor ids must fit in 32 bits");
    ZW_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> codec_owned, kernels::CreateCodec(options.codec));
    std::shared_ptr<const kernels::Codec> codec(std::move(codec_owned));
    ZW_ASSIGN_OR_RETURN(std::vector<offload::Chunk> chunks, offload::PlanChunks(elements, partition_bytes_));
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (declared_.count(tensor_id)) {
        return Status(StatusCode::kAlreadyExists,
                      "tensor " + std::to_string(tensor_id) + " already declared");
      }
    }

    // Slots: one per chunk for the push (compressed here, written from here)
    // and one per chunk for the aggregate the server writes back.
    offload::TensorRoute route;
    route.id = tensor_id;
    route.elements = elements;
    route.codec = codec;
    if (options.worker_error_feedback) route.error_feedback = std::make_shared<kernels::ErrorFeedback>(codec);
    uint64_t total = 0;
    std::vector<uint64_t> offsets, sizes;
    for (const auto& c : chunks) {
      uint64_t bytes =
          offload::AlignUp(offload::ChunkHeader::kBytes + codec->MaxCompressedBytes(c.count), 64);
      offsets.push_back(total);
      sizes.push_back(bytes);
      total += bytes;
      if (route.error_feedback)
        ZW_RETURN_IF_ERROR(route.error_feedback->Reserve({tensor_id, c.index}, c.count));
    }
    TensorBuffers buffers{offload::AlignedBuffer(total), offload::RegisteredBuffer()};
    if (!buffers.send) return Status(StatusCode::kResourceExhausted, "out of memory for slots");
    ZW_ASSIGN_OR_RETURN(route.send_region,
                        backend_->RegisterMemory(buffers.send.data(), total, transport::MemoryKind::kHost));
    // Servers write the aggregates here (backend memory where offered).
    ZW_ASSIGN_OR_RETURN(buffers.recv, offload::RegisteredBuffer::Create(backend_.get(), total));
    route.recv_region = buffers.recv.region();

    std::map<PeerId, DeclareMessage> per_server;
    route.chunks.resize(chunks.size());
    for (size_t i = 0; i < chunks.size(); ++i) {
      offload::ChunkRoute& cr = route.chunks[i];
      cr.chunk_index = chunks[i].index;
      cr.offset = chunks[i].offset;
      cr.count = chunks[i].count;
      cr.local_handle = next_handle_++;
      cr.server = servers_[offload::ServerForChunk(tensor_id, cr.chunk_index,
                                                   static_cast<uint32_t>(servers_.size()))];
      cr.send_offset = offsets[i];
      cr.recv_offset = offsets[i];
      cr.slot_bytes = sizes[i];
      DeclareMessage& m = per_server[cr.server];
      m.tensor_id = tensor_id;
      m.elements = elements;
      m.partition_bytes = partition_bytes_;
      m.codec = codec->name();
      m.flags = options.server_error_feedback ? kFlagServerErrorFeedback : 0;
      m.worker_recv = transport::ToRemote(route.recv_region);
      m.chunks.push_back(DeclareChunk{cr.chunk_index, cr.local_handle, cr.recv_offset, cr.slot_bytes});
    }

    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [server, m] : per_server) pending_acks_[{tensor_id, server}] = std::nullopt;
    }
    for (auto& [server, m] : per_server) {
      std::vector<uint8_t> bytes = Encode(m);
      ZW_RETURN_IF_ERROR(
          pipeline_->SendControl(server, bytes).WithContext("declaring tensor " + std::to_string(tensor_id)));
    }
    // Wait for every owning server to allocate our slots.
    std::unique_lock<std::mutex> lock(mu_);
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    for (auto& [server, m] : per_server) {
      auto key = std::make_pair(tensor_id, server);
      if (!cv_.wait_until(lock, deadline, [&] { return pending_acks_[key].has_value() || !broken_.ok(); })) {
        return Timeout("server rank " + std::to_string(server) +
                       " did not answer the declaration of tensor " + std::to_string(tensor_id));
      }
      if (!broken_.ok()) return broken_;
      DeclareAckMessage ack = std::move(*pending_acks_[key]);
      pending_acks_.erase(key);
      if (ack.code != StatusCode::kOk) {
        return Status(ack.code, "server rank " + std::to_string(server) + " refused tensor " +
                                    std::to_string(tensor_id) + ": " + ack.message);
      }
      if (ack.chunks.size() != m.chunks.size()) return Corrupt("DECLARE_ACK has the wrong number of chunks");
      for (size_t k = 0; k < ack.chunks.size(); ++k) {
        const AckChunk& a = ack.chunks[k];
        if (a.chunk_index >= route.chunks.size() || a.chunk_index != m.chunks[k].chunk_index) {
          return Corrupt("DECLARE_ACK names chunk " + std::to_string(a.chunk_index) + " out of order");
        }
        offload::ChunkRoute& cr = route.chunks[a.chunk_index];
        if (a.slot_bytes < cr.slot_bytes) return Corrupt("server slot is smaller than the chunk's bound");
        cr.server_region = ack.server_slots;
        cr.server_offset = a.slot_offset;
        cr.server_handle = a.server_handle;
      }
    }
    declared_.emplace(tensor_id, DeclaredTensor{elements, std::move(buffers)});
    lock.unlock();
    return pipeline_->AddTensor(std::move(route));
  }

  std::future<Status> PushPull(uint64_t tensor_id, std::span<const float> in, std::span<float> out) override {
    if (out.empty() && !in.empty()) return Fail(InvalidArgument("push_pull needs an output span"));
    std::future<Status> pull;
    std::future<Status> push = pipeline_->Push(tensor_id, in, out, &pull);
    CountDense(in.size());
    (void)push;  // the pull future completes after the push
    return pull;
  }

  std::future<Status> Push(uint64_t tensor_id, std::span<const float> in) override {
    CountDense(in.size());
    return pipeline_->Push(tensor_id, in, {}, nullptr);
  }

  std::future<Status> Pull(uint64_t tensor_id, std::span<float> out) override {
    return pipeline_->Pull(tensor_id, out);
  }

  WorkerStats stats() const override {
    WorkerStats s;
    s.bytes_sent = pipeline_->wire_bytes_sent();
    s.bytes_received = pipeline_->wire_bytes_received();
    s.dense_bytes = dense_bytes_.load(std::memory_order_relaxed);
    return s;
  }

  const offload::TimingLog& timings() const override { return pipeline_->timings(); }

  Status Shutdown() override {
    if (shut_down_) return Status::Ok();
    shut_down_ = true;
    Status result;
    if (pipeline_) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        byes_pending_ = servers_.size();
        leaving_ = true;
      }
      std::vector<uint8_t> bye = EncodeBye(MessageType::kBye);
      for (PeerId s : servers_) {
        Status st = pipeline_->SendControl(s, bye);
        if (!st.ok() && result.ok()) result = st;
      }
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, options_.timeout, [&] { return byes_pending_ == 0 || !broken_.ok(); });
      if (byes_pending_ != 0 && result.ok()) result = Timeout("servers did not acknowledge shutdown");
      lock.unlock();
      pipeline_->Stop();
    }
    if (boot_) boot_->Leave();
    if (backend_) backend_->Close();
    return result;
  }

 private:
  struct TensorBuffers {
    offload::AlignedBuffer send;
    offload::RegisteredBuffer recv;
  };
  struct DeclaredTensor {
    size_t elements;
    TensorBuffers buffers;
  };

  static std::future<Status> Fail(Status s) {
    std::promise<Status> p;
    p.set_value(std::move(s));
    return p.get_future();
  }
  void CountDense(size_t elements) {
    dense_bytes_.fetch_add(elements * sizeof(float), std::memory_order_relaxed);
  }

  void OnControl(PeerId peer, const std::vector<uint8_t>& bytes) {
    Result<MessageType> type = PeekType(bytes);
    if (!type.ok()) {
      ZW_LOG(kWarn, "control message from peer " << peer << " dropped: " << type.status().ToString());
      return;
    }
    if (*type == MessageType::kByeAck) {
      std::lock_guard<std::mutex> lock(mu_);
      if (acked_servers_.insert(peer).second && byes_pending_ > 0) --byes_pending_;
      cv_.notify_all();
      return;
    }
    if (*type != MessageType::kDeclareAck) {
      ZW_LOG(kWarn, "unexpected control message type " << static_cast<int>(*type) << " from peer " << peer);
      return;
    }
    Result<DeclareAckMessage> ack = DecodeDeclareAck(bytes);
    if (!ack.ok()) {
      ZW_LOG(kWarn, "DECLARE_ACK from peer " << peer << " dropped: " << ack.status().ToString());
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_acks_.find({ack->tensor_id, peer});
    if (it == pending_acks_.end()) {
      ZW_LOG(kWarn, "unsolicited DECLARE_ACK for tensor " << ack->tensor_id << " from peer " << peer);
      return;
    }
    it->second = std::move(ack).value();
    cv_.notify_all();
  }

  WorkerOptions options_;
  uint64_t partition_bytes_ = offload::kDefaultPartitionBytes;
  std::unique_ptr<transport::Backend> backend_;
  std::unique_ptr<transport::BootstrapClient> boot_;
  std::unique_ptr<offload::WorkerPipeline> pipeline_;
  std::vector<PeerId> servers_;
  uint32_t next_handle_ = 0;
  std::atomic<uint64_t> dense_bytes_{0};
  bool shut_down_ = false;

  std::mutex declare_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<uint64_t, PeerId>, std::optional<DeclareAckMessage>> pending_acks_;
  std::map<uint64_t, DeclaredTensor> declared_;
  size_t byes_pending_ = 0;
  bool leaving_ = false;
  std::set<PeerId> acked_servers_;
  Status broken_;
};

}  // namespace

Result<std::unique_ptr<Worker>> Worker::Create(WorkerOptions options) {
  auto worker = std::make_unique<WorkerImpl>();
  ZW_RETURN_IF_ERROR(worker->Init(std::move(options)));
  return std::unique_ptr<Worker>(std::move(worker));
}

}  // namespace zipwire::ps
