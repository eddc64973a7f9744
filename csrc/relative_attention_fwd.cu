// Relative attention forward (RMHA-k and time intervals): one block per (batch, head, query tile).
//
//   s_ij = (q_i.k_j + q_i.aK[r(i,j)]) * scale + bias_ij      (masked -> -inf)
//   o_i  = sum_j P~_ij (v_j + aV[r(i,j)]),  P = softmax_j(s), P~ = P with dropout
//
// Relative key term: QR = Q aK^T ([BQ, R], block GEMMs over chunks of the table) once per query
// tile, looked up per score element by bucket. Relative value term: the per-row bucket sums
// W[i, r] = sum_{j: r(i,j)=r} P~_ij, accumulated in shared memory with one owner per row (the
// row's warp for the banded RMHA buckets, one thread walking the row in column order for time
// intervals), then O += W aV as block GEMMs at the end. O(1) work per score element for any R.
// Key tiles are visited with an online softmax (running max m and sum l per row); for the short
// sequences of recommendation there is one tile.
#include "attention.cuh"

namespace fastpe {
namespace attn {

template <typename T, typename Buckets>
__global__ void __launch_bounds__(kThreads, 1) rel_attn_fwd_kernel(const RmhaParams p) {
  using A = Acc<T>;
  constexpr bool kTime = Buckets::kTime;
  constexpr int BQ = Tiles<T, kTime>::kFwdQ, BK = Tiles<T, kTime>::kFwdK, CPL = BK / 32;
  static_assert(BK >= kChunk && BQ <= kThreads, "tile shapes");
  FASTPE_DYNAMIC_SMEM(smem);
  const Dims dims = make_dims(p);
  const FwdLayout<T, BQ, BK, kTime> lay(dims);
  T* Qs = at<T>(smem, lay.q);
  T* Ks = at<T>(smem, lay.k);
  T* Vs = at<T>(smem, lay.v);
  A* S = at<A>(smem, lay.s);
  T* P = at<T>(smem, lay.p);
  A* O = at<A>(smem, lay.o);
  A* QR = at<A>(smem, lay.qr);
  A* PB = at<A>(smem, lay.pb);
  A* row_m = at<A>(smem, lay.m);
  A* row_l = at<A>(smem, lay.l);
  uint16_t* bid = at<uint16_t>(smem, lay.bid);
  int64_t* tau_q = at<int64_t>(smem, lay.tq);
  int64_t* tau_k = at<int64_t>(smem, lay.tk);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nb = dims.nb, kmax = (nb - 1) / 2;
  const Buckets bucket = make_buckets<Buckets>(p, tau_q, tau_k);
  const int64_t nqt = ceil_div(p.Lq, BQ);
  const Head hd = make_head(p, blockIdx.x / nqt);
  const int64_t q0 = (blockIdx.x % nqt) * BQ;
  const int q_rows = static_cast<int>(p.Lq - q0 < BQ ? p.Lq - q0 : BQ);

  const bool dropout = p.dropout_p > 0.0;
  const RngSeed rng = dropout ? resolve_philox(p.philox) : RngSeed{0, 0};
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.rng_state != nullptr) {
    p.rng_state[0] = static_cast<int64_t>(rng.seed);
    p.rng_state[1] = static_cast<int64_t>(rng.offset);
  }
  const uint32_t threshold = dropout ? dropout_threshold(p.dropout_p) : 0u;
  const A keep_scale = dropout ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(1);

  const T* q = static_cast<const T*>(p.q) + hd.b * p.sq.b + hd.h * p.sq.h;
  const T* k = static_cast<const T*>(p.k) + hd.b * p.sk.b + hd.h * p.sk.h;
  const T* v = static_cast<const T*>(p.v) + hd.b * p.sv.b + hd.h * p.sv.h;
  const bool vec_q = vector_ok<T>(p.q, p.dh, p.sq.b, p.sq.h, p.sq.l);
  const bool vec_k = vector_ok<T>(p.k, p.dh, p.sk.b, p.sk.h, p.sk.l);
  const bool vec_v = vector_ok<T>(p.v, p.dv, p.sv.b, p.sv.h, p.sv.l);
  const T* rel_k = static_cast<const T*>(p.rel_k) + hd.ht * nb * p.dh;
  const T* rel_v = static_cast<const T*>(p.rel_v) + hd.ht * nb * p.dv;

  load_tile(Qs, lay.ldq, q + q0 * p.sq.l, p.sq.l, q_rows, BQ, p.dh, dims.dp, vec_q);
  if (kTime) load_tau(tau_q, p, hd.b, q0, q_rows, BQ);
  zero_fill(O, int64_t(BQ) * lay.ldo);
  zero_fill(PB, int64_t(BQ) * lay.ldr);
  for (int ii = threadIdx.x; ii < BQ; ii += kThreads) {
    row_m[ii] = neg_inf<A>();
    row_l[ii] = A(0);
  }
  // QR = Q aK^T, the table staged through Ks.
  table_scores(QR, lay.ldr, Qs, lay.ldq, BQ, rel_k, nb, dims.rp, static_cast<int>(p.dh), dims.dp, Ks, lay.ldq, p.tf32);

