// Host-side interface of fastpe's CUDA kernels: plain structs of raw pointers, sizes and strides,
// and launchers that take a cudaStream_t. No torch headers here or in any .cu file; the torch glue
// lives in bindings.cpp alone, so every kernel file compiles with a bare nvcc (see
// tests/test_csrc_compile.py).
//
// Conventions: sizes and strides are in elements; every launcher returns the launch error
// (cudaSuccess when nothing went wrong) and never synchronizes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastpe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Dropout randomness. torch's CUDA generator hands out a Philox (seed, offset) pair; while a CUDA
// graph is being captured they live in device memory (seed_ptr/offset_ptr + offset_intragraph).
// Kernels resolve them on the device, so a captured graph replays with fresh randomness.
struct PhiloxArgs {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  int captured = 0;
};

// ----------------------------------------------------------------------------------------------
// Relative attention, one kernel family for two bucket functions:
//   RMHA-k (tau == nullptr):    r(i, j) = clamp(j - i, -k, k) + k,  NB = 2k+1
//   time intervals (TiSASRec):  r(i, j) = min(|tau_i - tau_j|, K),   NB = K+1, tau [B, L]
// q [B,h,Lq,dh], k [B,h,Lk,dh], v [B,h,Lk,dv]: strides for the first three dims, the last dim
// contiguous. rel_k [Ht,NB,dh], rel_v [Ht,NB,dv] contiguous.
struct AttnStrides {
  int64_t b = 0, h = 0, l = 0;
};

struct RmhaParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, dh = 0, dv = 0;
  int64_t Ht = 1;  // table heads: 1 (shared) or H
  int64_t NB = 1;  // table rows: 2k+1, or K+1 with tau
  // Time steps of the time-interval buckets (self-attention, Lq == Lk): int32 or int64 [B, L].
  const void* tau = nullptr;
  int tau_int64 = 1;
  int64_t tau_sb = 0, tau_sl = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  AttnStrides sq, sk, sv;
  const void* rel_k = nullptr;
  const void* rel_v = nullptr;
  // Masks. key_padding_mask: bool [B, Lk] (nonzero = padding). bias: [B,H,Lq,Lk] in the input
  // dtype, any strides (0 for broadcast dims), may hold -inf.
  const uint8_t* kpm = nullptr;
  int64_t kpm_sb = 0, kpm_sl = 0;
  const void* bias = nullptr;
  int64_t bias_sb = 0, bias_sh = 0, bias_sq = 0, bias_sk = 0;
  int causal = 0;
  // float32 inputs: block GEMMs on the tensor cores in TF32 (10-bit mantissa, fp32 accumulation)
  // instead of exact fp32 FMAs; set from torch.backends.cuda.matmul.allow_tf32.
  int tf32 = 0;
  double scale = 1.0;
  double dropout_p = 0.0;
  PhiloxArgs philox;       // forward: where to draw from
  int64_t* rng_state = nullptr;  // forward writes (seed, offset) here; backward reads it
  // Forward outputs: out [B,H,Lq,dv] contiguous; lse [B,H,Lq] (float32, float64 for float64
  // inputs), the log of each row's softmax normalizer, +inf for rows without an allowed key.
  void* out = nullptr;
  void* lse = nullptr;
  // Backward inputs/outputs.
  const void* grad_out = nullptr;
  AttnStrides sgo;
  AttnStrides so;  // strides of `out` when read back in the backward
  void* grad_q = nullptr;  // contiguous [B,H,Lq,dh]
  void* grad_k = nullptr;  // contiguous [B,H,Lk,dh]
  void* grad_v = nullptr;  // contiguous [B,H,Lk,dv]
  void* grad_rel_k = nullptr;  // contiguous [Ht,NB,dh]
  void* grad_rel_v = nullptr;  // contiguous [Ht,NB,dv]
  void* workspace = nullptr;   // rmha_backward_workspace_bytes() bytes, no initialization needed
};

// Bytes of dynamic shared memory the kernels need, 0 when the head sizes are not supported.
int64_t rmha_forward_smem_bytes(const RmhaParams& p);
int64_t rmha_backward_smem_bytes(const RmhaParams& p);
int64_t rmha_backward_workspace_bytes(const RmhaParams& p);
cudaError_t rmha_forward(const RmhaParams& p, cudaStream_t stream);
cudaError_t rmha_backward(const RmhaParams& p, cudaStream_t stream);

