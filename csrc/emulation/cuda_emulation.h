// A small CPU emulation of the CUDA execution model, enough to run fastpe's kernels unchanged on
// a machine without a GPU (tests/test_cuda_emulated.py). It is a test tool, not a backend.
//
// Each block runs on one OS thread; its CUDA threads are coroutines (ucontext) that switch only
// at __syncthreads, __syncwarp and warp shuffles, so barriers, shared memory and warp reductions
// behave as on the GPU. Warps advance one at a time between block barriers, in an order set by
// FASTPE_EMU_ORDER (shuffle (default) | forward | reverse), and the threads of a round run in
// that order too, so a missing barrier shows up as a wrong result. Dynamic shared memory starts as NaN bytes, so reading what was never
// written poisons the result. WMMA fragments hold whole 16x16 tiles in every lane (the real
// layout is opaque to the kernels); loads check the alignment rules of the real API.
#pragma once

#ifndef FASTPE_EMULATION
#error "cuda_emulation.h is only for the CPU emulation build (define FASTPE_EMULATION)"
#endif

// Defined before the CUDA headers so that host_defines.h keeps these: they must vanish (or, for
// __shared__, become block-wide statics) in a host compile.
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

namespace fastpe_emu {

// The CUDA thread running now, and its block.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_smem();

void sync_threads();
void sync_warp();
// Exchange 8 bytes with lane (lane ^ mask) of the same warp.
uint64_t shuffle_xor_bits(uint64_t bits, int mask);

// Records the first error of the current launch (e.g. a WMMA alignment violation).
void fail(const char* message);

// Runs kernel body `body` for every block of `grid` with `block` threads; synchronous.
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
cudaError_t last_error();
const char* last_error_message();

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args&&... args) {
  return run_grid(grid, block, smem, [&]() { kernel(args...); });
}

template <typename T> T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle_xor_bits(bits, mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace fastpe_emu

#define threadIdx (::fastpe_emu::thread_idx())
#define blockIdx (::fastpe_emu::block_idx())
#define blockDim (::fastpe_emu::block_dim())
#define gridDim (::fastpe_emu::grid_dim())

inline void __syncthreads() { ::fastpe_emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::fastpe_emu::sync_warp(); }
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return ::fastpe_emu::shfl_xor(v, mask);
}

#define FASTPE_DYNAMIC_SMEM(name) unsigned char* name = ::fastpe_emu::dynamic_smem()
#define FASTPE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::fastpe_emu::launch(kernel, grid, block, smem, __VA_ARGS__))
#define cudaGetLastError ::fastpe_emu::last_error

namespace fastpe {
template <auto Kernel> inline cudaError_t allow_dynamic_smem(int64_t) { return cudaSuccess; }
}  // namespace fastpe

// ---------------------------------------------------------------------------------------------
// WMMA, m16n16k16 with fp16/bf16 operands and fp32 accumulators.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace precision {
struct tf32 {};  // fp32 storage, 10-bit mantissa in the multiply (m16n16k8)
}  // namespace precision

// Every fragment holds a whole 16x16 tile (m16n16k8 operands use 16x8 / 8x16 of it); x[] is the
// per-element view kernels use for conversions.
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || (K == 8 && (std::is_same<T, precision::tf32>::value ||
                                                               std::is_same<T, float>::value))),
                "only m16n16k16 (fp16/bf16) and m16n16k8 (tf32) are emulated");
  static constexpr int num_elements = 256;
  union {
    float v[16][16];
    float x[256];
  };
};

// Round to TF32 (10-bit mantissa), to nearest with ties away from zero, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &bits, 4);
  return f;
}

// TF32 operands: matrix_a is 16x8 (rows x k), matrix_b 8x16, from fp32 memory.
template <typename Use, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 8, precision::tf32, Layout>& f, const float* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::fastpe_emu::fail("wmma::load_matrix_sync: pointer not 256-bit aligned");
  if (ldm % 4 != 0) ::fastpe_emu::fail("wmma::load_matrix_sync: ldm not a multiple of 16 bytes");
  const int rows = std::is_same<Use, matrix_a>::value ? 16 : 8, cols = std::is_same<Use, matrix_a>::value ? 8 : 16;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = r < rows && c < cols ? (std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[r + c * ldm]) : 0.0f;
}

inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> inline void check_operand(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::fastpe_emu::fail("wmma::load_matrix_sync: pointer not 256-bit aligned");
  if (ldm % (16 / sizeof(T)) != 0) ::fastpe_emu::fail("wmma::load_matrix_sync: ldm not a multiple of 16 bytes");
}

// element (r, c) of a row-major tile is p[r*ldm + c], of a col-major tile p[r + c*ldm]
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = to_f(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[r + c * ldm]);
}

inline void check_acc(const float* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::fastpe_emu::fail("wmma accumulator: pointer not 256-bit aligned");
  if (ldm % 4 != 0) ::fastpe_emu::fail("wmma accumulator: ldm not a multiple of 16 bytes");
}

template <int K>
inline void load_matrix_sync(fragment<accumulator, 16, 16, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_acc(p, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = l == mem_row_major ? p[r * ldm + c] : p[r + c * ldm];
}

// Collective: every lane must have loaded its operands before any lane overwrites them.
template <int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t l) {
  check_acc(p, ldm);
  ::fastpe_emu::sync_warp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.v[r][c];
  ::fastpe_emu::sync_warp();
}

template <int K>
inline void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < 16; ++k) acc += a.v[m][k] * b.v[k][n];
      out.v[m][n] = acc;
    }
  d = out;
}

template <typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 8, float>& d, const fragment<matrix_a, 16, 16, 8, precision::tf32, LA>& a,
                     const fragment<matrix_b, 16, 16, 8, precision::tf32, LB>& b,
                     const fragment<accumulator, 16, 16, 8, float>& c) {
  fragment<accumulator, 16, 16, 8, float> out;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m][n];
      for (int k = 0; k < 8; ++k) acc += a.v[m][k] * b.v[k][n];
      out.v[m][n] = acc;
    }
  d = out;
}

}  // namespace wmma
}  // namespace nvcuda
