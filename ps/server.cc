#include "ps/server.h"

#include <array>
#include <atomic>
#include <map>
#include <mutex>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "kernels/codec.h"
#include "kernels/error_feedback.h"
#include "offload/aligned_buffer.h"
#include "offload/chunk_header.h"
#include "offload/chunking.h"
#include "offload/registered_buffer.h"
#include "offload/thread_pool.h"
#include "ps/protocol.h"
#include "transport/backend.h"
#include "transport/bootstrap.h"

namespace zipwire::ps {

namespace {

using transport::PeerId;

constexpr uint64_t kSendContextBit = 1ull << 63;
constexpr uint64_t kByeAckContext = kSendContextBit | 1;

// One chunk of one tensor owned by this server.
struct ServerChunk {
  uint64_t tensor_id = 0;
  uint32_t chunk_index = 0;
  uint32_t handle = 0;  // the imm workers push with
  size_t count = 0;
  uint64_t slot_bytes = 0;    // per worker push slot and for the aggregate
  uint64_t slots_offset = 0;  // worker w's slot at slots_offset + w * slot_bytes
  uint64_t out_offset = 0;    // in the tensor's out region
  struct Tensor* tensor = nullptr;

  std::mutex mu;  // serialises accumulation into sum (per chunk, not per element)
  std::vector<float> sum;
  uint32_t step = 0;  // rounds completed
  uint32_t arrived = 0;
  std::vector<uint8_t> arrived_from;  // per worker, this round
  std::vector<uint32_t> worker_handle;
  std::vector<uint64_t> worker_recv_offset;
};

struct Tensor {
  uint64_t id = 0;
  uint64_t elements = 0;
  uint64_t partition_bytes = 0;
  std::string codec_name;
  uint8_t flags = 0;
  std::shared_ptr<const kernels::Codec> codec;
  std::unique_ptr<kernels::ErrorFeedback> error_feedback;
  offload::RegisteredBuffer slots;  // workers write here (backend memory where offered)
  offload::AlignedBuffer out;
  transport::MemoryRegion slots_region, out_region;
  std::vector<ServerChunk*> chunks;                  // by chunk index; null where another server owns it
  std::vector<transport::RemoteRegion> worker_recv;  // per worker
  std::vector<uint8_t> declared_by;
};

class ServerImpl final : public Server {
 public:
  ~ServerImpl() override {
    Stop();
    if (pool_) pool_->Shutdown();
    if (backend_) backend_->Close();
  }

  Status Init(ServerOptions options) {
    options_ = options;
    ZW_ASSIGN_OR_RETURN(options_.scheduler, EnvString("SCHEDULER", options.scheduler));
    ZW_ASSIGN_OR_RETURN(options_.transport, EnvString("TRANSPORT", options.transport));
    ZW_ASSIGN_OR_RETURN(options_.server_id, EnvIndex("SERVER_ID", options.server_id));
    ZW_ASSIGN_OR_RETURN(uint64_t threads, EnvUint("SERVER_THREADS", options.threads));
    if (threads == 0 || threads > 256) return InvalidArgument("ZIPWIRE_SERVER_THREADS must be in 1..256");
    transport::BackendOptions bo;
    bo.listen_host = options_.host;
    ZW_ASSIGN_OR_RETURN(backend_, transport::CreateBackend(options_.transport, bo));
    ZW_ASSIGN_OR_RETURN(std::string address, backend_->Listen());
    ZW_ASSIGN_OR_RETURN(
        boot_, transport::BootstrapClient::Join(options_.scheduler, transport::Role::kServer, address,
                                                options_.timeout, options_.server_id));
    backend_->SetLocalRank(boot_->view().self_rank);
    num_workers_ = boot_->view().num_workers;
    if (num_workers_ == 0) return FailedPrecondition("the cluster has no workers");
    bye_from_.assign(num_workers_, 0);
    pool_ = std::make_unique<offload::ThreadPool>(threads);
    return Status::Ok();
  }

  void Stop() override { stop_.store(true); }

  Status Run() override {
    std::array<transport::Completion, 64> batch;
    Status result;
    while (!stop_.load()) {
      size_t n = backend_->Poll(std::span<transport::Completion>(batch), std::chrono::milliseconds(100));
      for (size_t i = 0; i < n; ++i) {
        transport::Completion& c = batch[i];
        switch (c.type) {
          case transport::CompletionType::kWriteImm:
            OnPush(c);
            break;
          case transport::CompletionType::kRecvMessage:
            OnControl(c.peer, c.message);
            break;
          case transport::CompletionType::kWriteDone:
            if (!c.status.ok())
              Fail(c.status.WithContext("writing an aggregate to worker " + std::to_string(c.peer)));
            break;
          case transport::CompletionType::kSendDone:
            if (c.context == kByeAckContext && --acks_in_flight_ == 0 && byes_ == num_workers_)
              stop_.store(true);
            break;
          case transport::CompletionType::kPeerError:
            if (c.peer < num_workers_ && bye_from_[c.peer]) break;  // left cleanly already
            Fail(c.status.WithContext("worker rank " + std::to_string(c.peer) + " failed"));
            break;
          case transport::CompletionType::kPeerConnected:
          case transport::CompletionType::kReadDone:  // the server posts no reads
            break;
        }
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (!failure_.ok()) {
        result = failure_;
        break;
      }
    }
    pool_->Shutdown();
    if (boot_) boot_->Leave();
    backend_->Close();
    std::lock_guard<std::mutex> lock(mu_);
    return failure_.ok() ? result : failure_;
  }

 private:
  void Fail(const Status& s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failure_.ok()) {
      ZW_LOG(kError, "server: " << s.ToString());
      failure_ = s;
    }
  }

  Status SendControl(PeerId peer, const std::vector<uint8_t>& bytes, uint64_t context = kSendContextBit) {
    return backend_->PostSend(peer, bytes, context);
  }

  void OnControl(PeerId peer, const std::vector<uint8_t>& bytes) {
    Result<MessageType> type = PeekType(bytes);
    if (!type.ok()) {
      ZW_LOG(kWarn, "control message from peer " << peer << " dropped: " << type.status().ToString());
      return;
    }
    if (peer >= num_workers_) {
      ZW_LOG(kWarn, "control message from non-worker peer " << peer << " dropped");
      return;
    }
    if (*type == MessageType::kBye) {
      if (!bye_from_[peer]) {
        bye_from_[peer] = 1;
        ++byes_;
      }
      ++acks_in_flight_;
      Status s = SendControl(peer, EncodeBye(MessageType::kByeAck), kByeAckContext);
      if (!s.ok()) --acks_in_flight_;
      if (byes_ == num_workers_ && acks_in_flight_ == 0) stop_.store(true);
      return;
    }
    if (*type != MessageType::kDeclare) {
      ZW_LOG(kWarn, "unexpected control message type " << static_cast<int>(*type) << " from peer " << peer);
      return;
    }
    Result<DeclareMessage> m = DecodeDeclare(bytes);
    DeclareAckMessage ack;
    if (!m.ok()) {
      ZW_LOG(kWarn, "DECLARE from worker " << peer << " dropped: " << m.status().ToString());
      return;
    }
    ack.tensor_id = m->tensor_id;
    Status s = Declare(peer, *m, &ack);
    if (!s.ok()) {
      ack.code = s.code();
      ack.message = s.message();
      ack.chunks.clear();
    }
    Status sent = SendControl(peer, Encode(ack));
    if (!sent.ok()) ZW_LOG(kWarn, "DECLARE_ACK to worker " << peer << " failed: " << sent.ToString());
  }

