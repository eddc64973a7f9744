// Building blocks of the RMHA-k kernels: tile shapes, shared-memory layouts, tile loads, block
// GEMMs on shared memory (tensor cores through WMMA for fp16/bf16, fp32/fp64 FMAs otherwise), and
// the per-element math of the logits.
//
// Every block owns one (batch, head, tile) and stages its tiles in shared memory; the sequences
// of sequential recommendation are short (35-200), so a tile usually spans the whole sequence
// and the key loop runs once. Longer sequences loop over key tiles with an online softmax.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace fastpe {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <typename T> struct UsesWmma : std::false_type {};
template <> struct UsesWmma<__half> : std::true_type {};
template <> struct UsesWmma<__nv_bfloat16> : std::true_type {};

// Padding of shared-memory rows (elements). WMMA needs 16-byte multiples for the 16-bit operands
// and 4 floats for the accumulators; +8 halves / +4 floats also move consecutive rows off the
// same banks. The FMA path uses odd strides (no bank conflicts in its column accesses).
template <typename T> struct Pad {
  static constexpr int kIn = UsesWmma<T>::value ? 8 : 1;
  static constexpr int kAcc = UsesWmma<T>::value ? 4 : 1;
};
// float: rows of 16-byte multiples, which the TF32 tensor-core path loads (4 floats also move
// consecutive rows 4 banks apart for the exact FMA path).
template <> struct Pad<float> {
  static constexpr int kIn = 4;
  static constexpr int kAcc = 4;
};

// Tile shapes (query rows x key columns) per dtype and bucket kind. BK is a multiple of 32 (one
// warp sweeps a row) and every tile dimension a multiple of 16 (the GEMM tile). The time-interval
// kernels (kTime) keep [rows, K+1] fp32 arrays per query tile (the relative scores and bucket
// sums, K = 256 typically), so their query tiles are smaller: at K = 256, dh = 64 the 16-bit
// forward and backward need ~101 KiB of shared memory each (two blocks per SM).
template <typename T, bool kTime> struct Tiles {  // fp16, bf16
  // forward (query tile owned, key tiles looped), dK/dV role (key tile owned, query tiles
  // looped), dQ role (query tile owned, key tiles looped)
  static constexpr int kFwdQ = kTime ? 32 : 64, kFwdK = kTime ? 32 : 64;
  static constexpr int kKvQ = kTime ? 16 : 64, kKvK = 32;
  static constexpr int kDqQ = kTime ? 16 : 32, kDqK = kTime ? 32 : 64;
};
template <bool kTime> struct Tiles<float, kTime> {
  static constexpr int kFwdQ = 32, kFwdK = kTime ? 32 : 64;
  static constexpr int kKvQ = kTime ? 16 : 32, kKvK = 32;
  static constexpr int kDqQ = kTime ? 16 : 32, kDqK = 32;
};
template <bool kTime> struct Tiles<double, kTime> {
  static constexpr int kFwdQ = 16, kFwdK = 32;
  static constexpr int kKvQ = 16, kKvK = 32;
  static constexpr int kDqQ = 16, kDqK = 32;
};

// The relative tables are staged through shared memory kChunk rows at a time (block GEMMs with
// the query tile), so no layout holds a whole [R, dh] table.
constexpr int kChunk = 32;

// Bump allocator over the dynamic shared memory, used identically on the host (to size the
// launch) and on the device (to find the arrays).
struct Carver {
  int64_t bytes = 0;
  FASTPE_HD int64_t take(int64_t n) {
    bytes = round_up(bytes, 128);
    const int64_t at = bytes;
    bytes += n;
    return at;
  }
};

struct Dims {
  int dp, dvp;  // head sizes padded to 16
  int nb;       // table rows R (2k+1 or K+1)
  int rp;       // R padded to 16 (the GEMM width of the per-row relative arrays)
  int cw;       // rows of a staged table chunk: min(kChunk, rp)
};

FASTPE_HD Dims make_dims(const RmhaParams& p) {
  const int rp = static_cast<int>(round_up(p.NB, 16));
  return {static_cast<int>(round_up(p.dh, 16)), static_cast<int>(round_up(p.dv, 16)), static_cast<int>(p.NB), rp,
          rp < kChunk ? rp : kChunk};
}

