// The torch side of fastpe's CUDA kernels, and the only file that includes torch headers:
// operator schemas (TORCH_LIBRARY), argument checks, allocation of outputs, and calls to the
// launchers of fastpe_kernels.h. Fake (meta) implementations and autograd formulas are
// registered from Python (fastpe/_ext_ops.py).
//
// Built with FASTPE_EMULATION, the same glue registers CPU implementations that run the kernels in
// the CPU emulation (tests only, in a namespace of their own).
//
// Tuning knobs (csrc/attention.cuh, Tiles<T>): query/key tile sizes of the forward and of the two
// backward roles per dtype, kWarps; csrc/rotary.cu: pairs per thread (vec_pairs), kRotaryThreads.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#ifdef FASTPE_EMULATION
#include <ATen/CPUGeneratorImpl.h>
#else
// Light headers only (no cuBLAS/cuSPARSE), so CI can syntax-check this file without a CUDA torch.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "fastpe_kernels.h"

#ifdef FASTPE_EMULATION
#define FASTPE_DISPATCH_KEY CPU
#else
#define FASTPE_DISPATCH_KEY CUDA
#endif
// The ops' namespace, named by the build after a hash of these sources (fastpe._ext.ops_namespace):
// torch.compile's caches key graphs on op names, so a graph cached against other sources misses.
#ifndef FASTPE_OPS_NS
#error "build with -DFASTPE_OPS_NS=<namespace> (setup.py and fastpe._ext name it after the sources)"
#endif
// Indirections so that the namespace macro expands before TORCH_LIBRARY pastes it.
#define FASTPE_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define FASTPE_LIBRARY(ns, m) FASTPE_LIBRARY_(ns, m)
#define FASTPE_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define FASTPE_LIBRARY_IMPL(ns, key, m) FASTPE_LIBRARY_IMPL_(ns, key, m)

namespace {

using at::Tensor;
using fastpe::DType;

constexpr const char* kBackend = "fastpe cuda backend";

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, kBackend, ": ", name, ": expected float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

// Accumulation dtype of the kernels: float64 for float64 inputs, else float32.
at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
DType acc_dtype(const Tensor& t) { return t.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32; }

void check_device(const Tensor& t, const Tensor& like, const char* name) {
#ifdef FASTPE_EMULATION
  TORCH_CHECK(t.device().is_cpu(), kBackend, " (CPU emulation): ", name, ": expected a CPU tensor, got one on ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), kBackend, ": ", name, ": expected a CUDA tensor, got one on ", t.device());
#endif
  TORCH_CHECK(t.device() == like.device(), kBackend, ": ", name, ": expected a tensor on ", like.device(), ", got one on ",
              t.device());
}

void check_dim(const Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, kBackend, ": ", name, ": expected ", dim, " dims ", layout, ", got shape ", t.sizes());
}

// The kernels read rows with strides but need each row's last dim contiguous.
Tensor last_dim_contiguous(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

#ifdef FASTPE_EMULATION
struct DeviceScope {
  explicit DeviceScope(const Tensor&) {}
};
cudaStream_t current_stream() { return nullptr; }
void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kBackend, " (CPU emulation): ", what, " failed: ", fastpe_emu::last_error_message());
}
int64_t max_dynamic_smem() { return 227 * 1024; }
#else
struct DeviceScope {
  explicit DeviceScope(const Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kBackend, ": ", what, " failed: ", cudaGetErrorString(err));
}
int64_t max_dynamic_smem() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}
#endif

// FASTPE_DEBUG_POISON=1 fills every output with NaN before the kernels run, so an element a
// kernel forgets to write fails the tests instead of passing with stale memory.
bool poison_outputs() {
  const char* s = std::getenv("FASTPE_DEBUG_POISON");
  return s != nullptr && s[0] != '\0' && s[0] != '0';
}
void poison(const Tensor& t) {
  if (!poison_outputs() || !t.defined() || t.numel() == 0) return;
  if (t.is_floating_point()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    t.fill_(-7);
  }
}

// Dropout randomness from torch's default generator, so torch.manual_seed reproduces it.
fastpe::PhiloxArgs philox_for_dropout(const Tensor& like) {
  fastpe::PhiloxArgs a;
#ifdef FASTPE_EMULATION
  (void)like;
  auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  a.seed = gen->random64();
  a.offset = gen->random64();
#else
  auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(4);  // each call gets its own offset; the counters inside are ours
  }
  if (st.captured_) {
    a.captured = 1;
    a.seed_ptr = st.seed_.ptr;
    a.offset_ptr = st.offset_.ptr;
    a.offset_intragraph = static_cast<uint64_t>(st.offset_intragraph_);
  } else {
    a.seed = st.seed_.val;
    a.offset = st.offset_.val;
  }
#endif
  return a;
}

// ---------------------------------------------------------------------------------------------
// Relative attention

struct RmhaInputs {
  Tensor q, k, v, rel_k, rel_v, kpm, bias, tau;
};

RmhaInputs check_rmha(fastpe::RmhaParams& p, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& rel_k_,
                      const Tensor& rel_v_, const std::optional<Tensor>& kpm_, const std::optional<Tensor>& bias_,
                      bool is_causal, double dropout_p, double scale, const Tensor* tau_ = nullptr) {
  check_dim(q_, 4, "query", "[B, h, Lq, dh]");
  check_dim(k_, 4, "key", "[B, h, Lk, dh]");
  check_dim(v_, 4, "value", "[B, h, Lk, dv]");
  check_dim(rel_k_, 3, "rel_k", "[1 or h, 2k+1, dh]");
  check_dim(rel_v_, 3, "rel_v", "[1 or h, 2k+1, dv]");
  const int64_t B = q_.size(0), H = q_.size(1), Lq = q_.size(2), dh = q_.size(3);
  const int64_t Lk = k_.size(2), dv = v_.size(3);
  TORCH_CHECK(k_.size(0) == B && k_.size(1) == H && k_.size(3) == dh, kBackend, ": key: expected shape [", B, ", ", H,
              ", Lk, ", dh, "], got ", k_.sizes());
  TORCH_CHECK(v_.size(0) == B && v_.size(1) == H && v_.size(2) == Lk, kBackend, ": value: expected shape [", B, ", ", H,
              ", ", Lk, ", dv], got ", v_.sizes());
  for (const Tensor* t : {&k_, &v_, &rel_k_, &rel_v_}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q_.scalar_type(), kBackend, ": query, key, value and the tables must share one dtype, got ",
                     q_.scalar_type(), " and ", t->scalar_type());
  }
  const int64_t Ht = rel_k_.size(0), NB = rel_k_.size(1);
  const char* rows = tau_ == nullptr ? "2k+1" : "K+1";
  TORCH_CHECK((Ht == 1 || Ht == H) && (tau_ != nullptr || NB % 2 == 1) && NB >= 1 && rel_k_.size(2) == dh, kBackend,
              ": rel_k: expected shape [1 or h=", H, ", ", rows, ", dh=", dh, "], got ", rel_k_.sizes());
  TORCH_CHECK(rel_v_.size(0) == Ht && rel_v_.size(1) == NB && rel_v_.size(2) == dv, kBackend, ": rel_v: expected shape [",
              Ht, ", ", NB, ", dv=", dv, "], got ", rel_v_.sizes());
  // Bucket ids live in 16 bits in shared memory (far beyond what shared memory allows anyway).
  TORCH_CHECK(NB <= 65536, kBackend, ": at most 65536 relative buckets, got ", NB);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kBackend, ": dropout_p must lie in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), kBackend, ": scale must be finite, got ", scale);
  for (const Tensor* t : {&k_, &v_, &rel_k_, &rel_v_}) check_device(*t, q_, "key/value/tables");

  RmhaInputs in;
  in.q = last_dim_contiguous(q_);
  in.k = last_dim_contiguous(k_);
  in.v = last_dim_contiguous(v_);
  in.rel_k = rel_k_.contiguous();
  in.rel_v = rel_v_.contiguous();
  p.dtype = dtype_of(q_, "query");
  p.B = B;
  p.H = H;
  p.Lq = Lq;
  p.Lk = Lk;
  p.dh = dh;
  p.dv = dv;
  p.Ht = Ht;
  p.NB = NB;
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.sq = {in.q.stride(0), in.q.stride(1), in.q.stride(2)};
  p.sk = {in.k.stride(0), in.k.stride(1), in.k.stride(2)};
  p.sv = {in.v.stride(0), in.v.stride(1), in.v.stride(2)};
  p.rel_k = in.rel_k.data_ptr();
  p.rel_v = in.rel_v.data_ptr();
  if (kpm_.has_value() && kpm_->defined()) {
    const Tensor& kpm = *kpm_;
    check_device(kpm, q_, "key_padding_mask");
    TORCH_CHECK_TYPE(kpm.scalar_type() == at::kBool, kBackend, ": key_padding_mask: expected bool (True = padding), got ",
                     kpm.scalar_type());
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == Lk, kBackend, ": key_padding_mask: expected shape [",
                B, ", ", Lk, "], got ", kpm.sizes());
    in.kpm = kpm;
    p.kpm = reinterpret_cast<const uint8_t*>(kpm.data_ptr<bool>());
    p.kpm_sb = kpm.stride(0);
    p.kpm_sl = kpm.stride(1);
  }
  if (bias_.has_value() && bias_->defined()) {
    const Tensor& bias = *bias_;
    check_device(bias, q_, "attn_bias");
    const int64_t full[4] = {B, H, Lq, Lk};
    bool broadcastable = bias.dim() == 4;
    for (int d = 0; broadcastable && d < 4; ++d) broadcastable = bias.size(d) == full[d] || bias.size(d) == 1;
    TORCH_CHECK(broadcastable, kBackend, ": attn_bias: expected a shape broadcastable to [", B, ", ", H, ", ", Lq, ", ", Lk,
                "], got ", bias.sizes());
    in.bias = bias.to(q_.scalar_type()).expand({B, H, Lq, Lk});  // broadcast dims get stride 0
    p.bias = in.bias.data_ptr();
    p.bias_sb = in.bias.stride(0);
    p.bias_sh = in.bias.stride(1);
    p.bias_sq = in.bias.stride(2);
    p.bias_sk = in.bias.stride(3);
  }
  if (tau_ != nullptr) {
    const Tensor& tau = *tau_;
    check_device(tau, q_, "tau");
    TORCH_CHECK_TYPE(tau.scalar_type() == at::kLong || tau.scalar_type() == at::kInt, kBackend,
                     ": tau: expected int64 or int32 time steps, got ", tau.scalar_type());
    TORCH_CHECK(tau.dim() == 2 && tau.size(0) == B && tau.size(1) == Lq, kBackend, ": tau: expected shape [", B, ", ", Lq,
                "], got ", tau.sizes());
    TORCH_CHECK(Lq == Lk, kBackend, ": time-interval attention is self-attention: query and key lengths differ (", Lq,
                " and ", Lk, ")");
    in.tau = tau;
    p.tau = tau.data_ptr();
    p.tau_int64 = tau.scalar_type() == at::kLong ? 1 : 0;
    p.tau_sb = tau.stride(0);
    p.tau_sl = tau.stride(1);
  }
  p.causal = is_causal ? 1 : 0;
  p.tf32 = q_.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  p.scale = scale;
  p.dropout_p = dropout_p;
  return in;
}

void check_smem(int64_t bytes, const fastpe::RmhaParams& p) {
  TORCH_CHECK(bytes <= max_dynamic_smem(), kBackend, ": relative attention with head sizes dh=", p.dh, ", dv=", p.dv,
              " and ", p.NB, " relative buckets needs ", bytes, " bytes of shared memory per block, more than this GPU offers (",
              max_dynamic_smem(), "); use backend='triton' or 'torch' for such heads");
}

std::tuple<Tensor, Tensor, Tensor> bucketed_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rel_k,
                                                const Tensor& rel_v, const Tensor* tau,
                                                const std::optional<Tensor>& key_padding_mask,
                                                const std::optional<Tensor>& attn_bias, bool is_causal, double dropout_p,
                                                double scale) {
  DeviceScope scope(q);
  fastpe::RmhaParams p;
  const RmhaInputs in = check_rmha(p, q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale, tau);
  check_smem(fastpe::rmha_forward_smem_bytes(p), p);
  Tensor out = at::empty({p.B, p.H, p.Lq, p.dv}, q.options());
  Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(acc_type(q)));
  Tensor rng_state = at::empty({2}, q.options().dtype(at::kLong));
  poison(out);
  poison(lse);
  if (dropout_p > 0.0) p.philox = philox_for_dropout(q);
  p.rng_state = rng_state.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  check_launch(fastpe::rmha_forward(p, current_stream()), "relative attention forward");
  return {out, lse, rng_state};
}

std::tuple<Tensor, Tensor, Tensor> relative_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          const Tensor& rel_k, const Tensor& rel_v,
                                                          const std::optional<Tensor>& key_padding_mask,
                                                          const std::optional<Tensor>& attn_bias, bool is_causal,
                                                          double dropout_p, double scale) {
  return bucketed_fwd(q, k, v, rel_k, rel_v, nullptr, key_padding_mask, attn_bias, is_causal, dropout_p, scale);
}

std::tuple<Tensor, Tensor, Tensor> time_interval_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                               const Tensor& rel_k, const Tensor& rel_v, const Tensor& tau,
                                                               const std::optional<Tensor>& key_padding_mask,
                                                               const std::optional<Tensor>& attn_bias, bool is_causal,
                                                               double dropout_p, double scale) {
  return bucketed_fwd(q, k, v, rel_k, rel_v, &tau, key_padding_mask, attn_bias, is_causal, dropout_p, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bucketed_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rel_k, const Tensor& rel_v,
    const Tensor* tau,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& attn_bias, const Tensor& out,
    const Tensor& lse, const Tensor& rng_state, bool is_causal, double dropout_p, double scale) {
  DeviceScope scope(q);
  fastpe::RmhaParams p;
  const RmhaInputs in = check_rmha(p, q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale, tau);
  const std::vector<int64_t> out_shape{p.B, p.H, p.Lq, p.dv};
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape, kBackend,
              ": relative_attention backward: grad_out and out must have shape ", out.sizes(), ", got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.Lq &&
                  lse.scalar_type() == acc_type(q) && lse.is_contiguous(),
              kBackend, ": relative_attention backward: lse must be the forward's contiguous [B, h, Lq] ", acc_type(q),
              " tensor, got ", lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong && rng_state.is_contiguous(), kBackend,
              ": relative_attention backward: rng_state must be the forward's int64 [2] tensor");
  for (const Tensor* t : {&grad_out, &out, &lse, &rng_state}) check_device(*t, q, "saved tensor");
  const Tensor go = last_dim_contiguous(grad_out.to(q.scalar_type()));
  const Tensor o = last_dim_contiguous(out);
  check_smem(fastpe::rmha_backward_smem_bytes(p), p);

  Tensor dq = at::empty({p.B, p.H, p.Lq, p.dh}, q.options());
  Tensor dk = at::empty({p.B, p.H, p.Lk, p.dh}, q.options());
  Tensor dv = at::empty({p.B, p.H, p.Lk, p.dv}, q.options());
  Tensor drk = at::empty({p.Ht, p.NB, p.dh}, q.options());
  Tensor drv = at::empty({p.Ht, p.NB, p.dv}, q.options());
  for (const Tensor* t : {&dq, &dk, &dv, &drk, &drv}) poison(*t);
  Tensor ws = at::empty({fastpe::rmha_backward_workspace_bytes(p)}, q.options().dtype(at::kByte));
  p.grad_out = go.data_ptr();
  p.sgo = {go.stride(0), go.stride(1), go.stride(2)};
  p.out = const_cast<void*>(o.data_ptr());
  p.so = {o.stride(0), o.stride(1), o.stride(2)};
  p.lse = const_cast<void*>(lse.data_ptr());
  p.rng_state = const_cast<int64_t*>(rng_state.data_ptr<int64_t>());
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_rel_k = drk.data_ptr();
  p.grad_rel_v = drv.data_ptr();
  p.workspace = ws.data_ptr();
  check_launch(fastpe::rmha_backward(p, current_stream()), "relative attention backward");
  return {dq, dk, dv, drk, drv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> relative_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rel_k, const Tensor& rel_v,
    const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& attn_bias, const Tensor& out,
    const Tensor& lse, const Tensor& rng_state, bool is_causal, double dropout_p, double scale) {
  return bucketed_bwd(grad_out, q, k, v, rel_k, rel_v, nullptr, key_padding_mask, attn_bias, out, lse, rng_state, is_causal,
                      dropout_p, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> time_interval_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rel_k, const Tensor& rel_v,
    const Tensor& tau, const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& attn_bias,
    const Tensor& out, const Tensor& lse, const Tensor& rng_state, bool is_causal, double dropout_p, double scale) {
  return bucketed_bwd(grad_out, q, k, v, rel_k, rel_v, &tau, key_padding_mask, attn_bias, out, lse, rng_state, is_causal,
                      dropout_p, scale);
}

// ---------------------------------------------------------------------------------------------
// Positions shared by rotary, rotatory and concat-projection: None (0..L-1), [L] or [B, L].

struct Positions {
  fastpe::PosMode mode = fastpe::PosMode::kNone;
  Tensor t;  // int64, contiguous
};

Positions check_positions(const std::optional<Tensor>& positions, const Tensor& like, int64_t B, int64_t L) {
  Positions out;
  if (!positions.has_value() || !positions->defined()) return out;
  const Tensor& pos = *positions;
  check_device(pos, like, "positions");
  TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt, kBackend,
                   ": positions: expected int64 or int32, got ", pos.scalar_type());
  if (pos.dim() == 1) {
    TORCH_CHECK(pos.size(0) == L, kBackend, ": positions: expected shape [L=", L, "] or [B, L], got ", pos.sizes());
    out.mode = fastpe::PosMode::kPerStep;
  } else {
    TORCH_CHECK(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == L, kBackend, ": positions: expected shape [L] or [B=", B,
                ", L=", L, "], got ", pos.sizes());
    out.mode = fastpe::PosMode::kPerToken;
  }
  out.t = pos.to(at::kLong).contiguous();
  return out;
}

// dst[p, :] = sum of src rows [B*L, C] over the tokens at position p, in a fixed order.
Tensor sum_by_position(const Tensor& src, const Positions& pos, int64_t B, int64_t L, int64_t rows_out,
                       at::ScalarType out_type) {
  const int64_t C = src.size(1);
  Tensor dst = at::empty({rows_out, C}, src.options().dtype(out_type));
  poison(dst);
  fastpe::RowSumParams rs;
  rs.src_dtype = dtype_of(src, "gradient");
  rs.dst_dtype = dtype_of(dst, "gradient");
  rs.src = src.data_ptr();
  rs.src_row_stride = src.stride(0);
  rs.cols = C;
  rs.dst = dst.data_ptr();
  rs.rows_out = rows_out;
  Tensor order, starts;
  if (pos.mode == fastpe::PosMode::kNone) {  // token b*L + l sits at position l
    rs.mode = fastpe::RowListMode::kStrided;
    rs.count = B;
    rs.base_mult = 1;
    rs.inner = 1;
    rs.outer_stride = L;
    rs.valid_rows = L < rows_out ? L : rows_out;
  } else {  // a stable sort groups the tokens of each position in token order
    const Tensor flat = pos.t.expand({B, L}).reshape({B * L});
    Tensor sorted;
    std::tie(sorted, order) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    starts = at::searchsorted(sorted, at::arange(rows_out + 1, flat.options()));
    rs.mode = fastpe::RowListMode::kSorted;
    rs.order = order.data_ptr<int64_t>();
    rs.starts = starts.data_ptr<int64_t>();
    rs.total = B * L;
  }
  const Tensor scratch = at::empty({fastpe::row_sum_workspace_bytes(rs)}, src.options().dtype(at::kByte));
  rs.workspace = scratch.data_ptr();
  check_launch(fastpe::row_sum(rs, current_stream()), "position reduction");
  return dst;
}

// ---------------------------------------------------------------------------------------------
// Rotary / Rotatory

fastpe::RotaryParams rotary_params(const Tensor& x, const Tensor& angles_acc, const Positions& pos, fastpe::PairMode mode) {
  fastpe::RotaryParams p;
  p.dtype = dtype_of(x, "x");
  p.mode = mode;
  p.B = x.size(0);
  p.L = x.size(1);
  p.H = x.size(2);
  p.D = x.size(3);
  p.angles = angles_acc.data_ptr();
  p.angle_stride = angles_acc.stride(0);
  p.pos_mode = pos.mode;
  p.positions = pos.t.defined() ? pos.t.data_ptr<int64_t>() : nullptr;
  return p;
}

void check_angles(const Tensor& angles, const Tensor& x, int64_t pairs) {
  check_device(angles, x, "angles");
  check_dim(angles, 2, "angles", "[max_len, D/2]");
  TORCH_CHECK(angles.size(1) == pairs, kBackend, ": angles: expected ", pairs, " angles per position, got shape ", angles.sizes());
  dtype_of(angles, "angles");
}

// x as [B, L, H, D] with its strides (a [B, L, d] tensor is one head).
void set_x(fastpe::RotaryParams& p, const Tensor& x4) {
  p.x = x4.data_ptr();
  for (int d = 0; d < 4; ++d) p.sx[d] = x4.stride(d);
}

Tensor rotary_fwd(const Tensor& x, const Tensor& angles, const std::optional<Tensor>& positions, bool interleaved) {
  DeviceScope scope(x);
  check_dim(x, 4, "x", "[B, L, H, D]");
  TORCH_CHECK(x.size(3) % 2 == 0, kBackend, ": x: the feature size must be even, got shape ", x.sizes());
  check_angles(angles, x, x.size(3) / 2);
  const Positions pos = check_positions(positions, x, x.size(0), x.size(1));
  const Tensor ang = angles.to(acc_type(x)).contiguous();
  fastpe::RotaryParams p = rotary_params(x, ang, pos, interleaved ? fastpe::PairMode::kInterleaved : fastpe::PairMode::kHalf);
  set_x(p, x);
  Tensor y = at::empty(x.sizes(), x.options());
  poison(y);
  p.y = y.data_ptr();
  check_launch(fastpe::rotary_forward(p, current_stream()), "rotary forward");
  return y;
}

std::tuple<Tensor, Tensor> rotary_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& angles,
                                      const std::optional<Tensor>& positions, bool interleaved, bool angles_grad) {
  DeviceScope scope(x);
  check_dim(x, 4, "x", "[B, L, H, D]");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), kBackend, ": rotary backward: grad_y must have x's shape ", x.sizes(), ", got ",
              grad_y.sizes());
  check_device(grad_y, x, "grad_y");
  check_angles(angles, x, x.size(3) / 2);
  const Positions pos = check_positions(positions, x, x.size(0), x.size(1));
  const Tensor ang = angles.to(acc_type(x)).contiguous();
  const Tensor gy = grad_y.to(x.scalar_type());
  fastpe::RotaryParams p = rotary_params(x, ang, pos, interleaved ? fastpe::PairMode::kInterleaved : fastpe::PairMode::kHalf);
  set_x(p, x);
  p.grad_y = gy.data_ptr();
  for (int d = 0; d < 4; ++d) p.sgy[d] = gy.stride(d);
  Tensor dx = at::empty(x.sizes(), x.options());
  poison(dx);
  p.grad_x = dx.data_ptr();
  Tensor partials;
  if (angles_grad) {
    partials = at::empty({p.B * p.L, p.D / 2}, x.options().dtype(acc_type(x)));
    p.angle_partials = partials.data_ptr();
  }
  check_launch(fastpe::rotary_backward(p, current_stream()), "rotary backward");
  Tensor dangles = angles_grad ? sum_by_position(partials, pos, p.B, p.L, angles.size(0), angles.scalar_type())
                               : at::empty({0}, angles.options());
  return {dx, dangles};
}

