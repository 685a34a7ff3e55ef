#include "offload/worker_pipeline.h"

#include <array>
#include <string>

#include "core/log.h"
#include "offload/chunk_header.h"

namespace zipwire::offload {

namespace {
constexpr uint64_t kSendContextBit = 1ull << 63;
constexpr size_t kPollBatch = 64;
}  // namespace

WorkerPipeline::WorkerPipeline(transport::Backend* backend, PipelineOptions options)
    : backend_(backend), options_(options), pool_(options.compute_threads) {
  if (options_.window_chunks == 0) options_.window_chunks = 1;
}

WorkerPipeline::~WorkerPipeline() { Stop(); }

void WorkerPipeline::Start() {
  if (running_.exchange(true)) return;
  progress_ = std::thread([this] { ProgressLoop(); });
}

void WorkerPipeline::Stop() {
  if (running_.exchange(false)) {
    if (progress_.joinable()) progress_.join();
  }
  pool_.Shutdown();
  FailAll(Cancelled("pipeline stopped"));
}

Status WorkerPipeline::AddTensor(TensorRoute route) {
  if (!route.codec) return InvalidArgument("tensor " + std::to_string(route.id) + " has no codec");
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t ignored;
  if (FindTensorLocked(route.id, &ignored) != nullptr) {
    return Status(StatusCode::kAlreadyExists, "tensor " + std::to_string(route.id) + " already declared");
  }
  auto tensor = std::make_unique<Tensor>();
  const uint32_t index = static_cast<uint32_t>(tensors_.size());
  for (const ChunkRoute& c : route.chunks) {
    if (c.local_handle >= handles_.size()) handles_.resize(c.local_handle + 1, HandleRef{UINT32_MAX, 0});
    handles_[c.local_handle] = HandleRef{index, c.chunk_index};
  }
  tensor->chunks.resize(route.chunks.size());
  tensor->route = std::move(route);
  tensors_.push_back(std::move(tensor));
  return Status::Ok();
}

WorkerPipeline::Tensor* WorkerPipeline::FindTensorLocked(uint64_t id, uint32_t* index) {
  for (uint32_t i = 0; i < tensors_.size(); ++i) {
    if (tensors_[i]->route.id == id) {
      *index = i;
      return tensors_[i].get();
    }
  }
  return nullptr;
}

namespace {
std::future<Status> Ready(Status s) {
  std::promise<Status> p;
  p.set_value(std::move(s));
  return p.get_future();
}
}  // namespace

std::future<Status> WorkerPipeline::Push(uint64_t tensor_id, std::span<const float> input,
                                         std::span<float> output, std::future<Status>* pull_future) {
  std::unique_lock<std::mutex> lock(mu_);
  auto fail = [&](Status s) {
    if (pull_future) *pull_future = Ready(s);
    return Ready(std::move(s));
  };
  if (!broken_.ok()) return fail(broken_);
  uint32_t index = 0;
  Tensor* t = FindTensorLocked(tensor_id, &index);
  if (t == nullptr) return fail(NotFound("push of undeclared tensor " + std::to_string(tensor_id)));
  if (input.size() != t->route.elements) {
    return fail(InvalidArgument("push of tensor " + std::to_string(tensor_id) + " with " +
                                std::to_string(input.size()) + " elements, declared " +
                                std::to_string(t->route.elements)));
  }
  if (!output.empty() && output.size() != t->route.elements) {
    return fail(InvalidArgument("output for tensor " + std::to_string(tensor_id) + " has " +
                                std::to_string(output.size()) + " elements, declared " +
                                std::to_string(t->route.elements)));
  }
  if (t->round.active) {
    return fail(FailedPrecondition("tensor " + std::to_string(tensor_id) +
                                   " has a round in flight: pull it before pushing again"));
  }
  Round& r = t->round;
  const uint64_t step = r.step + 1;
  r = Round{};
  r.active = true;
  r.step = step;
  r.input = input;
  r.output = output;
  r.have_output = !output.empty();
  r.pull_requested = r.have_output;
  r.submitted = Clock::now();
  std::future<Status> push = r.push_promise.get_future();
  if (pull_future) *pull_future = r.pull_promise.get_future();
  for (size_t c = 0; c < t->chunks.size(); ++c) {
    t->chunks[c] = ChunkState{};
    waiting_.push_back(HandleRef{index, static_cast<uint32_t>(c)});
  }
  Admit(lock);
  return push;
}

std::future<Status> WorkerPipeline::Pull(uint64_t tensor_id, std::span<float> output) {
  std::unique_lock<std::mutex> lock(mu_);
  uint32_t index = 0;
  Tensor* t = FindTensorLocked(tensor_id, &index);
  if (t == nullptr) return Ready(NotFound("pull of undeclared tensor " + std::to_string(tensor_id)));
  Round& r = t->round;
  if (!r.active) {
    return Ready(FailedPrecondition("pull of tensor " + std::to_string(tensor_id) + " without a push"));
  }
  if (r.pull_requested) {
    return Ready(FailedPrecondition("tensor " + std::to_string(tensor_id) + " is already being pulled"));
  }
  if (output.size() != t->route.elements) {
    return Ready(InvalidArgument("pull of tensor " + std::to_string(tensor_id) + " into " +
                                 std::to_string(output.size()) + " elements, declared " +
                                 std::to_string(t->route.elements)));
  }
  r.output = output;
  r.have_output = true;
  r.pull_requested = true;
  std::future<Status> f = r.pull_promise.get_future();
  if (!r.status.ok()) {
    FailRoundLocked(*t, r.status);
    return f;
  }
  for (uint32_t c = 0; c < t->chunks.size(); ++c) {
    ChunkState& cs = t->chunks[c];
    if (cs.arrived && !cs.decoding) {
      cs.decoding = true;
      pool_.Submit([this, index, c] { Decode(index, c); });
    }
  }
  return f;
}

Status WorkerPipeline::SendControl(transport::PeerId peer, std::span<const uint8_t> bytes) {
  uint64_t ctx = kSendContextBit | next_send_context_.fetch_add(1, std::memory_order_relaxed);
  return backend_->PostSend(peer, bytes, ctx);
}

// FailAll empties the window at once, so a chunk that finishes afterwards
// must not count itself out a second time.
void WorkerPipeline::ReleaseSlotLocked() {
  if (in_flight_ > 0) --in_flight_;
}

// Moves waiting chunks into the window while there is room. Called with mu_.
void WorkerPipeline::Admit(std::unique_lock<std::mutex>& lock) {
  (void)lock;
  while (in_flight_ < options_.window_chunks && !waiting_.empty()) {
    HandleRef ref = waiting_.front();
    waiting_.pop_front();
    Tensor& t = *tensors_[ref.tensor];
    if (!t.round.active || !t.round.status.ok()) continue;  // round failed meanwhile
    ++in_flight_;
    ChunkState& cs = t.chunks[ref.chunk];
    cs.admitted = true;
    cs.t_admit = Clock::now();
    pool_.Submit([this, ref] { CompressAndSend(ref.tensor, ref.chunk); });
  }
}

void WorkerPipeline::CompressAndSend(uint32_t tensor_index, uint32_t chunk) {
  Tensor* t;
  std::span<const float> input;
  uint64_t step;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = tensors_[tensor_index].get();
    if (!t->round.status.ok()) {
      ReleaseSlotLocked();
      return;
    }
    input = t->round.input;
    step = t->round.step;
  }
  const TensorRoute& route = t->route;
  const ChunkRoute& cr = route.chunks[chunk];
  // Compress straight into the registered send slot: the transport writes
  // from there without another copy.
  uint8_t* slot = static_cast<uint8_t*>(route.send_region.addr) + cr.send_offset;
  ChunkHeader header{static_cast<uint32_t>(step), static_cast<uint32_t>(route.id), cr.chunk_index};
  WriteChunkHeader(header, slot);
  std::span<uint8_t> payload(slot + ChunkHeader::kBytes, cr.slot_bytes - ChunkHeader::kBytes);
  std::span<const float> values = input.subspan(cr.offset, cr.count);
  kernels::CodecContext ctx{options_.seed, route.id, cr.chunk_index, step};
  Result<size_t> written =
      route.error_feedback ? route.error_feedback->Compress({route.id, cr.chunk_index}, values, payload, ctx)
                           : route.codec->Compress(values, payload, ctx);
  Status status = written.status();
  const Clock::time_point compressed = Clock::now();
  if (status.ok()) {
    const uint64_t bytes = ChunkHeader::kBytes + written.value();
    {
      std::lock_guard<std::mutex> lock(mu_);
      t->chunks[chunk].t_compressed = compressed;
      t->chunks[chunk].wire_bytes = static_cast<uint32_t>(bytes);
    }
    wire_bytes_sent_.fetch_add(bytes, std::memory_order_relaxed);
    status = backend_->PostWrite(cr.server, route.send_region, cr.send_offset, cr.server_region,
                                 cr.server_offset, bytes, cr.server_handle, cr.local_handle);
    if (status.ok()) return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  ReleaseSlotLocked();
  FailRoundLocked(*t, status.WithContext("tensor " + std::to_string(route.id) + " chunk " +
                                         std::to_string(cr.chunk_index)));
  Admit(lock);
}

void WorkerPipeline::OnWriteDone(const transport::Completion& c) {
  std::unique_lock<std::mutex> lock(mu_);
  if (c.context >= handles_.size()) return;
  HandleRef ref = handles_[c.context];
  if (ref.tensor >= tensors_.size()) return;
  Tensor& t = *tensors_[ref.tensor];
  ChunkState& cs = t.chunks[ref.chunk];
  if (!c.status.ok()) {
    ReleaseSlotLocked();
    FailRoundLocked(t, c.status.WithContext("push of tensor " + std::to_string(t.route.id) + " chunk " +
                                            std::to_string(ref.chunk)));
    Admit(lock);
    return;
  }
  cs.acked = true;
  cs.t_acked = Clock::now();
  Round& r = t.round;
  if (++r.acked == t.chunks.size() && !r.push_set) {
    r.push_set = true;
    r.pushed_all = true;
    r.push_promise.set_value(Status::Ok());
  }
}

void WorkerPipeline::OnAggregate(const transport::Completion& c) {
  std::unique_lock<std::mutex> lock(mu_);
  if (c.imm >= handles_.size() || handles_[c.imm].tensor >= tensors_.size()) {
    ZW_LOG(kWarn, "aggregate with unknown handle " << c.imm << " from peer " << c.peer << " ignored");
    return;
  }
  HandleRef ref = handles_[c.imm];
  Tensor& t = *tensors_[ref.tensor];
  const ChunkRoute& cr = t.route.chunks[ref.chunk];
  ChunkState& cs = t.chunks[ref.chunk];
  if (!t.round.active || !cs.admitted || cs.arrived || c.offset != cr.recv_offset ||
      c.length > cr.slot_bytes || c.peer != cr.server) {
    ZW_LOG(kWarn, "unexpected aggregate for tensor " << t.route.id << " chunk " << ref.chunk << " from peer "
                                                     << c.peer << " ignored");
    return;
  }
  cs.arrived = true;
  cs.arrived_bytes = c.length;
  wire_bytes_received_.fetch_add(c.length, std::memory_order_relaxed);
  cs.t_arrived = Clock::now();
  ReleaseSlotLocked();  // the window bounds chunks on the wire; decoding waits for the pull
  if (t.round.have_output && t.round.status.ok()) {
    cs.decoding = true;
    uint32_t index = ref.tensor, chunk = ref.chunk;
    pool_.Submit([this, index, chunk] { Decode(index, chunk); });
  }
  Admit(lock);
}

void WorkerPipeline::Decode(uint32_t tensor_index, uint32_t chunk) {
  Tensor* t;
  std::span<float> out;
  uint64_t step, bytes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = tensors_[tensor_index].get();
    if (!t->round.status.ok()) return;
    out = t->round.output;
    step = t->round.step;
    bytes = t->chunks[chunk].arrived_bytes;
  }
  const ChunkRoute& cr = t->route.chunks[chunk];
  const uint8_t* slot = static_cast<const uint8_t*>(t->route.recv_region.addr) + cr.recv_offset;
  std::span<const uint8_t> data(slot, bytes);
  ChunkHeader expected{static_cast<uint32_t>(step), static_cast<uint32_t>(t->route.id), cr.chunk_index};
  Status status = CheckChunkHeader(data, expected);
  if (status.ok()) {
    status = t->route.codec->Decompress(data.subspan(ChunkHeader::kBytes), out.subspan(cr.offset, cr.count));
  }
  const Clock::time_point decoded = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  if (!status.ok()) {
    FailRoundLocked(
        *t, status.WithContext("aggregate of tensor " + std::to_string(t->route.id) + " chunk " +
                               std::to_string(cr.chunk_index) + " from peer " + std::to_string(cr.server)));
    return;
  }
  const ChunkState& cs = t->chunks[chunk];
  ChunkTiming timing;
  timing.tensor_id = t->route.id;
  timing.chunk_index = cr.chunk_index;
  timing.wire_bytes = cs.wire_bytes;
  auto set = [&](Stage s, Clock::time_point a, Clock::time_point b) {
    timing.us[static_cast<size_t>(s)] = MicrosBetween(a, b);
  };
  set(Stage::kWindowWait, t->round.submitted, cs.t_admit);
  set(Stage::kCompress, cs.t_admit, cs.t_compressed);
  set(Stage::kSend, cs.t_compressed, cs.acked ? cs.t_acked : cs.t_arrived);
  set(Stage::kRemote, cs.acked ? cs.t_acked : cs.t_compressed, cs.t_arrived);
  set(Stage::kDecompress, cs.t_arrived, decoded);
  set(Stage::kTotal, t->round.submitted, decoded);
  timings_.Add(timing);
  ++t->round.decoded;
  MaybeFinishPullLocked(*t);
}

void WorkerPipeline::MaybeFinishPullLocked(Tensor& t) {
  Round& r = t.round;
  if (r.decoded == t.chunks.size() && r.pull_requested && !r.pull_set) {
    // The aggregate cannot come back before the server saw our push, so the
    // push is complete too even if its ack is still on the way.
    if (!r.push_set) {
      r.push_set = true;
      r.push_promise.set_value(Status::Ok());
    }
    r.pull_set = true;
    r.active = false;
    r.pull_promise.set_value(Status::Ok());
  }
}

void WorkerPipeline::FailRoundLocked(Tensor& t, const Status& status) {
  Round& r = t.round;
  if (!r.active) return;
  if (r.status.ok()) r.status = status;
  if (!r.push_set) {
    r.push_set = true;
    r.push_promise.set_value(r.status);
  }
  if (r.pull_requested && !r.pull_set) {
    r.pull_set = true;
    r.pull_promise.set_value(r.status);
  }
  // A failed round is over once the user has seen it fail on both futures;
  // until a pull is requested it stays active so that Pull reports the error.
  if (r.pull_set) r.active = false;
}

void WorkerPipeline::FailAll(const Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_.ok()) broken_ = status;
  for (auto& t : tensors_) {
    if (!t->round.active) continue;
    FailRoundLocked(*t, status);
    // Chunks that were admitted will never complete: free the window.
  }
  waiting_.clear();
  in_flight_ = 0;
}

void WorkerPipeline::ProgressLoop() {
  std::array<transport::Completion, kPollBatch> batch;
  while (running_.load(std::memory_order_acquire)) {
    size_t n = backend_->Poll(std::span<transport::Completion>(batch), std::chrono::milliseconds(50));
    for (size_t i = 0; i < n; ++i) {
      transport::Completion& c = batch[i];
      switch (c.type) {
        case transport::CompletionType::kWriteDone:
          OnWriteDone(c);
          break;
        case transport::CompletionType::kWriteImm:
          OnAggregate(c);
          break;
        case transport::CompletionType::kRecvMessage:
          if (control_handler_) control_handler_(c.peer, std::move(c.message));
          break;
        case transport::CompletionType::kSendDone:
          if (!c.status.ok())
            ZW_LOG(kWarn, "control message to peer " << c.peer << " failed: " << c.status.ToString());
          break;
        case transport::CompletionType::kPeerError:
          FailAll(c.status);
          if (peer_error_handler_) peer_error_handler_(c.peer, c.status);
          break;
        case transport::CompletionType::kPeerConnected:
        case transport::CompletionType::kReadDone:  // the pipeline posts no reads
          break;
      }
    }
  }
}

}  // namespace zipwire::offload