FASTPE_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts. Offsets in bytes; ld* are row strides in elements. qr/pb are the
// per-row relative scores q.aK[r] and bucket sums W[i, r] ([BQ, rp] in Acc<T>); bid the bucket
// ids of the score tile, tq/tk the time steps of its rows and columns (time-interval kernels only).
template <typename T, int BQ, int BK, bool kTime> struct FwdLayout {
  int ldq, ldv, lds, ldp, ldo, ldr;
  int64_t q, k, v, s, p, o, qr, pb, m, l, bid, tq, tk, total;
  FASTPE_HD explicit FwdLayout(Dims d) {
    using A = Acc<T>;
    ldq = d.dp + Pad<T>::kIn;
    ldv = d.dvp + Pad<T>::kIn;
    lds = BK + Pad<T>::kAcc;
    ldp = BK + Pad<T>::kIn;
    ldo = d.dvp + Pad<T>::kAcc;
    ldr = d.rp + Pad<T>::kAcc;
    Carver c;
    q = c.take(int64_t(BQ) * ldq * sizeof(T));
    k = c.take(int64_t(BK) * ldq * sizeof(T));  // also stages rel_k, kChunk <= BK rows at a time
    v = c.take(int64_t(BK) * ldv * sizeof(T));  // also stages rel_v
    s = c.take(int64_t(BQ) * lds * sizeof(A));
    p = c.take(int64_t(BQ) * ldp * sizeof(T));
    o = c.take(int64_t(BQ) * ldo * sizeof(A));
    qr = c.take(int64_t(BQ) * ldr * sizeof(A));
    pb = c.take(int64_t(BQ) * ldr * sizeof(A));
    m = c.take(int64_t(BQ) * sizeof(A));
    l = c.take(int64_t(BQ) * sizeof(A));
    bid = c.take(kTime ? int64_t(BQ) * BK * sizeof(uint16_t) : 0);
    tq = c.take(kTime ? int64_t(BQ) * sizeof(int64_t) : 0);
    tk = c.take(kTime ? int64_t(BK) * sizeof(int64_t) : 0);
    total = round_up(c.bytes, 128);
  }
};

// Backward: arrays both roles use, then the role's own (kKv: dK/dV accumulators and P; kDq: the
// dQ accumulator, the bucket sums of P~ and dS, and the 16-bit copy of a chunk of them).
enum class Role { kKv, kDq };

template <typename T, int BQ, int BK, Role R, bool kTime> struct BwdLayout {
  int ldq, ldv, lds, ldp, ldak, ldav, ldr, ldw, ldt;
  int64_t q, dout, k, v, s, dpr, ds, qr, dor, rowd, rowlse, tb, bid, tq, tk;
  int64_t pt, acck, accv;  // kKv
  int64_t accq, pb, dsb, wt;   // kDq
  int64_t total;
  FASTPE_HD explicit BwdLayout(Dims d) {
    using A = Acc<T>;
    ldq = d.dp + Pad<T>::kIn;
    ldv = d.dvp + Pad<T>::kIn;
    lds = BK + Pad<T>::kAcc;
    ldp = BK + Pad<T>::kIn;
    ldak = d.dp + Pad<T>::kAcc;
    ldav = d.dvp + Pad<T>::kAcc;
    ldr = d.rp + Pad<T>::kAcc;
    ldw = 2 * d.cw + Pad<T>::kIn;
    ldt = ldq > ldv ? ldq : ldv;
    Carver c;
    q = c.take(int64_t(BQ) * ldq * sizeof(T));
    dout = c.take(int64_t(BQ) * ldv * sizeof(T));
    k = c.take(int64_t(BK) * ldq * sizeof(T));
    v = c.take(int64_t(BK) * ldv * sizeof(T));
    s = c.take(int64_t(BQ) * lds * sizeof(A));
    dpr = c.take(int64_t(BQ) * lds * sizeof(A));
    ds = c.take(int64_t(BQ) * ldp * sizeof(T));
    // qr and dor also stage the dq role's table-gradient chunks ([cw, ldak|ldav]) at the end.
    qr = c.take(max64(int64_t(BQ) * ldr, int64_t(d.cw) * ldak) * sizeof(A));
    dor = c.take(max64(int64_t(BQ) * ldr, int64_t(d.cw) * ldav) * sizeof(A));
    rowd = c.take(int64_t(BQ) * sizeof(A));
    rowlse = c.take(int64_t(BQ) * sizeof(A));
    tb = c.take(int64_t(d.cw) * ldt * sizeof(T));  // a chunk of rel_k or rel_v
    bid = c.take(kTime && R == Role::kDq ? int64_t(BQ) * BK * sizeof(uint16_t) : 0);
    tq = c.take(kTime ? int64_t(BQ) * sizeof(int64_t) : 0);
    tk = c.take(kTime ? int64_t(BK) * sizeof(int64_t) : 0);
    pt = acck = accv = accq = pb = dsb = wt = -1;
    if (R == Role::kKv) {
      pt = c.take(int64_t(BQ) * ldp * sizeof(T));
      acck = c.take(int64_t(BK) * ldak * sizeof(A));
      accv = c.take(int64_t(BK) * ldav * sizeof(A));
    } else {
      accq = c.take(int64_t(BQ) * ldak * sizeof(A));
      pb = c.take(int64_t(BQ) * ldr * sizeof(A));
      dsb = c.take(int64_t(BQ) * ldr * sizeof(A));
      wt = c.take(int64_t(BQ) * ldw * sizeof(T));
    }
    total = round_up(c.bytes, 128);
  }
};

