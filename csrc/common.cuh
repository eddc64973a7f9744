// Shared device helpers: dtype traits and conversions, warp reductions, vector loads, the Philox
// generator behind dropout, and the relative-position bucket. No torch headers.
//
// Compiled by nvcc for the GPU, or (with FASTPE_EMULATION defined) by a host C++ compiler against
// emulation/cuda_emulation.h, which runs the same kernels on the CPU for the tests.
#pragma once

#ifdef FASTPE_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#define FASTPE_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define FASTPE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#include <atomic>

namespace fastpe {
// Kernels with more than 48 KiB of dynamic shared memory must opt in, once per device.
template <auto Kernel>
inline cudaError_t allow_dynamic_smem(int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<int64_t> allowed[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::atomic<int64_t>& slot = allowed[device & 63];
  if (slot.load() >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) slot.store(bytes);
  return err;
}
}  // namespace fastpe
#endif

#include <cmath>
#include <cstdint>

#include "fastpe_kernels.h"

#define FASTPE_HD __host__ __device__ __forceinline__
// `#pragma unroll` for the device pass only (host compilers warn about it in __host__ code).
#if defined(__CUDA_ARCH__)
#define FASTPE_UNROLL _Pragma("unroll")
#else
#define FASTPE_UNROLL
#endif
#define FASTPE_D __device__ __forceinline__

namespace fastpe {

// ---------------------------------------------------------------------------------------------
// Types. Arithmetic happens in Acc<T>: float for the 16-bit types and float32, double for float64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

// The torch extension build defines __CUDA_NO_HALF_CONVERSIONS__: convert with intrinsics only.
FASTPE_HD float to_acc(float x) { return x; }
FASTPE_HD double to_acc(double x) { return x; }
FASTPE_HD float to_acc(__half x) { return __half2float(x); }
FASTPE_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> FASTPE_HD T from_acc(float x);
template <> FASTPE_HD float from_acc<float>(float x) { return x; }
template <> FASTPE_HD __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> FASTPE_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> FASTPE_HD double from_acc<double>(float x) { return x; }
template <typename T> FASTPE_HD T from_acc(double x);
template <> FASTPE_HD double from_acc<double>(double x) { return x; }
template <> FASTPE_HD float from_acc<float>(double x) { return static_cast<float>(x); }
template <> FASTPE_HD __half from_acc<__half>(double x) { return __float2half_rn(static_cast<float>(x)); }
template <> FASTPE_HD __nv_bfloat16 from_acc<__nv_bfloat16>(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }

template <typename T> FASTPE_HD T zero_value() { return from_acc<T>(0.0f); }

FASTPE_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx: ~2 ulp, exp(-inf) = 0
#else
  return std::exp(x);
#endif
}
FASTPE_HD double fast_exp(double x) { return exp(x); }
FASTPE_HD float safe_log(float x) { return logf(x); }
FASTPE_HD double safe_log(double x) { return log(x); }
FASTPE_HD void sin_cos(float t, float* s, float* c) { sincosf(t, s, c); }
FASTPE_HD void sin_cos(double t, double* s, double* c) { sincos(t, s, c); }

template <typename A> FASTPE_HD A neg_inf() { return -static_cast<A>(INFINITY); }
template <typename A> FASTPE_HD A pos_inf() { return static_cast<A>(INFINITY); }

FASTPE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FASTPE_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// Warp reductions (butterfly: every lane ends with the same value, in a fixed order).
template <typename A> FASTPE_D A warp_sum(A v) {
FASTPE_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A> FASTPE_D A warp_max(A v) {
FASTPE_UNROLL
  for (int o = 16; o > 0; o >>= 1) {
    A other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// N contiguous elements as one aligned vector access (N * sizeof(T) in {2, 4, 8, 16} bytes).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Vector load/store; the CPU emulation checks the alignment a GPU would fault on.
template <typename T, int N> FASTPE_D Pack<T, N> load_pack(const T* p) {
#ifdef FASTPE_EMULATION
  if (reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, N>) != 0) ::fastpe_emu::fail("misaligned vector load");
#endif
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N> FASTPE_D void store_pack(T* p, const Pack<T, N>& v) {
#ifdef FASTPE_EMULATION
  if (reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, N>) != 0) ::fastpe_emu::fail("misaligned vector store");
#endif
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): the
// counter-based generator of curand and torch. Stateless: the same (counter, key) always gives
// the same four words, so the backward regenerates the forward's dropout mask exactly.
struct Philox4 {
  uint32_t x[4];
};

FASTPE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FASTPE_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
FASTPE_UNROLL
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key is bumped between rounds
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 r;
  r.x[0] = c0;
  r.x[1] = c1;
  r.x[2] = c2;
  r.x[3] = c3;
  return r;
}

// The resolved (seed, offset) of one op call.
struct RngSeed {
  uint64_t seed, offset;
};

FASTPE_HD RngSeed resolve_philox(const PhiloxArgs& a) {
  if (a.captured) {
    return {static_cast<uint64_t>(*a.seed_ptr), static_cast<uint64_t>(*a.offset_ptr) + a.offset_intragraph};
  }
  return {a.seed, a.offset};
}

// Dropout keep bits of attention element (row, col), row = (b*H + h)*Lq + i, col = j: elements
// (row, 2c) and (row, 2c+1) share one Philox call (counter (c, row, offset)), using words 0 and 1.
// A value is kept when its word is >= threshold = round(p * 2^32).
FASTPE_HD Philox4 dropout_bits(RngSeed rng, uint64_t row, uint32_t col_pair) {
  return philox4x32_10(col_pair, static_cast<uint32_t>(row), static_cast<uint32_t>(rng.offset),
                       static_cast<uint32_t>(rng.offset >> 32) ^ static_cast<uint32_t>(row >> 32),
                       static_cast<uint32_t>(rng.seed), static_cast<uint32_t>(rng.seed >> 32));
}

FASTPE_HD bool dropout_keep(RngSeed rng, uint64_t row, int64_t col, uint32_t threshold) {
  const Philox4 bits = dropout_bits(rng, row, static_cast<uint32_t>(col >> 1));
  return bits.x[col & 1] >= threshold;
}

FASTPE_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t + 0.5);
}

// ---------------------------------------------------------------------------------------------
// Relative position bucket r(i, j) = clamp(j - i, -k, k) + k.
FASTPE_HD int rel_bucket(int64_t i, int64_t j, int k) {
  int64_t d = j - i;
  d = d < -k ? -k : (d > k ? k : d);
  return static_cast<int>(d + k);
}

}  // namespace fastpe
