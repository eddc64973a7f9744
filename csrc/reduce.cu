// Deterministic row sums (the reductions behind the table and angle gradients) and the host
// Philox used by the tests.
#include "common.cuh"

namespace fastpe {
namespace {

constexpr int kRowSumWarps = 8;

template <typename TS, typename TD> struct RowSumAcc { using type = float; };
template <typename TD> struct RowSumAcc<double, TD> { using type = double; };
template <typename TS> struct RowSumAcc<TS, double> { using type = double; };
template <> struct RowSumAcc<double, double> { using type = double; };

// One block per (output row, 32 columns): warp w sums the listed source rows w, w+8, w+16, ...,
// then warp 0 adds the eight partial sums in order. The order depends only on the sizes, never on
// timing, so results are bitwise reproducible.
template <typename TS, typename TD>
__global__ void __launch_bounds__(kRowSumWarps * 32) row_sum_kernel(const RowSumParams p) {
  using A = typename RowSumAcc<TS, TD>::type;
  __shared__ A part[kRowSumWarps][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunks = ceil_div(p.cols, 32);
  const int64_t row = blockIdx.x / chunks;
  const int64_t c = (blockIdx.x % chunks) * 32 + lane;
  const TS* src = static_cast<const TS*>(p.src);
  int64_t count = 0, start = 0;
  if (p.mode == RowListMode::kSorted) {
    start = p.starts[row];
    count = p.starts[row + 1] - start;
  } else if (row < p.valid_rows) {
    count = p.count;
  }
  A acc = 0;
  if (c < p.cols) {
    for (int64_t e = warp; e < count; e += kRowSumWarps) {
      const int64_t src_row = p.mode == RowListMode::kSorted
                                  ? p.order[start + e]
                                  : row * p.base_mult + (e / p.inner) * p.outer_stride + e % p.inner;
      acc += static_cast<A>(to_acc(src[src_row * p.src_row_stride + c]));
    }
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < p.cols) {
    A total = 0;
    for (int w = 0; w < kRowSumWarps; ++w) total += part[w][lane];
    static_cast<TD*>(p.dst)[row * p.cols + c] = from_acc<TD>(total);
  }
}

template <typename TS, typename TD>
cudaError_t launch_row_sum(const RowSumParams& p, cudaStream_t stream) {
  const int64_t blocks = p.rows_out * ceil_div(p.cols, 32);
  if (blocks == 0) return cudaSuccess;
  FASTPE_LAUNCH((row_sum_kernel<TS, TD>), dim3(static_cast<unsigned>(blocks)), dim3(kRowSumWarps * 32), 0, stream, p);
  return cudaGetLastError();
}

template <typename TS>
cudaError_t row_sum_to(const RowSumParams& p, cudaStream_t stream) {
  switch (p.dst_dtype) {
    case DType::kFloat32: return launch_row_sum<TS, float>(p, stream);
    case DType::kFloat16: return launch_row_sum<TS, __half>(p, stream);
    case DType::kBFloat16: return launch_row_sum<TS, __nv_bfloat16>(p, stream);
    case DType::kFloat64: return launch_row_sum<TS, double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t row_sum(const RowSumParams& p, cudaStream_t stream) {
  switch (p.src_dtype) {
    case DType::kFloat32: return row_sum_to<float>(p, stream);
    case DType::kFloat16: return row_sum_to<__half>(p, stream);
    case DType::kBFloat16: return row_sum_to<__nv_bfloat16>(p, stream);
    case DType::kFloat64: return row_sum_to<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

void philox4x32_10_host(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  const Philox4 r = philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
  for (int i = 0; i < 4; ++i) out[i] = r.x[i];
}

}  // namespace fastpe
