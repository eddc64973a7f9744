// Concat-projection epilogue. concat(x, e_p) W^T + b = x Wx^T + (E Wp^T + b)[p]: the GEMM
// x Wx^T runs in cuBLAS, the position term is a small [rows, C] table computed once per call,
// and this kernel adds its row p(t) to every token t of the GEMM's output in place, so the
// [B, L, d_in + d_pos] concat never exists.
#include "common.cuh"

namespace fastpe {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) position_add_kernel(const PositionAddParams p) {
  const int64_t groups = p.C / V, total = p.B * p.L * groups;
  T* y = static_cast<T*>(p.y);
  const T* rows = static_cast<const T*>(p.rows);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (idx % groups) * V, t = idx / groups, l = t % p.L;
    const int64_t pos = p.pos_mode == PosMode::kPerToken ? p.positions[t]
                        : p.pos_mode == PosMode::kPerStep ? p.positions[l]
                                                          : l;
    const Pack<T, V> r = load_pack<T, V>(rows + pos * p.C + c);
    Pack<T, V> out = load_pack<T, V>(y + t * p.C + c);
FASTPE_UNROLL
    for (int e = 0; e < V; ++e) out.v[e] = from_acc<T>(to_acc(out.v[e]) + to_acc(r.v[e]));
    store_pack<T, V>(y + t * p.C + c, out);
  }
}

template <typename T>
cudaError_t launch(const PositionAddParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.C % V == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0 && reinterpret_cast<uintptr_t>(p.rows) % 16 == 0;
  const int64_t total = p.B * p.L * (vec ? p.C / V : p.C);
  if (total == 0) return cudaSuccess;
  int64_t blocks = ceil_div(total, kThreads);
  if (blocks > (1ll << 30)) blocks = 1ll << 30;
  if (vec) {
    FASTPE_LAUNCH((position_add_kernel<T, V>), dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
  } else {
    FASTPE_LAUNCH((position_add_kernel<T, 1>), dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t position_add(const PositionAddParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, stream);
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    case DType::kFloat64: return launch<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpe
