// Rotary (rotate feature pairs by per-position angles) and Rotatory (add the code
// ((-1)^j sin t, cos t) to each pair), forward and backward.
//
// Pairs: kHalf (m, m + D/2), kInterleaved and kAdd (2m, 2m+1). Each thread handles NP
// consecutive pairs of one token; with VEC those are read and written as aligned vectors.
// The backward loops over the heads of a token in a fixed order, so the per-token angle gradient
// (summed over heads) is deterministic; row_sum then reduces it over batch and positions.
#include "common.cuh"

namespace fastpe {
namespace {

constexpr int kRotaryThreads = 256;

template <typename T, PairMode MODE, int NP, bool VEC>
FASTPE_D void load_pairs(const T* row, int64_t sd, int64_t m0, int64_t half, Acc<T> (&a)[NP], Acc<T> (&b)[NP]) {
  if constexpr (MODE == PairMode::kHalf) {
    if constexpr (VEC) {
      const Pack<T, NP> pa = load_pack<T, NP>(row + m0);
      const Pack<T, NP> pb = load_pack<T, NP>(row + half + m0);
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        a[n] = to_acc(pa.v[n]);
        b[n] = to_acc(pb.v[n]);
      }
    } else {
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        a[n] = to_acc(row[(m0 + n) * sd]);
        b[n] = to_acc(row[(half + m0 + n) * sd]);
      }
    }
  } else {
    if constexpr (VEC) {
      const Pack<T, 2 * NP> pk = load_pack<T, 2 * NP>(row + 2 * m0);
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        a[n] = to_acc(pk.v[2 * n]);
        b[n] = to_acc(pk.v[2 * n + 1]);
      }
    } else {
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        a[n] = to_acc(row[2 * (m0 + n) * sd]);
        b[n] = to_acc(row[(2 * (m0 + n) + 1) * sd]);
      }
    }
  }
}

// Stores into a contiguous row.
template <typename T, PairMode MODE, int NP, bool VEC>
FASTPE_D void store_pairs(T* row, int64_t m0, int64_t half, const Acc<T> (&a)[NP], const Acc<T> (&b)[NP]) {
  if constexpr (MODE == PairMode::kHalf) {
    if constexpr (VEC) {
      Pack<T, NP> pa, pb;
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        pa.v[n] = from_acc<T>(a[n]);
        pb.v[n] = from_acc<T>(b[n]);
      }
      store_pack<T, NP>(row + m0, pa);
      store_pack<T, NP>(row + half + m0, pb);
    } else {
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        row[m0 + n] = from_acc<T>(a[n]);
        row[half + m0 + n] = from_acc<T>(b[n]);
      }
    }
  } else {
    if constexpr (VEC) {
      Pack<T, 2 * NP> pk;
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        pk.v[2 * n] = from_acc<T>(a[n]);
        pk.v[2 * n + 1] = from_acc<T>(b[n]);
      }
      store_pack<T, 2 * NP>(row + 2 * m0, pk);
    } else {
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) {
        row[2 * (m0 + n)] = from_acc<T>(a[n]);
        row[2 * (m0 + n) + 1] = from_acc<T>(b[n]);
      }
    }
  }
}

FASTPE_D int64_t position_of(const RotaryParams& p, int64_t b, int64_t l) {
  switch (p.pos_mode) {
    case PosMode::kPerStep: return p.positions[l];
    case PosMode::kPerToken: return p.positions[b * p.L + l];
    default: return l;
  }
}

template <typename T, PairMode MODE, int NP, bool VEC>
__global__ void __launch_bounds__(kRotaryThreads) rotary_fwd_kernel(const RotaryParams p) {
  using A = Acc<T>;
  const int64_t half = p.D / 2, groups = half / NP;
  const int64_t total = p.B * p.L * p.H * groups;
  const T* x = static_cast<const T*>(p.x);
  const A* angles = static_cast<const A*>(p.angles);
  T* y = static_cast<T*>(p.y);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m0 = (idx % groups) * NP;
    int64_t t = idx / groups;
    const int64_t h = t % p.H;
    t /= p.H;
    const int64_t l = t % p.L, b = t / p.L;
    const A* theta = angles + position_of(p, b, l) * p.angle_stride + m0;
    A xa[NP], xb[NP], ya[NP], yb[NP];
    load_pairs<T, MODE, NP, VEC>(x + b * p.sx[0] + l * p.sx[1] + h * p.sx[2], p.sx[3], m0, half, xa, xb);
FASTPE_UNROLL
    for (int n = 0; n < NP; ++n) {
      A s, c;
      sin_cos(theta[n], &s, &c);
      if constexpr (MODE == PairMode::kAdd) {
        ya[n] = xa[n] + (((m0 + n) & 1) ? -s : s);
        yb[n] = xb[n] + c;
      } else {
        ya[n] = xa[n] * c - xb[n] * s;
        yb[n] = xa[n] * s + xb[n] * c;
      }
    }
    store_pairs<T, MODE, NP, VEC>(y + ((b * p.L + l) * p.H + h) * p.D, m0, half, ya, yb);
  }
}

// Rotations: dx = R(-t) dy; the angle gradient of a pair is dy_b*y_a - dy_a*y_b (y = R(t) x).
// Rotatory add: dx = dy (not computed here); d t = (-1)^m cos(t) dy_a - sin(t) dy_b.
template <typename T, PairMode MODE, int NP, bool VEC>
__global__ void __launch_bounds__(kRotaryThreads) rotary_bwd_kernel(const RotaryParams p) {
  using A = Acc<T>;
  const int64_t half = p.D / 2, groups = half / NP;
  const int64_t total = p.B * p.L * groups;
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_y);
  const A* angles = static_cast<const A*>(p.angles);
  T* gx = static_cast<T*>(p.grad_x);
  A* partials = static_cast<A*>(p.angle_partials);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m0 = (idx % groups) * NP;
    const int64_t t = idx / groups;
    const int64_t l = t % p.L, b = t / p.L;
    const A* theta = angles + position_of(p, b, l) * p.angle_stride + m0;
    A sn[NP], cs[NP], g[NP];
FASTPE_UNROLL
    for (int n = 0; n < NP; ++n) {
      sin_cos(theta[n], &sn[n], &cs[n]);
      g[n] = A(0);
    }
    for (int64_t h = 0; h < p.H; ++h) {
      A dya[NP], dyb[NP];
      load_pairs<T, MODE, NP, VEC>(gy + b * p.sgy[0] + l * p.sgy[1] + h * p.sgy[2], p.sgy[3], m0, half, dya, dyb);
      if constexpr (MODE == PairMode::kAdd) {
FASTPE_UNROLL
        for (int n = 0; n < NP; ++n) g[n] += (((m0 + n) & 1) ? -cs[n] : cs[n]) * dya[n] - sn[n] * dyb[n];
      } else {
        if (gx != nullptr) {
          A dxa[NP], dxb[NP];
FASTPE_UNROLL
          for (int n = 0; n < NP; ++n) {
            dxa[n] = dya[n] * cs[n] + dyb[n] * sn[n];
            dxb[n] = dyb[n] * cs[n] - dya[n] * sn[n];
          }
          store_pairs<T, MODE, NP, VEC>(gx + ((b * p.L + l) * p.H + h) * p.D, m0, half, dxa, dxb);
        }
        if (partials != nullptr) {
          A xa[NP], xb[NP];
          load_pairs<T, MODE, NP, VEC>(x + b * p.sx[0] + l * p.sx[1] + h * p.sx[2], p.sx[3], m0, half, xa, xb);
FASTPE_UNROLL
          for (int n = 0; n < NP; ++n) {
            const A ya = xa[n] * cs[n] - xb[n] * sn[n];
            const A yb = xa[n] * sn[n] + xb[n] * cs[n];
            g[n] += dyb[n] * ya - dya[n] * yb;
          }
        }
      }
    }
    if (partials != nullptr) {
FASTPE_UNROLL
      for (int n = 0; n < NP; ++n) partials[(b * p.L + l) * half + m0 + n] = g[n];
    }
  }
}

// Pairs per thread on the vector path: 8 bytes of each half (kHalf) or 16 bytes (pairs adjacent).
template <typename T> constexpr int vec_pairs() { return 8 / static_cast<int>(sizeof(T)); }

template <typename T>
bool strides_allow_vec(const void* ptr, const int64_t (&s)[4], int64_t half, PairMode mode) {
  constexpr int NP = vec_pairs<T>();
  const int64_t elems = mode == PairMode::kHalf ? NP : 2 * NP;
  if (s[3] != 1 || half % NP != 0) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % (elems * sizeof(T)) != 0) return false;
  return s[0] % elems == 0 && s[1] % elems == 0 && s[2] % elems == 0;
}

template <typename T, PairMode MODE, bool BWD, int NP, bool VEC>
cudaError_t launch_one(const RotaryParams& p, cudaStream_t stream) {
  const int64_t total = p.B * p.L * (BWD ? 1 : p.H) * ((p.D / 2) / NP);
  if (total == 0) return cudaSuccess;
  int64_t blocks = ceil_div(total, kRotaryThreads);
  if (blocks > (1ll << 30)) blocks = 1ll << 30;
  if constexpr (BWD) {
    FASTPE_LAUNCH((rotary_bwd_kernel<T, MODE, NP, VEC>), dim3(static_cast<unsigned>(blocks)), dim3(kRotaryThreads), 0,
                  stream, p);
  } else {
    FASTPE_LAUNCH((rotary_fwd_kernel<T, MODE, NP, VEC>), dim3(static_cast<unsigned>(blocks)), dim3(kRotaryThreads), 0,
                  stream, p);
  }
  return cudaGetLastError();
}

template <typename T, PairMode MODE, bool BWD>
cudaError_t launch_mode(const RotaryParams& p, cudaStream_t stream) {
  const int64_t half = p.D / 2;
  bool vec = BWD ? strides_allow_vec<T>(p.grad_y, p.sgy, half, p.mode) : true;
  if (p.x != nullptr) vec = vec && strides_allow_vec<T>(p.x, p.sx, half, p.mode);
  if (vec) return launch_one<T, MODE, BWD, vec_pairs<T>(), true>(p, stream);
  return launch_one<T, MODE, BWD, 1, false>(p, stream);
}

template <typename T, bool BWD>
cudaError_t launch_dtype(const RotaryParams& p, cudaStream_t stream) {
  switch (p.mode) {
    case PairMode::kHalf: return launch_mode<T, PairMode::kHalf, BWD>(p, stream);
    case PairMode::kInterleaved: return launch_mode<T, PairMode::kInterleaved, BWD>(p, stream);
    case PairMode::kAdd: return launch_mode<T, PairMode::kAdd, BWD>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool BWD>
cudaError_t launch(const RotaryParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_dtype<float, BWD>(p, stream);
    case DType::kFloat16: return launch_dtype<__half, BWD>(p, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16, BWD>(p, stream);
    case DType::kFloat64: return launch_dtype<double, BWD>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rotary_forward(const RotaryParams& p, cudaStream_t stream) { return launch<false>(p, stream); }
cudaError_t rotary_backward(const RotaryParams& p, cudaStream_t stream) { return launch<true>(p, stream); }

}  // namespace fastpe