Tensor rotatory_add_fwd(const Tensor& x, const Tensor& angles, const std::optional<Tensor>& positions) {
  DeviceScope scope(x);
  check_dim(x, 3, "x", "[B, L, d]");
  TORCH_CHECK(x.size(2) % 2 == 0, kBackend, ": x: the feature size d must be even, got shape ", x.sizes());
  check_angles(angles, x, x.size(2) / 2);
  const Positions pos = check_positions(positions, x, x.size(0), x.size(1));
  const Tensor ang = angles.to(acc_type(x)).contiguous();
  const Tensor x4 = x.unsqueeze(2);
  fastpe::RotaryParams p = rotary_params(x4, ang, pos, fastpe::PairMode::kAdd);
  set_x(p, x4);
  Tensor y = at::empty(x.sizes(), x.options());
  poison(y);
  p.y = y.data_ptr();
  check_launch(fastpe::rotary_forward(p, current_stream()), "rotatory forward");
  return y;
}

Tensor rotatory_add_bwd(const Tensor& grad_y, const Tensor& angles, const std::optional<Tensor>& positions) {
  DeviceScope scope(grad_y);
  check_dim(grad_y, 3, "grad_y", "[B, L, d]");
  check_angles(angles, grad_y, grad_y.size(2) / 2);
  dtype_of(grad_y, "grad_y");
  const Positions pos = check_positions(positions, grad_y, grad_y.size(0), grad_y.size(1));
  const Tensor ang = angles.to(acc_type(grad_y)).contiguous();
  const Tensor gy4 = grad_y.unsqueeze(2);
  fastpe::RotaryParams p = rotary_params(gy4, ang, pos, fastpe::PairMode::kAdd);
  p.grad_y = gy4.data_ptr();
  for (int d = 0; d < 4; ++d) p.sgy[d] = gy4.stride(d);
  Tensor partials = at::empty({p.B * p.L, p.D / 2}, grad_y.options().dtype(acc_type(grad_y)));
  p.angle_partials = partials.data_ptr();
  check_launch(fastpe::rotary_backward(p, current_stream()), "rotatory backward");
  return sum_by_position(partials, pos, p.B, p.L, angles.size(0), angles.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Concat-projection: y = x Wx^T + (E Wp^T + b)[p]

struct ConcatShapes {
  int64_t B, L, d_in, d_pos, d_out, P;
};

ConcatShapes check_concat(const Tensor& x, const Tensor& table, const Tensor& weight) {
  check_dim(x, 3, "x", "[B, L, d_in]");
  check_dim(table, 2, "table", "[max_len, d_pos]");
  check_dim(weight, 2, "weight", "[d_out, d_in + d_pos]");
  check_device(table, x, "table");
  check_device(weight, x, "weight");
  dtype_of(x, "x");
  for (const Tensor* t : {&table, &weight}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), kBackend, ": x, table, weight and bias must share one dtype, got ",
                     x.scalar_type(), " and ", t->scalar_type());
  }
  ConcatShapes s{x.size(0), x.size(1), x.size(2), table.size(1), weight.size(0), table.size(0)};
  TORCH_CHECK(weight.size(1) == s.d_in + s.d_pos, kBackend, ": weight: expected shape [d_out, d_in + d_pos = ", s.d_in, " + ",
              s.d_pos, "], got ", weight.sizes());
  return s;
}