template <typename X> FASTPE_D X* at(unsigned char* base, int64_t offset) {
  return reinterpret_cast<X*>(base + offset);
}

// ---------------------------------------------------------------------------------------------
// Global -> shared tile loads. Rows [0, rows) and columns [0, cols) of dst are written; elements
// outside (rows_valid, cols_valid) are zero, so padded rows and head dims add nothing to a GEMM.

// True when rows of `cols` elements at `ptr` with the given row strides can be read as 16-byte
// vectors.
template <typename T> FASTPE_D bool vector_ok(const void* ptr, int64_t cols, int64_t s0, int64_t s1, int64_t s2) {
  constexpr int V = 16 / sizeof(T);
  return (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) && cols % V == 0 && s0 % V == 0 && s1 % V == 0 && s2 % V == 0;
}

template <typename T>
FASTPE_D void load_tile(T* dst, int ld, const T* src, int64_t row_stride, int rows_valid, int rows, int cols_valid,
                        int cols, bool vec) {
  constexpr int V = 16 / sizeof(T);
  const T zero = zero_value<T>();
  if (vec) {  // cols is a multiple of 16 >= V, cols_valid a multiple of V
    const int per_row = cols / V;
    for (int idx = threadIdx.x; idx < rows * per_row; idx += kThreads) {
      const int r = idx / per_row, c = (idx % per_row) * V;
      Pack<T, V> pk;
      if (r < rows_valid && c < cols_valid) {
        pk = load_pack<T, V>(src + r * row_stride + c);
      } else {
FASTPE_UNROLL
        for (int e = 0; e < V; ++e) pk.v[e] = zero;
      }
FASTPE_UNROLL
      for (int e = 0; e < V; ++e) dst[r * ld + c + e] = pk.v[e];
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
      const int r = idx / cols, c = idx % cols;
      dst[r * ld + c] = (r < rows_valid && c < cols_valid) ? src[r * row_stride + c] : zero;
    }
  }
}

template <typename A> FASTPE_D void zero_fill(A* dst, int64_t n) {
  for (int64_t idx = threadIdx.x; idx < n; idx += kThreads) dst[idx] = A(0);
}

// ---------------------------------------------------------------------------------------------
// Block GEMMs on shared memory, C (+)= op(A) op(B) with C in Acc<T>:
//   kNT: C[M,N] = A[M,K] B[N,K]^T    kNN: C = A[M,K] B[K,N]    kTN: C = A[K,M]^T B[K,N]
// M, N, K are multiples of 16; each warp computes whole 16x16 tiles of C, so every element of C
// has one owner and accumulation needs no synchronization beyond the callers' __syncthreads.
enum class Gemm { kNT, kNN, kTN };

template <typename T, Gemm OP>
FASTPE_D Acc<T> elem_a(const T* A, int lda, int m, int k) {
  return to_acc(OP == Gemm::kTN ? A[k * lda + m] : A[m * lda + k]);
}
template <typename T, Gemm OP>
FASTPE_D Acc<T> elem_b(const T* B, int ldb, int k, int n) {
  return to_acc(OP == Gemm::kNT ? B[n * ldb + k] : B[k * ldb + n]);
}

// FMA tile: lane owns rows m0 + 2*(lane/4) + {0,1} and columns n0 + 4*(lane%4) + {0..3}.
template <typename T, Gemm OP, bool ACCUM>
FASTPE_D void simt_tile(Acc<T>* C, int ldc, const T* A, int lda, const T* B, int ldb, int m0, int n0, int K) {
  using A_t = Acc<T>;
  const int lane = threadIdx.x & 31;
  const int r = (lane >> 2) * 2, c = (lane & 3) * 4;
  A_t acc[2][4];
FASTPE_UNROLL
  for (int x = 0; x < 2; ++x)
FASTPE_UNROLL
    for (int y = 0; y < 4; ++y) acc[x][y] = ACCUM ? C[(m0 + r + x) * ldc + n0 + c + y] : A_t(0);
  for (int k = 0; k < K; ++k) {
    const A_t a0 = elem_a<T, OP>(A, lda, m0 + r, k), a1 = elem_a<T, OP>(A, lda, m0 + r + 1, k);
FASTPE_UNROLL
    for (int y = 0; y < 4; ++y) {
      const A_t bv = elem_b<T, OP>(B, ldb, k, n0 + c + y);
      acc[0][y] += a0 * bv;
      acc[1][y] += a1 * bv;
    }
  }
FASTPE_UNROLL
  for (int x = 0; x < 2; ++x)
FASTPE_UNROLL
    for (int y = 0; y < 4; ++y) C[(m0 + r + x) * ldc + n0 + c + y] = acc[x][y];
}

// Tensor-core tile (fp16/bf16 in, fp32 accumulate).
template <typename T, Gemm OP, bool ACCUM>
FASTPE_D void wmma_tile(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int m0, int n0, int K) {
  namespace wmma = nvcuda::wmma;
  using LA = typename std::conditional<OP == Gemm::kTN, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<OP == Gemm::kNT, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  float* c_tile = C + m0 * ldc + n0;
  if (ACCUM) {
    wmma::load_matrix_sync(fc, c_tile, ldc, wmma::mem_row_major);
  } else {
    wmma::fill_fragment(fc, 0.0f);
  }
  for (int k0 = 0; k0 < K; k0 += 16) {
    // col_major A: element (m, k) at ptr[m + k*ld]; col_major B: element (k, n) at ptr[k + n*ld].
    const T* pa = OP == Gemm::kTN ? A + k0 * lda + m0 : A + m0 * lda + k0;
    const T* pb = OP == Gemm::kNT ? B + n0 * ldb + k0 : B + k0 * ldb + n0;
    wmma::load_matrix_sync(fa, pa, lda);
    wmma::load_matrix_sync(fb, pb, ldb);
    wmma::mma_sync(fc, fa, fb, fc);
  }
  wmma::store_matrix_sync(c_tile, fc, ldc, wmma::mem_row_major);
}

// TF32 tensor-core tile (fp32 in, rounded to TF32 (10-bit mantissa), fp32 accumulate), m16n16k8.
template <Gemm OP, bool ACCUM>
FASTPE_D void tf32_tile(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int m0, int n0, int K) {
  namespace wmma = nvcuda::wmma;
  using LA = typename std::conditional<OP == Gemm::kTN, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<OP == Gemm::kNT, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  float* c_tile = C + m0 * ldc + n0;
  if (ACCUM) {
    wmma::load_matrix_sync(fc, c_tile, ldc, wmma::mem_row_major);
  } else {
    wmma::fill_fragment(fc, 0.0f);
  }
  for (int k0 = 0; k0 < K; k0 += 8) {
    const float* pa = OP == Gemm::kTN ? A + k0 * lda + m0 : A + m0 * lda + k0;
    const float* pb = OP == Gemm::kNT ? B + n0 * ldb + k0 : B + k0 * ldb + n0;
    wmma::load_matrix_sync(fa, pa, lda);
    wmma::load_matrix_sync(fb, pb, ldb);
FASTPE_UNROLL
    for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
FASTPE_UNROLL
    for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
    wmma::mma_sync(fc, fa, fb, fc);
  }
  wmma::store_matrix_sync(c_tile, fc, ldc, wmma::mem_row_major);
}