  // Creates the tensor's slots on the first declaration and checks later
  // ones against it: every worker must declare the same tensor.
  Status Declare(PeerId worker, const DeclareMessage& m, DeclareAckMessage* ack) {
    ZW_ASSIGN_OR_RETURN(std::vector<offload::Chunk> plan, offload::PlanChunks(m.elements, m.partition_bytes));
    auto it = tensors_.find(m.tensor_id);
    Tensor* t;
    if (it == tensors_.end()) {
      auto owned = std::make_unique<Tensor>();
      t = owned.get();
      t->id = m.tensor_id;
      t->elements = m.elements;
      t->partition_bytes = m.partition_bytes;
      t->codec_name = m.codec;
      t->flags = m.flags;
      ZW_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Codec> codec, kernels::CreateCodec(m.codec));
      t->codec = std::shared_ptr<const kernels::Codec>(std::move(codec));
      if (m.flags & kFlagServerErrorFeedback)
        t->error_feedback = std::make_unique<kernels::ErrorFeedback>(t->codec);
      t->chunks.assign(plan.size(), nullptr);
      t->worker_recv.resize(num_workers_);
      t->declared_by.assign(num_workers_, 0);
      // This server's chunks, in the order the worker listed them.
      uint64_t slots_total = 0, out_total = 0;
      // Chunks join the handle table only once the whole tensor is set up,
      // so a failed declaration leaves no handle pointing at freed state.
      std::vector<std::unique_ptr<ServerChunk>> created;
      for (const DeclareChunk& dc : m.chunks) {
        if (dc.chunk_index >= plan.size() || t->chunks[dc.chunk_index] != nullptr) {
          return InvalidArgument("declaration lists chunk " + std::to_string(dc.chunk_index) +
                                 " twice or out of range");
        }
        auto chunk = std::make_unique<ServerChunk>();
        chunk->tensor_id = t->id;
        chunk->chunk_index = dc.chunk_index;
        chunk->count = plan[dc.chunk_index].count;
        chunk->slot_bytes =
            offload::AlignUp(offload::ChunkHeader::kBytes + t->codec->MaxCompressedBytes(chunk->count), 64);
        chunk->slots_offset = slots_total;
        chunk->out_offset = out_total;
        slots_total += chunk->slot_bytes * num_workers_;
        out_total += chunk->slot_bytes;
        chunk->sum.assign(chunk->count, 0.0f);
        chunk->arrived_from.assign(num_workers_, 0);
        chunk->worker_handle.assign(num_workers_, 0);
        chunk->worker_recv_offset.assign(num_workers_, 0);
        chunk->tensor = t;
        if (t->error_feedback) {
          ZW_RETURN_IF_ERROR(t->error_feedback->Reserve({t->id, chunk->chunk_index}, chunk->count));
        }
        chunk->handle = static_cast<uint32_t>(handles_.size() + created.size());
        t->chunks[dc.chunk_index] = chunk.get();
        created.push_back(std::move(chunk));
      }
      ZW_ASSIGN_OR_RETURN(t->slots, offload::RegisteredBuffer::Create(backend_.get(), slots_total));
      t->slots_region = t->slots.region();
      t->out = offload::AlignedBuffer(out_total);
      if (!t->out) return Status(StatusCode::kResourceExhausted, "out of memory for slots");
      ZW_ASSIGN_OR_RETURN(t->out_region,
                          backend_->RegisterMemory(t->out.data(), out_total, transport::MemoryKind::kHost));
      for (auto& c : created) handles_.push_back(std::move(c));
      tensors_.emplace(m.tensor_id, std::move(owned));
    } else {
      t = it->second.get();
      if (t->elements != m.elements || t->partition_bytes != m.partition_bytes || t->codec_name != m.codec ||
          t->flags != m.flags) {
        return InvalidArgument("worker " + std::to_string(worker) + " declared tensor " +
                               std::to_string(m.tensor_id) + " differently from the first worker (" +
                               std::to_string(m.elements) + " elements, " + m.codec + " vs " +
                               std::to_string(t->elements) + " elements, " + t->codec_name + ")");
      }
    }
    if (t->declared_by[worker]) {
      return Status(StatusCode::kAlreadyExists, "worker " + std::to_string(worker) + " declared tensor " +
                                                    std::to_string(m.tensor_id) + " twice");
    }
    size_t owned_here = 0;
    for (ServerChunk* c : t->chunks) owned_here += c != nullptr;
    if (m.chunks.size() != owned_here) {
      return InvalidArgument("worker " + std::to_string(worker) + " placed tensor " +
                             std::to_string(m.tensor_id) + " chunks differently from the first worker");
    }
    for (const DeclareChunk& dc : m.chunks) {
      if (dc.chunk_index >= t->chunks.size() || t->chunks[dc.chunk_index] == nullptr) {
        return InvalidArgument("worker " + std::to_string(worker) + " lists chunk " +
                               std::to_string(dc.chunk_index) + " that this server does not own");
      }
      ServerChunk* c = t->chunks[dc.chunk_index];
      if (dc.slot_bytes < c->slot_bytes) {
        return InvalidArgument("worker " + std::to_string(worker) + " slot for chunk " +
                               std::to_string(dc.chunk_index) + " is smaller than the aggregate bound");
      }
      c->worker_handle[worker] = dc.worker_handle;
      c->worker_recv_offset[worker] = dc.recv_offset;
      ack->chunks.push_back(
          AckChunk{dc.chunk_index, c->handle, c->slots_offset + worker * c->slot_bytes, c->slot_bytes});
    }
    t->worker_recv[worker] = m.worker_recv;
    t->declared_by[worker] = 1;
    ack->server_slots = transport::ToRemote(t->slots_region);
    return Status::Ok();
  }