  // With a causal mask, key tiles after the tile's last query are fully masked: skip them.
  const int64_t nkt_all = ceil_div(p.Lk, BK);
  const int64_t nkt = p.causal ? (ceil_div(q0 + q_rows, BK) < nkt_all ? ceil_div(q0 + q_rows, BK) : nkt_all) : nkt_all;
  for (int64_t kt = 0; kt < nkt; ++kt) {
    const int64_t j0 = kt * BK;
    const int k_rows = static_cast<int>(p.Lk - j0 < BK ? p.Lk - j0 : BK);
    __syncthreads();  // the previous tile's GEMMs and walks are done with Ks, Vs, P, S
    load_tile(Ks, lay.ldq, k + j0 * p.sk.l, p.sk.l, k_rows, BK, p.dh, dims.dp, vec_k);
    load_tile(Vs, lay.ldv, v + j0 * p.sv.l, p.sv.l, k_rows, BK, p.dv, dims.dvp, vec_v);
    if (kTime) load_tau(tau_k, p, hd.b, j0, k_rows, BK);
    __syncthreads();
    block_gemm<T, Gemm::kNT, false>(S, lay.lds, Qs, lay.ldq, Ks, lay.ldq, BQ, BK, dims.dp, p.tf32);
    __syncthreads();

    // One warp per query row: logits, online-softmax update, dropout; the banded buckets also
    // get their sums here, time-interval ones keep P~ (in S) and the ids for the walk below.
    for (int ii = warp; ii < BQ; ii += kWarps) {
      if (ii >= q_rows) {  // padding rows of the last query tile: P = 0 keeps the GEMM clean
        for (int jj = lane; jj < BK; jj += 32) P[ii * lay.ldp + jj] = zero_value<T>();
        continue;
      }
      const int64_t i = q0 + ii;
      const A* qr_row = QR + ii * lay.ldr;
      A* pb_row = PB + ii * lay.ldr;
      A s_loc[CPL];
      int r_loc[CPL];
      A tile_max = neg_inf<A>();
FASTPE_UNROLL
      for (int c = 0; c < CPL; ++c) {
        const int jj = lane * CPL + c;
        const int64_t j = j0 + jj;
        A s = neg_inf<A>();
        int r = 0;
        if (key_allowed(p, hd, i, j)) {
          r = bucket(ii, i, jj, j);
          s = logit<T>(p, hd, i, j, S[ii * lay.lds + jj], qr_row[r]);
        }
        s_loc[c] = s;
        r_loc[c] = r;
        tile_max = s > tile_max ? s : tile_max;
      }
      tile_max = warp_max(tile_max);
      const A m_old = row_m[ii];
      const A m_new = tile_max > m_old ? tile_max : m_old;
      // Rescale what earlier tiles accumulated; nothing to do before the first allowed key
      // (O and W are still 0) or when the max did not move.
      const A alpha = m_new == neg_inf<A>() ? A(1) : fast_exp(m_old - m_new);
      if (m_old != neg_inf<A>() && alpha != A(1)) {
        for (int d = lane; d < dims.dvp; d += 32) O[ii * lay.ldo + d] *= alpha;
        for (int r = lane; r < nb; r += 32) pb_row[r] *= alpha;
      }
      __syncwarp();
      A psum = 0, left = 0, right = 0;
      Philox4 bits{};
FASTPE_UNROLL
      for (int c = 0; c < CPL; ++c) {
        const int jj = lane * CPL + c;
        const int64_t j = j0 + jj;
        A pr = s_loc[c] == neg_inf<A>() ? A(0) : fast_exp(s_loc[c] - m_new);
        psum += pr;  // the normalizer excludes dropout
        if (dropout) {
          if (c == 0 || (j & 1) == 0) bits = dropout_bits(rng, uint64_t(hd.bh * p.Lq + i), uint32_t(j >> 1));
          pr = ((j & 1) ? bits.x[1] : bits.x[0]) >= threshold ? pr * keep_scale : A(0);
        }
        P[ii * lay.ldp + jj] = from_acc<T>(pr);
        if constexpr (kTime) {
          S[ii * lay.lds + jj] = pr;
          bid[ii * BK + jj] = static_cast<uint16_t>(r_loc[c]);
        } else {
          if (pr != A(0)) bucket_add(pb_row, r_loc[c], kmax, pr, left, right);
        }
      }
      psum = warp_sum(psum);
      if constexpr (!kTime) bucket_finish(pb_row, kmax, left, right);
      if (lane == 0) {
        row_l[ii] = row_l[ii] * alpha + psum;
        row_m[ii] = m_new;
      }
    }
    __syncthreads();
    if constexpr (kTime) {  // thread ii walks row ii while the warps run the GEMM
      const int ii = threadIdx.x;
      if (ii < q_rows) walk_buckets<A, BK>(PB + ii * lay.ldr, S + ii * lay.lds, bid + ii * BK);
    }
    block_gemm<T, Gemm::kNN, true>(O, lay.ldo, P, lay.ldp, Vs, lay.ldv, BQ, dims.dvp, BK, p.tf32);
  }