// tf32: float inputs take the TF32 tensor-core tiles (RmhaParams::tf32); ignored otherwise.
template <typename T, Gemm OP, bool ACCUM>
FASTPE_D void block_gemm(Acc<T>* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K,
                         bool tf32) {
  const int warp = threadIdx.x >> 5;
  const int tiles_n = N >> 4, tiles = (M >> 4) * tiles_n;
  for (int t = warp; t < tiles; t += kWarps) {
    const int m0 = (t / tiles_n) << 4, n0 = (t % tiles_n) << 4;
    if constexpr (UsesWmma<T>::value) {
      wmma_tile<T, OP, ACCUM>(C, ldc, A, lda, B, ldb, m0, n0, K);
    } else if constexpr (std::is_same<T, float>::value) {
      if (tf32) {
        tf32_tile<OP, ACCUM>(C, ldc, A, lda, B, ldb, m0, n0, K);
      } else {
        simt_tile<T, OP, ACCUM>(C, ldc, A, lda, B, ldb, m0, n0, K);
      }
    } else {
      simt_tile<T, OP, ACCUM>(C, ldc, A, lda, B, ldb, m0, n0, K);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-element math shared by the forward and both backward roles.

// Where the block's (batch, head) find their inputs.
struct Head {
  int64_t b, h, ht;  // batch, head, table head
  int64_t bh;        // b*H + h
};

FASTPE_D Head make_head(const RmhaParams& p, int64_t bh) {
  Head hd;
  hd.bh = bh;
  hd.b = bh / p.H;
  hd.h = bh % p.H;
  hd.ht = p.Ht == 1 ? 0 : hd.h;
  return hd;
}

// Whether key j may be attended from query i (the -inf part of the masks; a float bias may add
// more -inf, handled by the softmax).
FASTPE_D bool key_allowed(const RmhaParams& p, const Head& hd, int64_t i, int64_t j) {
  if (j >= p.Lk) return false;
  if (p.causal && j > i) return false;
  if (p.kpm != nullptr && p.kpm[hd.b * p.kpm_sb + j * p.kpm_sl]) return false;
  return true;
}

// The scaled, biased logit of an allowed pair, from the content score q.k and the relative
// score q.aK[r] of its bucket.
template <typename T>
FASTPE_D Acc<T> logit(const RmhaParams& p, const Head& hd, int64_t i, int64_t j, Acc<T> qk, Acc<T> qr) {
  using A = Acc<T>;
  A s = (qk + qr) * static_cast<A>(p.scale);
  if (p.bias != nullptr) {
    const T* bias = static_cast<const T*>(p.bias);
    s += to_acc(bias[hd.b * p.bias_sb + hd.h * p.bias_sh + i * p.bias_sq + j * p.bias_sk]);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Bucket functions: the one template parameter that tells the two members of the family apart.
// bucket(ii, i, jj, j) for tile row ii (query i) and tile column jj (key j).

// RMHA-k: clamp(j - i, -k, k) + k. Banded: inside |j - i| < k every key of a row has its own
// bucket, outside it is one of the two clipped ones, so the warp that owns a row can add to the
// bucket sums without conflicts (see bucket_add).
struct PositionBuckets {
  static constexpr bool kTime = false;
  int kmax;
  FASTPE_D int operator()(int, int64_t i, int, int64_t j) const { return rel_bucket(i, j, kmax); }
};

// Time intervals (TiSASRec): min(|tau_i - tau_j|, K) from the time steps of the tile's rows and
// columns in shared memory. Any two keys of a row may share a bucket, so the bucket sums are
// walked row by row by one thread (walk_buckets). Unsigned difference: exact for any int64.
struct TimeBuckets {
  static constexpr bool kTime = true;
  const int64_t* tau_q;
  const int64_t* tau_k;
  uint64_t span;  // K
  FASTPE_D int operator()(int ii, int64_t, int jj, int64_t) const {
    const int64_t a = tau_q[ii], b = tau_k[jj];
    const uint64_t d = a > b ? uint64_t(a) - uint64_t(b) : uint64_t(b) - uint64_t(a);
    return static_cast<int>(d < span ? d : span);
  }
};

template <typename Buckets> FASTPE_D Buckets make_buckets(const RmhaParams& p, const int64_t* tau_q, const int64_t* tau_k);
template <> FASTPE_D PositionBuckets make_buckets<PositionBuckets>(const RmhaParams& p, const int64_t*, const int64_t*) {
  return {static_cast<int>((p.NB - 1) / 2)};
}
template <> FASTPE_D TimeBuckets make_buckets<TimeBuckets>(const RmhaParams& p, const int64_t* tau_q, const int64_t* tau_k) {
  return {tau_q, tau_k, static_cast<uint64_t>(p.NB - 1)};
}

// Time steps tau[b, l0 .. l0+rows) (int32 or int64) into shared memory; 0 past the sequence.
FASTPE_D void load_tau(int64_t* dst, const RmhaParams& p, int64_t b, int64_t l0, int rows_valid, int rows) {
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    int64_t t = 0;
    if (r < rows_valid) {
      const int64_t at = b * p.tau_sb + (l0 + r) * p.tau_sl;
      t = p.tau_int64 ? static_cast<const int64_t*>(p.tau)[at] : static_cast<const int32_t*>(p.tau)[at];
    }
    dst[r] = t;
  }
}

// Adds value v of key j (row i, bucket r) to the row's bucket sums (banded buckets only).
// Buckets 1..2k-1 hold one key per row, so the owning lane adds those directly; the two clipped
// buckets collect ranges and are returned through left/right for a warp reduction (k = 0:
// everything is bucket 0, "left").
template <typename A>
FASTPE_D void bucket_add(A* buckets, int r, int kmax, A v, A& left, A& right) {
  if (r == 0) {
    left += v;
  } else if (r == 2 * kmax) {
    right += v;
  } else {
    buckets[r] += v;
  }
}

template <typename A>
FASTPE_D void bucket_finish(A* buckets, int kmax, A left, A right) {
  left = warp_sum(left);
  right = warp_sum(right);
  if ((threadIdx.x & 31) == 0) {
    buckets[0] += left;
    if (kmax > 0) buckets[2 * kmax] += right;
  }
}

// The bucket sums of one row for any bucket function: the calling thread owns row ii and adds
// the row's nonzero values in column order (no atomics: bitwise reproducible). O(1) per element.
template <typename A, int BK>
FASTPE_D void walk_buckets(A* sums_row, const A* vals_row, const uint16_t* bid_row) {
  for (int jj = 0; jj < BK; ++jj) {
    const A x = vals_row[jj];
    if (x != A(0)) sums_row[bid_row[jj]] += x;
  }
}

// out[ii, r] = x_ii . table_r for the rp (padded) table rows, as block GEMMs over kChunk-row
// chunks of the table staged in `stage` (ld elements per row; rows past R are zero). Starts with
// a barrier (x may have just been loaded); the caller syncs before reading out.
template <typename T>
FASTPE_D void table_scores(Acc<T>* out, int ldr, const T* x, int ldx, int rows, const T* table, int nb, int rp,
                           int cols, int dcols, T* stage, int ld, bool tf32) {
  const bool vec = vector_ok<T>(table, cols, cols, cols, cols);
  for (int c0 = 0; c0 < rp; c0 += kChunk) {
    const int n = rp - c0 < kChunk ? rp - c0 : kChunk;
    __syncthreads();  // the previous chunk's GEMM is done with stage
    load_tile(stage, ld, table + int64_t(c0) * cols, cols, nb - c0, n, cols, dcols, vec);
    __syncthreads();
    block_gemm<T, Gemm::kNT, false>(out + c0, ldr, x, ldx, stage, ld, rows, n, dcols, tf32);
  }
}

}  // namespace attn
}  // namespace fastpe