  void OnPush(const transport::Completion& c) {
    if (c.imm >= handles_.size() || c.peer >= num_workers_) {
      ZW_LOG(kWarn, "push with unknown handle " << c.imm << " from peer " << c.peer << " dropped");
      return;
    }
    ServerChunk* chunk = handles_[c.imm].get();
    const uint32_t w = c.peer;
    const uint64_t expected_offset = chunk->slots_offset + w * chunk->slot_bytes;
    if (c.key != chunk->tensor->slots_region.key || c.offset != expected_offset ||
        c.length > chunk->slot_bytes) {
      Fail(Corrupt("worker " + std::to_string(w) + " wrote chunk " + std::to_string(chunk->chunk_index) +
                   " of tensor " + std::to_string(chunk->tensor_id) + " outside its slot"));
      return;
    }
    const uint64_t length = c.length;
    pool_->Submit([this, chunk, w, length] { Accumulate(chunk, w, length); });
  }

  // On a pool thread: adds worker w's chunk into the sum; the last arrival
  // of a round compresses the mean once and writes it to every worker.
  void Accumulate(ServerChunk* chunk, uint32_t w, uint64_t length) {
    Tensor* t = chunk->tensor;
    const uint8_t* slot = t->slots.data() + chunk->slots_offset + w * chunk->slot_bytes;
    std::span<const uint8_t> bytes(slot, length);
    std::lock_guard<std::mutex> lock(chunk->mu);
    offload::ChunkHeader expected{chunk->step + 1, static_cast<uint32_t>(t->id), chunk->chunk_index};
    Status s = offload::CheckChunkHeader(bytes, expected);
    if (s.ok() && chunk->arrived_from[w]) s = Corrupt("second push in one round");
    if (s.ok()) {
      // Scaling by 1/n while accumulating forms the mean in one pass.
      s = t->codec->DecompressAccumulate(bytes.subspan(offload::ChunkHeader::kBytes), chunk->sum,
                                         1.0f / static_cast<float>(num_workers_));
    }
    if (!s.ok()) {
      Fail(s.WithContext("push of tensor " + std::to_string(t->id) + " chunk " +
                         std::to_string(chunk->chunk_index) + " from worker " + std::to_string(w)));
      return;
    }
    chunk->arrived_from[w] = 1;
    if (++chunk->arrived < num_workers_) return;

    // Every worker's push for this round is in: compress once, send to all.
    chunk->step += 1;
    uint8_t* out = t->out.data() + chunk->out_offset;
    offload::WriteChunkHeader(
        offload::ChunkHeader{chunk->step, static_cast<uint32_t>(t->id), chunk->chunk_index}, out);
    std::span<uint8_t> payload(out + offload::ChunkHeader::kBytes,
                               chunk->slot_bytes - offload::ChunkHeader::kBytes);
    kernels::CodecContext ctx{options_.seed, t->id, chunk->chunk_index, chunk->step};
    Result<size_t> written =
        t->error_feedback ? t->error_feedback->Compress({t->id, chunk->chunk_index}, chunk->sum, payload, ctx)
                          : t->codec->Compress(chunk->sum, payload, ctx);
    if (!written.ok()) {
      Fail(written.status().WithContext("compressing the aggregate of tensor " + std::to_string(t->id)));
      return;
    }
    std::fill(chunk->sum.begin(), chunk->sum.end(), 0.0f);
    std::fill(chunk->arrived_from.begin(), chunk->arrived_from.end(), 0);
    chunk->arrived = 0;
    const uint64_t bytes_out = offload::ChunkHeader::kBytes + written.value();
    for (uint32_t k = 0; k < num_workers_; ++k) {
      Status ws = backend_->PostWrite(k, t->out_region, chunk->out_offset, t->worker_recv[k],
                                      chunk->worker_recv_offset[k], bytes_out, chunk->worker_handle[k], 0);
      if (!ws.ok()) Fail(ws.WithContext("sending the aggregate to worker " + std::to_string(k)));
    }
  }

  ServerOptions options_;
  std::unique_ptr<transport::Backend> backend_;
  std::unique_ptr<transport::BootstrapClient> boot_;
  std::unique_ptr<offload::ThreadPool> pool_;
  uint32_t num_workers_ = 0;
  std::map<uint64_t, std::unique_ptr<Tensor>> tensors_;
  std::vector<std::unique_ptr<ServerChunk>> handles_;  // server handle → chunk
  std::vector<uint8_t> bye_from_;
  uint32_t byes_ = 0;
  uint32_t acks_in_flight_ = 0;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  Status failure_;
};

}  // namespace

Result<std::unique_ptr<Server>> Server::Create(ServerOptions options) {
  auto server = std::make_unique<ServerImpl>();
  ZW_RETURN_IF_ERROR(server->Init(std::move(options)));
  return std::unique_ptr<Server>(std::move(server));
}

Status RunServer(const ServerOptions& options) {
  ZW_ASSIGN_OR_RETURN(std::unique_ptr<Server> server, Server::Create(options));
  return server->Run();
}

}  // namespace zipwire::ps
