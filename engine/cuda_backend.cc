#include "engine/cuda_backend_internal.h"

namespace kvmem {
namespace cuda_internal {
template <typename T>
absl::StatusOr<T*> CudaBackend<T>::UploadMatrix(std::vector<const float*> parts,
                                                std::vector<int64_t> rows, int64_t cols) {
  int64_t total_rows = 0;
  for (int64_t r : rows) total_rows += r;
  KVMEM_ASSIGN_OR_RETURN(T * out, AllocWeight<T>(static_cast<size_t>(total_rows * cols)));
  if (parts.empty() || parts[0] == nullptr) {
    // Random weights: uniform with variance 1 / cols keeps every projection's output at the
    // scale of its input.
    const float scale = std::sqrt(3.f / static_cast<float>(cols));
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchFillUniform(
        out, total_rows * cols, options_.random_weights_seed * 1000003 + ++random_counter_, scale,
        ctx_->stream));
    return out;
  }
  // f32 rows through a bounded device staging buffer, converted to T on the device.
  constexpr int64_t kStagingFloats = int64_t{16} << 20;
  Scratch<float> staging;
  KVMEM_RETURN_IF_ERROR(staging.Allocate(
      static_cast<size_t>(std::min(kStagingFloats, total_rows * cols)), ctx_->stream));
  int64_t done = 0;  // elements written to out
  for (size_t p = 0; p < parts.size(); ++p) {
    const int64_t count = rows[p] * cols;
    for (int64_t off = 0; off < count; off += kStagingFloats) {
      const int64_t chunk = std::min(kStagingFloats, count - off);
      // A pageable source: the call returns once the host buffer may be reused.
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging.get(), parts[p] + off,
                                                 chunk * sizeof(float), cudaMemcpyHostToDevice,
                                                 ctx_->stream));
      KVMEM_CUDA_RETURN_IF_ERROR(
          LaunchConvert<float, T>(staging.get(), out + done + off, chunk, ctx_->stream));
    }
    done += count;
  }
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx_->stream));
  return out;
}

template <typename T>
absl::StatusOr<float*> CudaBackend<T>::UploadVector(std::vector<const float*> parts,
                                                    std::vector<int64_t> sizes, bool random_ones) {
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  std::vector<float> host(total);
  int64_t off = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    if (parts[p] != nullptr) {
      std::memcpy(&host[off], parts[p], sizes[p] * sizeof(float));
    } else {
      std::fill(host.begin() + off, host.begin() + off + sizes[p], random_ones ? 1.f : 0.f);
    }
    off += sizes[p];
  }
  KVMEM_ASSIGN_OR_RETURN(float* out, AllocWeight<float>(host.size()));
  // On the backend's stream: a cudaMemcpy from pageable memory may return before the copy
  // lands, and the stream (non-blocking) would not wait for the legacy stream's copy.
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, host.data(), host.size() * sizeof(float),
                                             cudaMemcpyHostToDevice, ctx_->stream));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx_->stream));
  return out;
}

template <typename T>
absl::Status CudaBackend<T>::Init(const ModelWeights* weights) {
  const ModelConfig& c = config_;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx_->device));
  KVMEM_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
  KVMEM_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, ctx_->stream));
  // A fixed workspace keeps cuBLAS from allocating during a pass (and lets passes be captured
  // into CUDA graphs).
  constexpr size_t kCublasWorkspace = size_t{32} << 20;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMalloc(&cublas_workspace_, kCublasWorkspace));
  KVMEM_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspace));
  if (std::is_same_v<T, float>) {
    KVMEM_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_PEDANTIC_MATH));
  }
  // Upload staging: two slots of about options_.upload_staging_bytes, pinned on the host, and a
  // copy stream.
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&uploads_.stream, cudaStreamNonBlocking));
  {
    const int64_t row_bytes = 2 * c.head_dim * sizeof(T) + 6 * sizeof(int64_t);
    const int64_t staging = static_cast<int64_t>(
        std::min<size_t>(options_.upload_staging_bytes, size_t{1} << 40));
    uploads_.slot_rows = std::max<int64_t>(8, (staging / row_bytes) / 8 * 8);
    const size_t slot_bytes = uploads_.Layout(uploads_.slot_rows, c.head_dim).bytes;
    for (UploadSlot& slot : uploads_.slots) {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&slot.host), slot_bytes));
      KVMEM_ASSIGN_OR_RETURN(slot.device, AllocWeight<uint8_t>(slot_bytes));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&slot.host_free, cudaEventDisableTiming));
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaEventCreateWithFlags(&slot.device_free, cudaEventDisableTiming));
    }
  }
  // Freed pool memory stays with the process: KV copies grow and shrink every turn.
  cudaMemPool_t pool;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, ctx_->device));
  uint64_t threshold = ~uint64_t{0};
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));

  const bool host = weights != nullptr;
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  KVMEM_ASSIGN_OR_RETURN(embed_,
                         UploadMatrix({host ? weights->embed : nullptr}, {c.vocab_size}, h));
  if (host ? weights->lm_head == weights->embed : c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    KVMEM_ASSIGN_OR_RETURN(lm_head_,
                           UploadMatrix({host ? weights->lm_head : nullptr}, {c.vocab_size}, h));
  }
  KVMEM_ASSIGN_OR_RETURN(final_norm_,
                         UploadVector({host ? weights->final_norm : nullptr}, {h}, true));
  layers_.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights* lw = host ? &weights->layers[l] : nullptr;
    LayerDevice& d = layers_[l];
    auto p = [&](const float* LayerWeights::*field) { return lw ? lw->*field : nullptr; };
    KVMEM_ASSIGN_OR_RETURN(
        d.w_qkv, UploadMatrix({p(&LayerWeights::wq), p(&LayerWeights::wk), p(&LayerWeights::wv)},
                              {qd, kvd, kvd}, h));
    KVMEM_ASSIGN_OR_RETURN(d.w_o, UploadMatrix({p(&LayerWeights::wo)}, {h}, qd));
    KVMEM_ASSIGN_OR_RETURN(
        d.w_gate_up,
        UploadMatrix({p(&LayerWeights::w_gate), p(&LayerWeights::w_up)}, {inter, inter}, h));
    KVMEM_ASSIGN_OR_RETURN(d.w_down, UploadMatrix({p(&LayerWeights::w_down)}, {h}, inter));
    KVMEM_ASSIGN_OR_RETURN(d.attn_norm, UploadVector({p(&LayerWeights::attn_norm)}, {h}, true));
    KVMEM_ASSIGN_OR_RETURN(d.mlp_norm, UploadVector({p(&LayerWeights::mlp_norm)}, {h}, true));
    if (lw != nullptr && (lw->bq || lw->bk || lw->bv)) {
      KVMEM_ASSIGN_OR_RETURN(d.b_qkv,
                             UploadVector({lw->bq, lw->bk, lw->bv}, {qd, kvd, kvd}, false));
    }
    if (lw != nullptr && lw->bo) {
      KVMEM_ASSIGN_OR_RETURN(d.b_o, UploadVector({lw->bo}, {h}, false));
    }
    if (lw != nullptr && (lw->b_gate || lw->b_up)) {
      KVMEM_ASSIGN_OR_RETURN(d.b_gate_up,
                             UploadVector({lw->b_gate, lw->b_up}, {inter, inter}, false));
    }
    if (lw != nullptr && lw->b_down) {
      KVMEM_ASSIGN_OR_RETURN(d.b_down, UploadVector({lw->b_down}, {h}, false));
    }
  }
  const std::vector<double> inv_freq = c.RopeInverseFrequencies();
  KVMEM_ASSIGN_OR_RETURN(inv_freq_, AllocWeight<double>(inv_freq.size()));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(inv_freq_, inv_freq.data(),
                                             inv_freq.size() * sizeof(double),
                                             cudaMemcpyHostToDevice, ctx_->stream));
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx_->stream));
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::AllocatePass(int64_t n, int64_t logit_rows, int observed,
                                          PassScratch* scratch, PassBuffers* b) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  KVMEM_RETURN_IF_ERROR(scratch->ids.Allocate(n, s));
  KVMEM_RETURN_IF_ERROR(scratch->pos.Allocate(1, s));
  KVMEM_RETURN_IF_ERROR(scratch->x.Allocate(n * h, s));
  KVMEM_RETURN_IF_ERROR(scratch->xn.Allocate(n * h, s));
  KVMEM_RETURN_IF_ERROR(scratch->qkv.Allocate(n * (qd + 2 * kvd), s));
  KVMEM_RETURN_IF_ERROR(scratch->q.Allocate(n * qd, s));
  if (!std::is_same_v<T, float>) KVMEM_RETURN_IF_ERROR(scratch->q_t.Allocate(n * qd, s));
  KVMEM_RETURN_IF_ERROR(scratch->new_k.Allocate(L * n * kvd, s));
  KVMEM_RETURN_IF_ERROR(scratch->new_v.Allocate(L * n * kvd, s));
  KVMEM_RETURN_IF_ERROR(scratch->attn.Allocate(n * qd, s));
  KVMEM_RETURN_IF_ERROR(scratch->proj.Allocate(n * h, s));
  KVMEM_RETURN_IF_ERROR(scratch->gate_up.Allocate(n * 2 * inter, s));
  KVMEM_RETURN_IF_ERROR(scratch->act.Allocate(n * inter, s));
  KVMEM_RETURN_IF_ERROR(scratch->logits.Allocate(logit_rows * c.vocab_size, s));
  if (observed > 0) {
    KVMEM_RETURN_IF_ERROR(scratch->observed_q.Allocate(static_cast<size_t>(L) * observed * qd, s));
  }
  KVMEM_RETURN_IF_ERROR(AllocateTables(&scratch->tables, &b->tables));
  b->ids = scratch->ids.get();
  b->pos = scratch->pos.get();
  b->x = scratch->x.get();
  b->xn = scratch->xn.get();
  b->qkv = scratch->qkv.get();
  b->q = scratch->q.get();
  b->q_t = std::is_same_v<T, float> ? reinterpret_cast<T*>(scratch->q.get()) : scratch->q_t.get();
  b->new_k = scratch->new_k.get();
  b->new_v = scratch->new_v.get();
  b->attn = scratch->attn.get();
  b->proj = scratch->proj.get();
  b->gate_up = scratch->gate_up.get();
  b->act = scratch->act.get();
  b->logits = scratch->logits.get();
  b->observed_q = scratch->observed_q.get();
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::EnqueuePass(PassBuffers* b, int64_t n, int64_t start_pos, int observed,
                                         int64_t first_logit,
                                         const std::vector<int32_t>& max_lengths,
                                         const std::function<absl::Status(int)>& after_qkv) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate_size;
  const int64_t kvh = c.num_kv_heads;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  KVMEM_CUDA_RETURN_IF_ERROR(LaunchEmbeddingGather(embed_, c.vocab_size, h, b->ids, n, b->x, s));
  prof_.Mark("embedding");
  const float* residual = nullptr;  // the previous block's output, added before the next norm
  const float* residual_bias = nullptr;
  for (int l = 0; l < L; ++l) {
    const LayerDevice& lw = layers_[l];
    T* layer_k = b->new_k + static_cast<int64_t>(l) * n * kvd;
    T* layer_v = b->new_v + static_cast<int64_t>(l) * n * kvd;
    // Attention block: norm, fused QKV projection, bias + RoPE + split.
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchResidualRmsNorm<T>(b->x, residual, residual_bias, lw.attn_norm,
                                                        n, h, c.rms_norm_eps, b->xn, s));
    prof_.Mark("residual + rmsnorm");
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_qkv, qd + 2 * kvd, h, b->xn, n, b->qkv));
    prof_.Mark("gemm qkv");
    QkvRopeParams<T> rp;
    rp.qkv = b->qkv;
    rp.bias = lw.b_qkv;
    rp.n = n;
    rp.start_position_device = b->pos;
    rp.num_heads = c.num_heads;
    rp.num_kv_heads = c.num_kv_heads;
    rp.head_dim = c.head_dim;
    rp.inv_freq = inv_freq_;
    rp.q = b->q;
    rp.q_t = std::is_same_v<T, float> ? nullptr : b->q_t;
    rp.k = layer_k;
    rp.v = layer_v;
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchQkvRope(rp, s));
    prof_.Mark("bias + rope");
    if (observed > 0) {  // head by head, as ForwardResult::observed_queries holds them
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchRowsToHeadMajor(
          b->q + (n - observed) * qd, observed, c.num_heads, c.head_dim,
          b->observed_q + static_cast<int64_t>(l) * observed * qd, s));
    }
    if (b->layer_ready != nullptr) {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(b->layer_ready[l], s));
    }
    if (after_qkv) {
      KVMEM_RETURN_IF_ERROR(after_qkv(l));
      prof_.Mark("recall hook");
    }
    // The new tokens join their heads, then attend.
    AppendKvParams<T> ap;
    ap.keys = b->tables.keys + l * kvh;
    ap.values = b->tables.values + l * kvh;
    ap.positions = b->tables.positions + l * kvh;
    ap.lengths = b->tables.lengths + l * kvh;
    ap.k = layer_k;
    ap.v = layer_v;
    ap.n = n;
    ap.start_position_device = b->pos;
    ap.num_kv_heads = c.num_kv_heads;
    ap.head_dim = c.head_dim;
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchAppendKv(ap, s));
    prof_.Mark("kv append");
    RaggedKv<T> ragged;
    ragged.keys = b->tables.keys + l * kvh;
    ragged.values = b->tables.values + l * kvh;
    ragged.positions = b->tables.positions + l * kvh;
    ragged.lengths = b->tables.lengths + l * kvh;
    ragged.num_kv_heads = c.num_kv_heads;
    ragged.head_dim = c.head_dim;
    ragged.max_length = max_lengths[l];
    if (n == 1) {
      DecodeAttentionParams<T> dp;
      dp.q = b->q_t;
      dp.kv = ragged;
      dp.num_heads = c.num_heads;
      dp.scale = scale;
      dp.sliding_window = c.sliding_window;
      dp.q_position = start_pos;
      dp.q_position_device = b->pos;  // a graph replays with each step's position
      dp.split_size = options_.decode_split;
      dp.out = b->attn;
      const size_t ws = DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim, ragged.max_length,
                                                      options_.decode_split);
      if (ws > b->decode_ws_bytes) {
        if (b->decode_ws_scratch == nullptr) {
          return absl::InternalError("decode workspace too small for a captured step");
        }
        KVMEM_RETURN_IF_ERROR(b->decode_ws_scratch->Allocate(ws, s));
        b->decode_ws = b->decode_ws_scratch->get();
        b->decode_ws_bytes = ws;
      }
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchDecodeAttention(dp, b->decode_ws, b->decode_ws_bytes, s));
      prof_.Mark("decode attention");
    } else {
      PrefillAttentionParams<T> pp;
      pp.q = b->q_t;
      pp.kv = ragged;
      pp.n = n;
      pp.num_heads = c.num_heads;
      pp.scale = scale;
      pp.sliding_window = c.sliding_window;
      pp.start_position = start_pos;
      pp.out = b->attn;
      pp.tensor_cores = options_.tensor_core_prefill;
      // Scratch to split long heads across blocks (short turns onto long hot sets), shared
      // with decode attention's.
      const size_t ws = PrefillAttentionWorkspaceBytes(pp);
      if (ws > b->decode_ws_bytes && b->decode_ws_scratch != nullptr) {
        KVMEM_RETURN_IF_ERROR(b->decode_ws_scratch->Allocate(ws, s));
        b->decode_ws = b->decode_ws_scratch->get();
        b->decode_ws_bytes = ws;
      }
      pp.workspace = b->decode_ws;
      pp.workspace_bytes = b->decode_ws_bytes;
      KVMEM_CUDA_RETURN_IF_ERROR(LaunchPrefillAttention(pp, s));
      prof_.Mark("prefill attention");
    }
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_o, h, qd, b->attn, n, b->proj));
    prof_.Mark("gemm o");
    // MLP block (SwiGLU).
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchResidualRmsNorm<T>(b->x, b->proj, lw.b_o, lw.mlp_norm, n, h,
                                                        c.rms_norm_eps, b->xn, s));
    prof_.Mark("residual + rmsnorm");
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_gate_up, 2 * inter, h, b->xn, n, b->gate_up));
    prof_.Mark("gemm gate+up");
    KVMEM_CUDA_RETURN_IF_ERROR(LaunchSwiGluRows<T>(b->gate_up, lw.b_gate_up, n, inter, b->act, s));
    prof_.Mark("swiglu");
    KVMEM_RETURN_IF_ERROR(Gemm(lw.w_down, h, inter, b->act, n, b->proj));
    prof_.Mark("gemm down");
    residual = b->proj;
    residual_bias = lw.b_down;
  }

  // Logits of the rows asked for.
  const int64_t logit_rows = n - first_logit;
  KVMEM_CUDA_RETURN_IF_ERROR(
      LaunchResidualRmsNorm<T>(b->x + first_logit * h, residual + first_logit * h, residual_bias,
                               final_norm_, logit_rows, h, c.rms_norm_eps, b->xn, s));
  prof_.Mark("residual + rmsnorm");
  KVMEM_RETURN_IF_ERROR(Gemm(lm_head_, c.vocab_size, h, b->xn, logit_rows, b->logits));
  prof_.Mark("gemm lm head");
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::FinishPass(const PassBuffers& b, int64_t n, int64_t start_pos,
                                        int observed, int64_t logit_rows, KvCache* kv,
                                        DeviceKv<T>* dkv, ForwardResult* result, uint8_t* pinned) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim, qd = c.q_dim(), kvd = c.kv_dim(), kvh = c.num_kv_heads;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  result->logits.resize(logit_rows * c.vocab_size);
  // The observed queries leave the device head by head, (num_heads, observed, head_dim) per
  // layer, and land where the result keeps them (vectors a reused result already has).
  const size_t obs_values = static_cast<size_t>(observed) * qd;
  result->observed_queries.resize(observed > 0 ? L : 0);
  for (std::vector<float>& oq : result->observed_queries) oq.resize(obs_values);
  // Where the new rows land on the host: a kBackend cache's fresh rows, grown here and written
  // by the copies themselves (in T: a bf16 device's rows stay bf16), or host_k/host_v for a
  // kHost cache, whose heads take them widened below.
  const bool fresh = !kv->host_rows();
  const size_t layer_values = static_cast<size_t>(n) * kvd;
  std::vector<T> host_k(fresh ? 0 : L * layer_values), host_v(host_k.size());
  std::vector<T*> dst_k(L), dst_v(L);
  for (int l = 0; l < L; ++l) {
    if (fresh) {
      const auto [k, v] = kv->GrowFresh(l, start_pos, n, KvDType());
      dst_k[l] = static_cast<T*>(k);
      dst_v[l] = static_cast<T*>(v);
    } else {
      dst_k[l] = host_k.data() + l * layer_values;
      dst_v[l] = host_v.data() + l * layer_values;
    }
  }
  // Results come back in one wait: through pinned staging when given (every copy truly
  // asynchronous, then one host copy each), else straight to where they belong.
  struct Download {
    void* dst;
    const void* src;
    size_t bytes;
  };
  const Download logits{result->logits.data(), b.logits, result->logits.size() * sizeof(float)};
  // Outside the layer-by-layer path every layer's observed queries come down as one copy (they
  // are contiguous on the device) and are split into the result's vectors here.
  auto split_observed = [&](const uint8_t* all_layers) {
    for (int l = 0; l < L && observed > 0; ++l) {
      std::memcpy(result->observed_queries[l].data(), all_layers + l * obs_values * sizeof(float),
                  obs_values * sizeof(float));
    }
  };
  // Each layer's K, V and observed queries, copied on the download stream once the pass has
  // written them (b.layer_ready) into a ring of pinned slots, which the host empties in layer
  // order on the thread pool: the copies overlap the later layers' work. (Copies straight to
  // pageable memory run at 4-9 GB/s on an H100 machine; emptying the slots on one thread was
  // slower still.)
  auto download_by_layer = [&]() -> absl::Status {
    auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
    const size_t kv_bytes = layer_values * sizeof(T);
    const size_t obs_bytes = obs_values * sizeof(float);
    const size_t per_layer = 2 * align(kv_bytes) + align(obs_bytes);
    // options_.download_staging_bytes is a soft size: at least two slots, however large a
    // layer's rows (a 32K-token 8B turn pins about 257 MiB); the buffer is kept for the
    // backend's lifetime.
    const int slots = static_cast<int>(
        std::min<size_t>(L, std::max<size_t>(2, options_.download_staging_bytes / per_layer)));
    if (downloads_.bytes < slots * per_layer) {
      if (downloads_.host != nullptr) cudaFreeHost(downloads_.host);
      downloads_.host = nullptr;
      downloads_.bytes = 0;
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMallocHost(reinterpret_cast<void**>(&downloads_.host), slots * per_layer));
      downloads_.bytes = slots * per_layer;
    }
    cudaStream_t dl = downloads_.stream;
    auto issue = [&](int l) -> absl::Status {
      uint8_t* slot = downloads_.host + (l % slots) * per_layer;
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dl, b.layer_ready[l], 0));
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(slot, b.new_k + l * layer_values, kv_bytes, cudaMemcpyDeviceToHost, dl));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(slot + align(kv_bytes), b.new_v + l * layer_values,
                                                 kv_bytes, cudaMemcpyDeviceToHost, dl));
      if (obs_bytes > 0) {
        KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
            slot + 2 * align(kv_bytes), b.observed_q + l * obs_values, obs_bytes,
            cudaMemcpyDeviceToHost, dl));
      }
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventRecord(downloads_.done[l], dl));
      return absl::OkStatus();
    };
    // A layer's slot goes out in pieces of at most 1 MiB, spread over the pool.
    struct Piece {
      uint8_t* dst;
      const uint8_t* src;
      size_t bytes;
    };
    std::vector<Piece> pieces;
    auto drain = [&](int l) -> absl::Status {
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(downloads_.done[l]));
      const uint8_t* slot = downloads_.host + (l % slots) * per_layer;
      pieces.clear();
      auto add = [&](void* dst, const uint8_t* src, size_t bytes) {
        constexpr size_t kPiece = size_t{1} << 20;
        for (size_t off = 0; off < bytes; off += kPiece) {
          pieces.push_back(
              {static_cast<uint8_t*>(dst) + off, src + off, std::min(kPiece, bytes - off)});
        }
      };
      add(dst_k[l], slot, kv_bytes);
      add(dst_v[l], slot + align(kv_bytes), kv_bytes);
      if (obs_bytes > 0) {
        add(result->observed_queries[l].data(), slot + 2 * align(kv_bytes), obs_bytes);
      }
      auto copy = [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].bytes);
        }
      };
      if (pieces.size() > 2) {
        SharedThreadPool().ParallelFor(static_cast<int64_t>(pieces.size()), copy);
      } else {
        copy(0, static_cast<int64_t>(pieces.size()));
      }
      return absl::OkStatus();
    };
    for (int l = 0; l < slots; ++l) KVMEM_RETURN_IF_ERROR(issue(l));
    for (int l = 0; l < L; ++l) {
      KVMEM_RETURN_IF_ERROR(drain(l));
      if (l + slots < L) KVMEM_RETURN_IF_ERROR(issue(l + slots));  // into the slot just emptied
    }
    KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(result->logits.data(), b.logits,
                                               result->logits.size() * sizeof(float),
                                               cudaMemcpyDeviceToHost, s));
    KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    return absl::OkStatus();
  };
  auto download = [&]() -> absl::Status {
    if (b.layer_ready != nullptr) return download_by_layer();
    if (pinned == nullptr) {
      std::vector<float> obs(L * obs_values);
      std::vector<Download> list = {logits, {obs.data(), b.observed_q, obs.size() * sizeof(float)}};
      for (int l = 0; l < L; ++l) {  // the new K and V of each layer
        list.push_back({dst_k[l], b.new_k + l * layer_values, layer_values * sizeof(T)});
        list.push_back({dst_v[l], b.new_v + l * layer_values, layer_values * sizeof(T)});
      }
      for (const Download& d : list) {
        if (d.bytes == 0) continue;
        KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d.dst, d.src, d.bytes, cudaMemcpyDeviceToHost, s));
      }
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
      split_observed(reinterpret_cast<const uint8_t*>(obs.data()));
      return absl::OkStatus();
    }
    // Staged: the observed queries, K and V of every layer as one copy each (each contiguous
    // on the device), then split by layer on the host.
    const Download staged_list[] = {logits,
                                    {nullptr, b.observed_q, L * obs_values * sizeof(float)},
                                    {nullptr, b.new_k, L * layer_values * sizeof(T)},
                                    {nullptr, b.new_v, L * layer_values * sizeof(T)}};
    size_t staged = 0;
    for (const Download& d : staged_list) {
      if (d.bytes == 0) continue;
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(pinned + staged, d.src, d.bytes, cudaMemcpyDeviceToHost, s));
      staged += (d.bytes + 7) / 8 * 8;
    }
    KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    staged = 0;
    for (const Download& d : staged_list) {
      if (d.bytes == 0) continue;
      if (d.dst != nullptr) {
        std::memcpy(d.dst, pinned + staged, d.bytes);
      } else if (d.src == static_cast<const void*>(b.observed_q)) {
        split_observed(pinned + staged);
      } else {
        const bool keys = d.src == static_cast<const void*>(b.new_k);
        for (int l = 0; l < L; ++l) {
          std::memcpy(keys ? dst_k[l] : dst_v[l], pinned + staged + l * layer_values * sizeof(T),
                      layer_values * sizeof(T));
        }
      }
      staged += (d.bytes + 7) / 8 * 8;
    }
    return absl::OkStatus();
  };
  absl::Status downloaded = download();
  prof_.Mark("results down (logits, queries, new kv)");
  if (absl::Status st = std::move(downloaded); !st.ok()) {
    // Nothing may still write into the grown rows (or read the pass's buffers) when they are
    // dropped.
    cudaStreamSynchronize(s);
    if (downloads_.stream != nullptr) cudaStreamSynchronize(downloads_.stream);
    if (fresh) kv->DropFreshFrom(start_pos);
    return st;
  }

  // The host cache gets the entries exactly as the device holds them (rounded to T), so a
  // later upload of them reproduces the device's rows bit for bit: into every head (kHost),
  // or as the layer's fresh rows with positions only in the heads (kBackend).
  std::vector<float> krow(hd), vrow(hd);
  for (int l = 0; l < L; ++l) {
    for (int g = 0; g < kvh; ++g) {
      DeviceHead<T>& dh = dkv->heads[l * kvh + g];
      // A head changed on the host after its layer was synced (only a hook editing another
      // layer could do that) no longer matches the device copy: upload it whole next time.
      const bool in_step = dh.version == kv->version(l, g);
      HeadKv& head = kv->head(l, g);
      if (!in_step) {
        dh.mirrored.clear();
        dh.version = ~uint64_t{0};
      }
      for (int64_t t = 0; t < n; ++t) {
        if (kv->host_rows()) {
          const size_t off = ((static_cast<size_t>(l) * n + t) * kvh + g) * hd;
          for (int64_t d = 0; d < hd; ++d) {
            krow[d] = HostToFloat(host_k[off + d]);
            vrow[d] = HostToFloat(host_v[off + d]);
          }
          head.Append(start_pos + t, krow.data(), vrow.data(), static_cast<int>(hd));
        } else {
          KVMEM_CHECK(head.positions.empty() || head.positions.back() < start_pos + t);
          head.positions.push_back(start_pos + t);
        }
        if (in_step) dh.mirrored.push_back(start_pos + t);
      }
      if (in_step) dh.version = kv->version(l, g);
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::Run(absl::Span<const int32_t> tokens, int64_t start_pos, KvCache* kv,
                                 const ForwardOptions& options, ForwardResult* result,
                                 std::shared_ptr<void>* stale) {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t qd = c.q_dim(), kvh = c.num_kv_heads;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;

  // 1. The device copy of the hot set, up to date, with room for the new tokens.
  KVMEM_ASSIGN_OR_RETURN(DeviceKv<T> * dkv, Attach(kv, stale));
  dkv->DropObserved();  // the last pass's, which this one supersedes
  KVMEM_RETURN_IF_ERROR(SyncHeads(*kv, *dkv, 0, L));
  prof_.Mark("sync heads (uploads, gathers)");
  for (DeviceHead<T>& dh : dkv->heads) {
    KVMEM_RETURN_IF_ERROR(Reserve(*dkv, dh, static_cast<int64_t>(dh.mirrored.size()) + n));
  }
  prof_.Mark("reserve rows");
  const int observed = static_cast<int>(std::min<int64_t>(options.observe_last, n));
  const int64_t first_logit = options.all_logits ? 0 : n - 1;
  auto layer_max_length = [&](int l) {
    int64_t m = 0;
    for (int g = 0; g < kvh; ++g) {
      m = std::max<int64_t>(m, static_cast<int64_t>(dkv->heads[l * kvh + g].mirrored.size()) + n);
    }
    return static_cast<int32_t>(m);
  };
  std::vector<int32_t> max_lengths(L);
  for (int l = 0; l < L; ++l) max_lengths[l] = layer_max_length(l);

  // 2. A decode step without a hook replays a captured CUDA graph. The first decode step runs
  // op by op (so every kernel is loaded before a capture); a capture that fails turns graphs
  // off for this backend, logged once, and the step runs op by op.
  const bool graphable = n == 1 && observed <= 1 && !options.before_attention &&
                         options_.cuda_graphs && !decode_.graphs_failed;
  DecodeGraph* graph = nullptr;
  if (graphable && decode_.eager_steps > 0) {
    int32_t longest = 0;
    for (int32_t m : max_lengths) longest = std::max(longest, m);
    absl::StatusOr<DecodeGraph*> captured = GraphFor(longest);
    if (captured.ok()) {
      graph = *captured;
    } else {
      decode_.graphs_failed = true;
      std::fprintf(stderr, "kvmem: CUDA graph capture failed, decoding op by op: %s\n",
                   captured.status().ToString().c_str());
    }
  }
  if (graph != nullptr) {
    // The step's inputs (head tables, position, token) are written into pinned memory laid out
    // as their device block and sent in one asynchronous copy; the previous step's copy is
    // done (FinishPass waited for the stream).
    PassBuffers& b = decode_.buffers;
    const int heads = L * static_cast<int>(kvh);
    uint8_t* in = decode_.step_host;
    auto* keys = reinterpret_cast<T**>(in);
    auto* values = reinterpret_cast<T**>(in + heads * sizeof(void*));
    auto* positions = reinterpret_cast<int64_t**>(in + 2 * heads * sizeof(void*));
    auto* lengths = reinterpret_cast<int32_t*>(in + 3 * heads * sizeof(void*));
    for (int i = 0; i < heads; ++i) {
      const DeviceHead<T>& dh = dkv->heads[i];
      keys[i] = dh.keys(c.head_dim);
      values[i] = dh.values(c.head_dim);
      positions[i] = dh.positions(c.head_dim);
      lengths[i] = static_cast<int32_t>(dh.mirrored.size() + 1);
    }
    std::memcpy(in + decode_.pos_offset, &start_pos, sizeof(int64_t));
    std::memcpy(in + decode_.ids_offset, tokens.data(), sizeof(int32_t));
    KVMEM_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(decode_.step_device, in, decode_.step_bytes, cudaMemcpyHostToDevice, s));
    KVMEM_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graph->exec, s));
    prof_.Mark("decode step (graph)");
    PassBuffers view = b;
    view.observed_q = observed > 0 ? b.observed_q : nullptr;
    return FinishPass(view, n, start_pos, observed, 1, kv, dkv, result, decode_.out_host);
  }

  // 3. Otherwise the pass is launched op by op, with scratch freed in stream order after it.
  if (graphable) ++decode_.eager_steps;
  PassScratch scratch;
  PassBuffers b;
  KVMEM_RETURN_IF_ERROR(AllocatePass(n, n - first_logit, observed, &scratch, &b));
  b.decode_ws_scratch = &scratch.decode_ws;
  if (n > 1) {  // a one-token pass's rows are too few to be worth a second stream
    KVMEM_RETURN_IF_ERROR(PrepareDownloads());
    b.layer_ready = downloads_.ready.data();
  }
  KVMEM_RETURN_IF_ERROR(UploadTables(*dkv, 0, L, n, b.tables));
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(b.ids, tokens.data(), n * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  KVMEM_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(b.pos, &start_pos, sizeof(int64_t), cudaMemcpyHostToDevice, s));
  prof_.Mark("pass buffers, tables, inputs");
  std::function<absl::Status(int)> after_qkv;
  std::vector<float> host_q;  // (n, num_heads, head_dim) for the before_attention hook
  if (options.before_attention) {
    // Recall may change this layer's heads on the host: hand it the queries, then bring the
    // layer's device copy up to date again before the new tokens join it.
    // Only the rows the hook asks for come over (recall reads the turn's last window).
    const int64_t rows =
        options.hook_query_rows > 0 ? std::min<int64_t>(options.hook_query_rows, n) : n;
    after_qkv = [&, rows](int l) -> absl::Status {
      host_q.resize(rows * qd);
      KVMEM_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_q.data(), b.q + (n - rows) * qd,
                                                 rows * qd * sizeof(float), cudaMemcpyDeviceToHost,
                                                 s));
      KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
      KVMEM_RETURN_IF_ERROR(options.before_attention(l, host_q.data(), rows, kv));
      KVMEM_RETURN_IF_ERROR(SyncHeads(*kv, *dkv, l, l + 1));
      for (int g = 0; g < kvh; ++g) {
        DeviceHead<T>& dh = dkv->heads[l * kvh + g];
        KVMEM_RETURN_IF_ERROR(Reserve(*dkv, dh, static_cast<int64_t>(dh.mirrored.size()) + n));
      }
      max_lengths[l] = layer_max_length(l);
      return UploadTables(*dkv, l, l + 1, n, b.tables);
    };
  }
  KVMEM_RETURN_IF_ERROR(
      EnqueuePass(&b, n, start_pos, observed, first_logit, max_lengths, after_qkv));
  KVMEM_RETURN_IF_ERROR(FinishPass(b, n, start_pos, observed, n - first_logit, kv, dkv, result));
  // The observed queries stay on the device, already in the layout SnapKV reads, for the
  // selection at the end of the turn.
  if (observed > 0) {
    dkv->observed = scratch.observed_q.Release();
    dkv->observed_rows = observed;
    dkv->observed_id = next_observed_id++;
    result->observed_queries_on_backend = dkv->observed_id;
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status CudaBackend<T>::PrepareDownloads() {
  if (downloads_.stream != nullptr) return absl::OkStatus();
  const int L = config_.num_layers;
  for (std::vector<cudaEvent_t>* list : {&downloads_.ready, &downloads_.done}) {
    while (static_cast<int>(list->size()) < L) {
      cudaEvent_t e;
      KVMEM_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      list->push_back(e);
    }
  }
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&downloads_.stream, cudaStreamNonBlocking));
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<typename CudaBackend<T>::DecodeGraph*> CudaBackend<T>::GraphFor(int32_t longest) {
  const ModelConfig& c = config_;
  const int L = c.num_layers;
  cudaStream_t s = ctx_->stream;
  // Graphs are keyed by a bucket of the longest head: attention is launched for the bucket's
  // length (shorter heads end early), so one graph serves a whole range of steps.
  const int32_t step = options_.graph_bucket;
  const int32_t bucket = (longest + step - 1) / step * step;
  auto it = decode_.graphs.find(bucket);
  if (it != decode_.graphs.end()) return &it->second;

  if (!decode_.buffers_ready) {
    // Buffers of a one-token pass, at fixed addresses for the graphs' lifetime; published only
    // once every allocation succeeded.
    PassBuffers b;
    const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
    const int64_t inter = c.intermediate_size;
    KVMEM_ASSIGN_OR_RETURN(b.x, AllocWeight<float>(h));
    KVMEM_ASSIGN_OR_RETURN(b.xn, AllocWeight<T>(h));
    KVMEM_ASSIGN_OR_RETURN(b.qkv, AllocWeight<float>(qd + 2 * kvd));
    KVMEM_ASSIGN_OR_RETURN(b.q, AllocWeight<float>(qd));
    if (std::is_same_v<T, float>) {
      b.q_t = reinterpret_cast<T*>(b.q);
    } else {
      KVMEM_ASSIGN_OR_RETURN(b.q_t, AllocWeight<T>(qd));
    }
    KVMEM_ASSIGN_OR_RETURN(b.new_k, AllocWeight<T>(static_cast<size_t>(L) * kvd));
    KVMEM_ASSIGN_OR_RETURN(b.new_v, AllocWeight<T>(static_cast<size_t>(L) * kvd));
    KVMEM_ASSIGN_OR_RETURN(b.attn, AllocWeight<T>(qd));
    KVMEM_ASSIGN_OR_RETURN(b.proj, AllocWeight<float>(h));
    KVMEM_ASSIGN_OR_RETURN(b.gate_up, AllocWeight<float>(2 * inter));
    KVMEM_ASSIGN_OR_RETURN(b.act, AllocWeight<T>(inter));
    KVMEM_ASSIGN_OR_RETURN(b.logits, AllocWeight<float>(c.vocab_size));
    KVMEM_ASSIGN_OR_RETURN(b.observed_q, AllocWeight<float>(static_cast<size_t>(L) * qd));
    // Step inputs, one block: [head tables | position | token id], mirrored in pinned memory.
    const size_t heads = static_cast<size_t>(L) * c.num_kv_heads;
    const size_t table_bytes = heads * (3 * sizeof(void*) + sizeof(int32_t));
    const size_t pos_offset = (table_bytes + 7) / 8 * 8;
    const size_t ids_offset = pos_offset + sizeof(int64_t);
    const size_t step_bytes = ids_offset + sizeof(int64_t);
    KVMEM_ASSIGN_OR_RETURN(uint8_t * step, AllocWeight<uint8_t>(step_bytes));
    b.tables.keys = reinterpret_cast<T**>(step);
    b.tables.values = reinterpret_cast<T**>(step + heads * sizeof(void*));
    b.tables.positions = reinterpret_cast<int64_t**>(step + 2 * heads * sizeof(void*));
    b.tables.lengths = reinterpret_cast<int32_t*>(step + 3 * heads * sizeof(void*));
    b.pos = reinterpret_cast<int64_t*>(step + pos_offset);
    b.ids = reinterpret_cast<int32_t*>(step + ids_offset);
    // Pinned host memory: the step inputs' mirror, and room for a step's results.
    const size_t out_bytes = (c.vocab_size + static_cast<size_t>(L) * qd) * sizeof(float) +
                             2 * static_cast<size_t>(L) * kvd * sizeof(T) + 4 * 8;
    if (decode_.step_host == nullptr) {
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMallocHost(reinterpret_cast<void**>(&decode_.step_host), step_bytes));
    }
    if (decode_.out_host == nullptr) {
      KVMEM_CUDA_RETURN_IF_ERROR(
          cudaMallocHost(reinterpret_cast<void**>(&decode_.out_host), out_bytes));
    }
    decode_.step_device = step;
    decode_.step_bytes = step_bytes;
    decode_.pos_offset = pos_offset;
    decode_.ids_offset = ids_offset;
    decode_.buffers = b;
    decode_.buffers_ready = true;
  }
  PassBuffers& b = decode_.buffers;
  const size_t ws =
      DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim, bucket, options_.decode_split);
  if (ws > b.decode_ws_bytes) {
    // One workspace serves every graph: sized for the model's context (or this bucket, if
    // longer). Growing it retires the graphs that read the old one.
    const size_t want =
        std::max(ws, DecodeAttentionWorkspaceBytes(c.num_heads, c.head_dim,
                                                   std::max(bucket, c.max_position_embeddings),
                                                   options_.decode_split));
    for (auto& [key, old] : decode_.graphs) cudaGraphExecDestroy(old.exec);
    decode_.graphs.clear();
    if (decode_.workspace != nullptr) cudaFreeAsync(decode_.workspace, s);
    decode_.workspace = nullptr;
    b.decode_ws = nullptr;
    b.decode_ws_bytes = 0;
    KVMEM_ASSIGN_OR_RETURN(decode_.workspace, AllocAsync<uint8_t>(want, s));
    b.decode_ws = decode_.workspace;
    b.decode_ws_bytes = want;
  }
  b.decode_ws_scratch = nullptr;

  DecodeGraph graph;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  absl::Status enqueued = EnqueuePass(&b, 1, 0, 1, 0, std::vector<int32_t>(L, bucket), nullptr);
  cudaGraph_t captured = nullptr;
  const cudaError_t end = cudaStreamEndCapture(s, &captured);
  if (!enqueued.ok()) {
    if (captured != nullptr) cudaGraphDestroy(captured);
    cudaGetLastError();
    return enqueued;
  }
  KVMEM_CUDA_RETURN_IF_ERROR(end);
  const cudaError_t inst = cudaGraphInstantiate(&graph.exec, captured, 0);
  cudaGraphDestroy(captured);
  KVMEM_CUDA_RETURN_IF_ERROR(inst);
  return &decode_.graphs.emplace(bucket, graph).first->second;
}

template <typename T>
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const ModelConfig& config,
                                                     const ModelWeights* weights,
                                                     const CudaBackendOptions& options,
                                                     std::shared_ptr<CudaContext> ctx) {
  auto backend = std::make_unique<CudaBackend<T>>(config, options, std::move(ctx));
  KVMEM_RETURN_IF_ERROR(backend->Init(weights));
  return std::unique_ptr<Backend>(std::move(backend));
}

// Every member defined in this file (those of cuda_kv_sync.cc are instantiated there).
template class CudaBackend<float>;
template class CudaBackend<__nv_bfloat16>;
template class CudaBackend<__half>;

}  // namespace cuda_internal

using cuda_internal::CudaContext;
using cuda_internal::CudaStatus;
using cuda_internal::MakeBackend;

bool CudaBackendAvailable(int device, std::string* why) {
  if (!CudaDeviceAvailable(why)) return false;  // driver, runtime and device 0
  int count = 0;
  cudaDeviceProp prop;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count ||
      cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    if (why != nullptr) *why = absl::StrCat("CUDA device ", device, " does not exist");
    return false;
  }
  if (prop.major < 9) {
    if (why != nullptr) {
      *why = absl::StrCat(prop.name, " (device ", device, ") has compute capability ", prop.major,
                          ".", prop.minor, "; kernels are built for 9.0 and newer");
    }
    return false;
  }
  return true;
}

std::vector<CudaOpTime> TakeCudaOpProfile(Backend& backend) {
  auto* source = dynamic_cast<cuda_internal::OpProfileSource*>(&backend);
  return source == nullptr ? std::vector<CudaOpTime>{} : source->TakeOpProfile();
}

CudaUploadStats GetCudaUploadStats(const Backend& backend) {
  auto* source = dynamic_cast<const cuda_internal::OpProfileSource*>(&backend);
  return source == nullptr ? CudaUploadStats{} : source->UploadStats();
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const ModelConfig& config,
                                                           const ModelWeights* weights,
                                                           const CudaBackendOptions& options) {
  std::string why;
  if (!CudaBackendAvailable(options.device, &why)) {
    return absl::UnavailableError(absl::StrCat("no usable CUDA device: ", why));
  }
  if (weights == nullptr && options.random_weights_seed == 0) {
    return absl::InvalidArgumentError("CreateCudaBackend needs weights or a random seed");
  }
  if (config.num_layers <= 0) return absl::InvalidArgumentError("the model has no layers");
  if (config.head_dim > 256 || config.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim ", config.head_dim, " is not supported (even, at most 256)"));
  }
  if (options.decode_split < 0) {
    return absl::InvalidArgumentError("decode_split must be 0 (default) or positive");
  }
  if (options.graph_bucket <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "graph_bucket must be positive (entries per decode graph), got ", options.graph_bucket));
  }
  if (options.pinned_block_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pinned_block_bytes must be >= 0 (0: blocks stay in pageable memory), got ",
                     options.pinned_block_bytes));
  }
  auto ctx = std::make_shared<CudaContext>();
  ctx->device = options.device;
  KVMEM_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  if (options.pinned_block_bytes > 0) {
    KVMEM_RETURN_IF_ERROR(
        InstallPinnedBlockPool(std::make_unique<cuda_internal::CudaHostPinner>(options.device),
                               {.max_bytes = options.pinned_block_bytes}));
  }
  KVMEM_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
  switch (options.dtype) {
    case DeviceDtype::kF32:
      return MakeBackend<float>(config, weights, options, std::move(ctx));
    case DeviceDtype::kF16:
      return MakeBackend<__half>(config, weights, options, std::move(ctx));
    case DeviceDtype::kBF16:
      break;
  }
  return MakeBackend<__nv_bfloat16>(config, weights, options, std::move(ctx));
}

}  // namespace kvmem
