// Deterministic row sums (the reductions behind the table and angle gradients) and the host
// Philox used by the tests.
#include "common.cuh"

namespace fastpe {
namespace {

constexpr int kRowSumWarps = 8;
constexpr int kItemsPerWarp = 8;  // list entries one warp sums per segment, before splitting
constexpr int kMaxSegments = 64;

template <typename TS, typename TD> struct RowSumAcc { using type = float; };
template <typename TD> struct RowSumAcc<double, TD> { using type = double; };
template <typename TS> struct RowSumAcc<TS, double> { using type = double; };
template <> struct RowSumAcc<double, double> { using type = double; };

// How many segments each output row's list is cut into: enough blocks to keep the GPU's memory
// system busy, few enough that the second pass stays small. Depends on sizes only.
int64_t segments_of(const RowSumParams& p) {
  const int64_t items = p.mode == RowListMode::kSorted ? ceil_div(p.total, p.rows_out > 0 ? p.rows_out : 1) : p.count;
  const int64_t s = ceil_div(items, kRowSumWarps * kItemsPerWarp);
  return s < 1 ? 1 : (s > kMaxSegments ? kMaxSegments : s);
}

// One block per (output row, 32 columns, segment): warp w sums the segment's list entries
// w, w+8, w+16, ..., then warp 0 adds the eight partial sums in order. With one segment the
// result goes to dst, else to workspace[segment, row, column].
template <typename TS, typename TD>
__global__ void __launch_bounds__(kRowSumWarps * 32) row_sum_kernel(const RowSumParams p, int64_t segments) {
  using A = typename RowSumAcc<TS, TD>::type;
  __shared__ A part[kRowSumWarps][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunks = ceil_div(p.cols, 32);
  const int64_t seg = blockIdx.x % segments;
  const int64_t row = blockIdx.x / segments / chunks;
  const int64_t c = (blockIdx.x / segments % chunks) * 32 + lane;
  const TS* src = static_cast<const TS*>(p.src);
  int64_t count = 0, start = 0;
  if (p.mode == RowListMode::kSorted) {
    start = p.starts[row];
    count = p.starts[row + 1] - start;
  } else if (row < p.valid_rows) {
    count = p.count;
  }
  const int64_t e_begin = count * seg / segments, e_end = count * (seg + 1) / segments;
  A acc = 0;
  if (c < p.cols) {
    for (int64_t e = e_begin + warp; e < e_end; e += kRowSumWarps) {
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
    if (segments == 1) {
      static_cast<TD*>(p.dst)[row * p.cols + c] = from_acc<TD>(total);
    } else {
      static_cast<A*>(p.workspace)[(seg * p.rows_out + row) * p.cols + c] = total;
    }
  }
}

// dst[row, c] = sum over segments, in segment order.
template <typename TS, typename TD>
__global__ void __launch_bounds__(256) row_sum_segments_kernel(const RowSumParams p, int64_t segments) {
  using A = typename RowSumAcc<TS, TD>::type;
  const int64_t n = p.rows_out * p.cols;
  const A* ws = static_cast<const A*>(p.workspace);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    A total = 0;
    for (int64_t s = 0; s < segments; ++s) total += ws[s * n + idx];
    static_cast<TD*>(p.dst)[idx] = from_acc<TD>(total);
  }
}

template <typename TS, typename TD>
cudaError_t launch_row_sum(const RowSumParams& p, cudaStream_t stream) {
  const int64_t segments = segments_of(p);
  const int64_t blocks = p.rows_out * ceil_div(p.cols, 32) * segments;
  if (blocks == 0) return cudaSuccess;
  if (segments > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  FASTPE_LAUNCH((row_sum_kernel<TS, TD>), dim3(static_cast<unsigned>(blocks)), dim3(kRowSumWarps * 32), 0, stream, p,
                segments);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || segments == 1) return err;
  const int64_t n = p.rows_out * p.cols;
  int64_t blocks2 = ceil_div(n, 256);
  if (blocks2 > 4096) blocks2 = 4096;
  FASTPE_LAUNCH((row_sum_segments_kernel<TS, TD>), dim3(static_cast<unsigned>(blocks2)), dim3(256), 0, stream, p,
                segments);
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

int64_t row_sum_workspace_bytes(const RowSumParams& p) {
  const int64_t segments = segments_of(p);
  if (segments == 1) return 0;
  const bool wide = p.src_dtype == DType::kFloat64 || p.dst_dtype == DType::kFloat64;
  return segments * p.rows_out * p.cols * (wide ? 8 : 4);
}

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