// The table rows the position term is computed for: the first L rows (no positions) or all.
Tensor position_rows(const Tensor& table, const Positions& pos, int64_t L) {
  if (pos.mode == fastpe::PosMode::kNone) {
    TORCH_CHECK(L <= table.size(0), kBackend, ": sequence length ", L, " exceeds the table's ", table.size(0), " positions");
    return table.narrow(0, 0, L);
  }
  return table;
}

Tensor concat_projection_fwd(const Tensor& x, const Tensor& table, const Tensor& weight, const std::optional<Tensor>& bias,
                             const std::optional<Tensor>& positions) {
  DeviceScope scope(x);
  const ConcatShapes s = check_concat(x, table, weight);
  const Positions pos = check_positions(positions, x, s.B, s.L);
  const Tensor w_x = weight.narrow(1, 0, s.d_in), w_pos = weight.narrow(1, s.d_in, s.d_pos);
  const Tensor rows = position_rows(table, pos, s.L);
  Tensor term;  // [rows, d_out], the bias folded in
  if (bias.has_value() && bias->defined()) {
    check_device(*bias, x, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.d_out, kBackend, ": bias: expected shape [", s.d_out, "], got ",
                bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), kBackend, ": bias: expected dtype ", x.scalar_type(), ", got ",
                     bias->scalar_type());
    term = at::addmm(*bias, rows, w_pos.t());
  } else {
    term = at::mm(rows, w_pos.t());
  }
  Tensor y = at::mm(x.reshape({s.B * s.L, s.d_in}), w_x.t());
  fastpe::PositionAddParams p;
  p.dtype = dtype_of(x, "x");
  p.y = y.data_ptr();
  p.rows = term.data_ptr();
  p.B = s.B;
  p.L = s.L;
  p.C = s.d_out;
  p.pos_mode = pos.mode;
  p.positions = pos.t.defined() ? pos.t.data_ptr<int64_t>() : nullptr;
  check_launch(fastpe::position_add(p, current_stream()), "concat_projection epilogue");
  return y.view({s.B, s.L, s.d_out});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> concat_projection_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& table,
                                                                 const Tensor& weight, const std::optional<Tensor>& positions,
                                                                 bool has_bias) {
  DeviceScope scope(x);
  const ConcatShapes s = check_concat(x, table, weight);
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(0) == s.B && grad_y.size(1) == s.L && grad_y.size(2) == s.d_out, kBackend,
              ": concat_projection backward: grad_y must have shape [", s.B, ", ", s.L, ", ", s.d_out, "], got ", grad_y.sizes());
  check_device(grad_y, x, "grad_y");
  const Positions pos = check_positions(positions, x, s.B, s.L);
  const Tensor w_x = weight.narrow(1, 0, s.d_in), w_pos = weight.narrow(1, s.d_in, s.d_pos);
  const Tensor rows = position_rows(table, pos, s.L);
  const Tensor gy = grad_y.to(x.scalar_type()).reshape({s.B * s.L, s.d_out}).contiguous();
  const Tensor x2 = x.reshape({s.B * s.L, s.d_in});

  const Tensor dx = at::mm(gy, w_x).view({s.B, s.L, s.d_in});
  const Tensor dw_x = at::mm(gy.t(), x2);
  // Gradient of the position term, per table row, summed over tokens in a fixed order.
  const Tensor dterm = sum_by_position(gy, pos, s.B, s.L, rows.size(0), acc_type(x));
  const Tensor dbias = has_bias ? dterm.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  const Tensor dterm_x = dterm.to(x.scalar_type());
  const Tensor dw_pos = at::mm(dterm_x.t(), rows);
  Tensor drows = at::mm(dterm_x, w_pos);
  Tensor dtable = rows.size(0) == s.P ? drows : at::constant_pad_nd(drows, {0, 0, 0, s.P - rows.size(0)}, 0);
  return {dx, dtable, at::cat({dw_x, dw_pos}, 1), dbias};
}

// Philox4x32-10 on the host: (counter[4], key[2]) rows of an int64 [N, 6] tensor -> [N, 4].
Tensor philox_host(const Tensor& inputs) {
  TORCH_CHECK(inputs.device().is_cpu() && inputs.scalar_type() == at::kLong && inputs.dim() == 2 && inputs.size(1) == 6,
              kBackend, ": philox_host expects a CPU int64 [N, 6] tensor");
  const Tensor in = inputs.contiguous();
  Tensor out = at::empty({in.size(0), 4}, in.options());
  const int64_t* src = in.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t n = 0; n < in.size(0); ++n) {
    uint32_t ctr[4], key[2], r[4];
    for (int e = 0; e < 4; ++e) ctr[e] = static_cast<uint32_t>(src[n * 6 + e]);
    for (int e = 0; e < 2; ++e) key[e] = static_cast<uint32_t>(src[n * 6 + 4 + e]);
    fastpe::philox4x32_10_host(ctr, key, r);
    for (int e = 0; e < 4; ++e) dst[n * 4 + e] = r[e];
  }
  return out;
}

}  // namespace

// One schema per line: tests/test_cuda_registration.py reads them from this file.
FASTPE_LIBRARY(FASTPE_OPS_NS, m) {
  m.def("relative_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor rel_k, Tensor rel_v, Tensor? key_padding_mask, Tensor? attn_bias, bool is_causal, float dropout_p, float scale) -> (Tensor, Tensor, Tensor)", {at::Tag::nondeterministic_seeded});
  m.def("relative_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor rel_k, Tensor rel_v, Tensor? key_padding_mask, Tensor? attn_bias, Tensor out, Tensor lse, Tensor rng_state, bool is_causal, float dropout_p, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("time_interval_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor rel_k, Tensor rel_v, Tensor tau, Tensor? key_padding_mask, Tensor? attn_bias, bool is_causal, float dropout_p, float scale) -> (Tensor, Tensor, Tensor)", {at::Tag::nondeterministic_seeded});
  m.def("time_interval_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor rel_k, Tensor rel_v, Tensor tau, Tensor? key_padding_mask, Tensor? attn_bias, Tensor out, Tensor lse, Tensor rng_state, bool is_causal, float dropout_p, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rotary_fwd(Tensor x, Tensor angles, Tensor? positions, bool interleaved) -> Tensor");
  m.def("rotary_bwd(Tensor grad_y, Tensor x, Tensor angles, Tensor? positions, bool interleaved, bool angles_grad) -> (Tensor, Tensor)");
  m.def("rotatory_add_fwd(Tensor x, Tensor angles, Tensor? positions) -> Tensor");
  m.def("rotatory_add_bwd(Tensor grad_y, Tensor angles, Tensor? positions) -> Tensor");
  m.def("concat_projection_fwd(Tensor x, Tensor table, Tensor weight, Tensor? bias, Tensor? positions) -> Tensor");
  m.def("concat_projection_bwd(Tensor grad_y, Tensor x, Tensor table, Tensor weight, Tensor? positions, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("philox_host(Tensor inputs) -> Tensor");
}

FASTPE_LIBRARY_IMPL(FASTPE_OPS_NS, FASTPE_DISPATCH_KEY, m) {
  m.impl("relative_attention_fwd", &relative_attention_fwd);
  m.impl("relative_attention_bwd", &relative_attention_bwd);
  m.impl("time_interval_attention_fwd", &time_interval_attention_fwd);
  m.impl("time_interval_attention_bwd", &time_interval_attention_bwd);
  m.impl("rotary_fwd", &rotary_fwd);
  m.impl("rotary_bwd", &rotary_bwd);
  m.impl("rotatory_add_fwd", &rotatory_add_fwd);
  m.impl("rotatory_add_bwd", &rotatory_add_bwd);
  m.impl("concat_projection_fwd", &concat_projection_fwd);
  m.impl("concat_projection_bwd", &concat_projection_bwd);
}

FASTPE_LIBRARY_IMPL(FASTPE_OPS_NS, CPU, m) { m.impl("philox_host", &philox_host); }