// ----------------------------------------------------------------------------------------------
// Rotary (rotate feature pairs by per-position angles) and Rotatory (add a per-position code).
enum class PairMode : int { kHalf = 0, kInterleaved = 1, kAdd = 2 };
enum class PosMode : int { kNone = 0, kPerStep = 1, kPerToken = 2 };  // None, [L], [B, L]

struct RotaryParams {
  DType dtype = DType::kFloat32;   // of x, y, grad_y, grad_x
  PairMode mode = PairMode::kHalf;
  int64_t B = 0, L = 0, H = 1, D = 0;  // x [B, L, H, D]
  const void* x = nullptr;
  int64_t sx[4] = {0, 0, 0, 0};
  const void* angles = nullptr;    // [P, D/2]; float32, or float64 when x is float64; row stride below
  int64_t angle_stride = 0;
  PosMode pos_mode = PosMode::kNone;
  const int64_t* positions = nullptr;  // [L] or [B, L] contiguous
  void* y = nullptr;                   // forward output, contiguous [B, L, H, D]
  const void* grad_y = nullptr;
  int64_t sgy[4] = {0, 0, 0, 0};
  void* grad_x = nullptr;              // contiguous [B, L, H, D]; null: not wanted
  void* angle_partials = nullptr;      // [B*L, D/2] float32 (float64 for float64 x); null: not wanted
};

cudaError_t rotary_forward(const RotaryParams& p, cudaStream_t stream);
// grad_x (rotate modes) and/or the per-token angle gradients summed over heads.
cudaError_t rotary_backward(const RotaryParams& p, cudaStream_t stream);

// ----------------------------------------------------------------------------------------------
// Deterministic row sums: dst[p, c] = sum over the source rows listed for p of src[row, c], in a
// fixed order (no atomics), so the result is bitwise reproducible.
//   kStrided: the rows for p are  p*base_mult + (e / inner)*outer_stride + (e % inner),  e < count
//             (rows p >= valid_rows get 0);
//   kSorted:  the rows for p are  order[starts[p] + e],  e < starts[p+1] - starts[p]
//             (`total` entries in order).
// Long lists are split into segments summed by separate blocks into `workspace`, then added in
// segment order by a second launch (row_sum_workspace_bytes() says how much; 0: one launch).
enum class RowListMode : int { kStrided = 0, kSorted = 1 };

struct RowSumParams {
  DType src_dtype = DType::kFloat32;
  DType dst_dtype = DType::kFloat32;
  const void* src = nullptr;
  int64_t src_row_stride = 0;
  int64_t cols = 0;
  void* dst = nullptr;  // contiguous [rows_out, cols]
  int64_t rows_out = 0;
  RowListMode mode = RowListMode::kStrided;
  int64_t count = 0, base_mult = 0, inner = 1, outer_stride = 0, valid_rows = 0;
  const int64_t* order = nullptr;
  const int64_t* starts = nullptr;
  int64_t total = 0;
  void* workspace = nullptr;
};

int64_t row_sum_workspace_bytes(const RowSumParams& p);
cudaError_t row_sum(const RowSumParams& p, cudaStream_t stream);

// ----------------------------------------------------------------------------------------------
// Concat-projection epilogue: y[t, :] += rows[pos(t), :] in place, y [B*L, C] contiguous, rows
// [R, C] contiguous (the position term with the bias folded in), both in `dtype`.
struct PositionAddParams {
  DType dtype = DType::kFloat32;
  void* y = nullptr;
  const void* rows = nullptr;
  int64_t B = 0, L = 0, C = 0;
  PosMode pos_mode = PosMode::kNone;
  const int64_t* positions = nullptr;
};

cudaError_t position_add(const PositionAddParams& p, cudaStream_t stream);

// Philox4x32-10 on the host, the generator the dropout masks are drawn from (tests check it
// against the Random123 known-answer vectors).
void philox4x32_10_host(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

}  // namespace fastpe

#ifdef FASTPE_EMULATION
namespace fastpe_emu {
// Why the last emulated launch failed (the CPU emulation used by the tests).
const char* last_error_message();
}  // namespace fastpe_emu
#endif