  // O += W aV, chunk by chunk: W in the input dtype (in P), the table chunk in Vs.
  const bool vec_tv = vector_ok<T>(rel_v, p.dv, p.dv, p.dv, p.dv);
  for (int c0 = 0; c0 < dims.rp; c0 += kChunk) {
    const int n = dims.rp - c0 < kChunk ? dims.rp - c0 : kChunk;
    __syncthreads();  // the key loop (or the previous chunk) is done with P, Vs and W
    load_tile(Vs, lay.ldv, rel_v + int64_t(c0) * p.dv, p.dv, nb - c0, n, static_cast<int>(p.dv), dims.dvp, vec_tv);
    for (int idx = threadIdx.x; idx < BQ * n; idx += kThreads) {
      const int ii = idx / n, c = idx % n;
      P[ii * lay.ldp + c] = from_acc<T>(PB[ii * lay.ldr + c0 + c]);
    }
    __syncthreads();
    block_gemm<T, Gemm::kNN, true>(O, lay.ldo, P, lay.ldp, Vs, lay.ldv, BQ, dims.dvp, n, p.tf32);
  }
  __syncthreads();

  // o_i = O_i / l_i; rows without an allowed key give 0 and lse = +inf.
  T* out = static_cast<T*>(p.out) + (hd.bh * p.Lq + q0) * p.dv;
  A* lse = static_cast<A*>(p.lse) + hd.bh * p.Lq + q0;
  for (int ii = warp; ii < q_rows; ii += kWarps) {
    const A l = row_l[ii];
    const bool empty = !(l > A(0));
    const A inv = empty ? A(0) : A(1) / l;
    for (int d = lane; d < p.dv; d += 32) out[int64_t(ii) * p.dv + d] = from_acc<T>(empty ? A(0) : O[ii * lay.ldo + d] * inv);
    if (lane == 0) lse[ii] = empty ? pos_inf<A>() : row_m[ii] + safe_log(l);
  }
}

template <typename T, bool kTime>
int64_t fwd_smem_of(const RmhaParams& p) {
  return FwdLayout<T, Tiles<T, kTime>::kFwdQ, Tiles<T, kTime>::kFwdK, kTime>(make_dims(p)).total;
}

template <typename T>
int64_t fwd_smem(const RmhaParams& p) {
  return p.tau != nullptr ? fwd_smem_of<T, true>(p) : fwd_smem_of<T, false>(p);
}

template <typename T, typename Buckets>
cudaError_t launch_fwd_with(const RmhaParams& p, cudaStream_t stream) {
  const int64_t smem = fwd_smem_of<T, Buckets::kTime>(p);
  const int64_t blocks = p.B * p.H * ceil_div(p.Lq, Tiles<T, Buckets::kTime>::kFwdQ);
  if (blocks == 0) return cudaSuccess;
  cudaError_t err = allow_dynamic_smem<rel_attn_fwd_kernel<T, Buckets>>(smem);
  if (err != cudaSuccess) return err;
  FASTPE_LAUNCH((rel_attn_fwd_kernel<T, Buckets>), dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const RmhaParams& p, cudaStream_t stream) {
  return p.tau != nullptr ? launch_fwd_with<T, TimeBuckets>(p, stream) : launch_fwd_with<T, PositionBuckets>(p, stream);
}

}  // namespace attn

int64_t rmha_forward_smem_bytes(const RmhaParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return attn::fwd_smem<float>(p);
    case DType::kFloat16: return attn::fwd_smem<__half>(p);
    case DType::kBFloat16: return attn::fwd_smem<__nv_bfloat16>(p);
    case DType::kFloat64: return attn::fwd_smem<double>(p);
  }
  return 0;
}

cudaError_t rmha_forward(const RmhaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return attn::launch_fwd<float>(p, stream);
    case DType::kFloat16: return attn::launch_fwd<__half>(p, stream);
    case DType::kBFloat16: return attn::launch_fwd<__nv_bfloat16>(p, stream);
    case DType::kFloat64: return attn::launch_fwd<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpe
