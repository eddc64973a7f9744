// Relative attention backward (RMHA-k and time intervals). With P the softmax, M the dropout
// keep mask, P~ = P*M/(1-p) and w_ij = v_j + aV[r(i,j)]:
//
//   dP~_ij = dO_i . w_ij = dO_i.v_j + DOR_i[r]        DOR = dO aV^T ([BQ, R], block GEMMs)
//   dS_ij  = P_ij (dP~_ij M_ij/(1-p) - D_i),  D_i = dO_i . o_i
//   dq_i   = scale (sum_j dS_ij k_j + (Wds aK)_i)       Wds: per-row bucket sums of dS
//   dk_j   = scale sum_i dS_ij q_i,   dv_j = sum_i P~_ij dO_i
//   daK    = scale Wds^T Q,           daV  = W^T dO     W: per-row bucket sums of P~
//
// One launch, two kinds of blocks: "kv" blocks own a key tile and loop over query tiles (dk, dv);
// "dq" blocks own a query tile and loop over key tiles (dq, and the block's partial sums of the
// table gradients, block GEMMs over chunks of the bucket sums). The bucket sums have one owner
// per row (the row's warp for the banded RMHA buckets; for time intervals one thread walks the
// row's P~ and another its dS, in column order). Nothing is accumulated with atomics; the partial
// table sums are reduced over batch and heads afterwards in a fixed order (row_sum), so every
// gradient is bitwise reproducible. P is recomputed from the forward's log-sum-exp, the dropout
// mask from the forward's Philox (seed, offset).
#include "attention.cuh"

namespace fastpe {
namespace attn {

template <typename T, bool kTime>
using KvLayout = BwdLayout<T, Tiles<T, kTime>::kKvQ, Tiles<T, kTime>::kKvK, Role::kKv, kTime>;
template <typename T, bool kTime>
using DqLayout = BwdLayout<T, Tiles<T, kTime>::kDqQ, Tiles<T, kTime>::kDqK, Role::kDq, kTime>;

template <typename T> struct BwdCommon {
  using A = Acc<T>;
  bool dropout;
  RngSeed rng;
  uint32_t threshold;
  A keep_scale;
  FASTPE_D explicit BwdCommon(const RmhaParams& p) {
    dropout = p.dropout_p > 0.0;
    rng = dropout ? RngSeed{static_cast<uint64_t>(p.rng_state[0]), static_cast<uint64_t>(p.rng_state[1])} : RngSeed{0, 0};
    threshold = dropout ? dropout_threshold(p.dropout_p) : 0u;
    keep_scale = dropout ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(1);
  }
};

// Loads the query-side tiles of rows [q0, q0 + q_rows): q, dO, the log-sum-exp (and the time
// steps of the rows).
template <typename T, int BQ, bool kTime, typename Layout>
FASTPE_D void load_query_side(const RmhaParams& p, const Head& hd, const Layout& lay, const Dims& dims, int64_t q0,
                              int q_rows, T* Qs, T* dOs, Acc<T>* row_lse, int64_t* tau_q) {
  const T* q = static_cast<const T*>(p.q) + hd.b * p.sq.b + hd.h * p.sq.h;
  const T* go = static_cast<const T*>(p.grad_out) + hd.b * p.sgo.b + hd.h * p.sgo.h;
  load_tile(Qs, lay.ldq, q + q0 * p.sq.l, p.sq.l, q_rows, BQ, p.dh, dims.dp, vector_ok<T>(p.q, p.dh, p.sq.b, p.sq.h, p.sq.l));
  load_tile(dOs, lay.ldv, go + q0 * p.sgo.l, p.sgo.l, q_rows, BQ, p.dv, dims.dvp,
            vector_ok<T>(p.grad_out, p.dv, p.sgo.b, p.sgo.h, p.sgo.l));
  const Acc<T>* lse = static_cast<const Acc<T>*>(p.lse) + hd.bh * p.Lq + q0;
  for (int ii = threadIdx.x; ii < BQ; ii += kThreads) row_lse[ii] = ii < q_rows ? lse[ii] : pos_inf<Acc<T>>();
  if (kTime) load_tau(tau_q, p, hd.b, q0, q_rows, BQ);
}

template <typename T, int BK, bool kTime, typename Layout>
FASTPE_D void load_key_side(const RmhaParams& p, const Head& hd, const Layout& lay, const Dims& dims, int64_t j0,
                            int k_rows, T* Ks, T* Vs, int64_t* tau_k) {
  const T* k = static_cast<const T*>(p.k) + hd.b * p.sk.b + hd.h * p.sk.h;
  const T* v = static_cast<const T*>(p.v) + hd.b * p.sv.b + hd.h * p.sv.h;
  load_tile(Ks, lay.ldq, k + j0 * p.sk.l, p.sk.l, k_rows, BK, p.dh, dims.dp, vector_ok<T>(p.k, p.dh, p.sk.b, p.sk.h, p.sk.l));
  load_tile(Vs, lay.ldv, v + j0 * p.sv.l, p.sv.l, k_rows, BK, p.dv, dims.dvp, vector_ok<T>(p.v, p.dv, p.sv.b, p.sv.h, p.sv.l));
  if (kTime) load_tau(tau_k, p, hd.b, j0, k_rows, BK);
}

template <typename T> FASTPE_D const T* rel_table(const RmhaParams& p, const Head& hd, const void* table, int64_t cols) {
  return static_cast<const T*>(table) + hd.ht * p.NB * cols;
}

// QR = Q aK^T and DOR = dO aV^T of a query tile (block GEMMs over table chunks staged in TB).
template <typename T, int BQ, typename Layout>
FASTPE_D void relative_scores(const RmhaParams& p, const Head& hd, const Layout& lay, const Dims& dims, const T* Qs,
                              const T* dOs, T* TB, Acc<T>* QR, Acc<T>* DOR) {
  table_scores(QR, lay.ldr, Qs, lay.ldq, BQ, rel_table<T>(p, hd, p.rel_k, p.dh), dims.nb, dims.rp, static_cast<int>(p.dh),
               dims.dp, TB, lay.ldt, p.tf32);
  table_scores(DOR, lay.ldr, dOs, lay.ldv, BQ, rel_table<T>(p, hd, p.rel_v, p.dv), dims.nb, dims.rp,
               static_cast<int>(p.dv), dims.dvp, TB, lay.ldt, p.tf32);
}

// D_i = dO_i . o_i (one warp per row), with o read back from the forward output.
template <typename T, int BQ>
FASTPE_D void row_delta(const RmhaParams& p, const Head& hd, int64_t q0, int q_rows, const T* dOs, int ldv, Acc<T>* row_d) {
  using A = Acc<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* o = static_cast<const T*>(p.out) + hd.b * p.so.b + hd.h * p.so.h;
  for (int ii = warp; ii < BQ; ii += kWarps) {
    A acc = 0;
    if (ii < q_rows) {
      for (int d = lane; d < p.dv; d += 32) acc += to_acc(dOs[ii * ldv + d]) * to_acc(o[(q0 + ii) * p.so.l + d]);
    }
    acc = warp_sum(acc);
    if (lane == 0) row_d[ii] = acc;
  }
}

// One warp per query row: recompute P from the logits and the log-sum-exp, apply the dropout
// mask, form dS. Writes P~ (when Pt is given) and dS in the input dtype for the GEMMs. With SUMS,
// the banded buckets add P~ and dS to the row's bucket sums PB, DSB here; the time-interval ones
// leave P~ in S, dS in dP (fp32, in place) and the bucket ids in bid for walk_buckets.
template <typename T, int BQ, int BK, bool SUMS, typename Buckets>
FASTPE_D void bwd_rows(const RmhaParams& p, const Head& hd, const BwdCommon<T>& cm, const Buckets& bucket, int64_t q0,
                       int q_rows, int64_t j0, Acc<T>* S, Acc<T>* dP, int lds, const Acc<T>* QR, const Acc<T>* DOR,
                       int ldr, const Acc<T>* row_d, const Acc<T>* row_lse, T* Pt, T* dSt, int ldp, Acc<T>* PB,
                       Acc<T>* DSB, uint16_t* bid) {
  using A = Acc<T>;
  constexpr int CPL = BK / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kmax = static_cast<int>((p.NB - 1) / 2);
  for (int ii = warp; ii < BQ; ii += kWarps) {
    if (ii >= q_rows) {  // padding rows of the last query tile: zeros keep the GEMMs clean
      for (int jj = lane; jj < BK; jj += 32) {
        if (Pt != nullptr) Pt[ii * ldp + jj] = zero_value<T>();
        dSt[ii * ldp + jj] = zero_value<T>();
      }
      continue;
    }
    const int64_t i = q0 + ii;
    const A lse = row_lse[ii], delta = row_d[ii];
    A left_p = 0, right_p = 0, left_s = 0, right_s = 0;
    Philox4 bits{};
FASTPE_UNROLL
    for (int c = 0; c < CPL; ++c) {
      const int jj = lane * CPL + c;
      const int64_t j = j0 + jj;
      A pt = 0, ds = 0;
      int r = 0;
      // Outside the mask test: the bits of a pair serve both of its keys, masked or not.
      if (cm.dropout && (c == 0 || (j & 1) == 0)) bits = dropout_bits(cm.rng, uint64_t(hd.bh * p.Lq + i), uint32_t(j >> 1));
      if (key_allowed(p, hd, i, j)) {
        r = bucket(ii, i, jj, j);
        const A s = logit<T>(p, hd, i, j, S[ii * lds + jj], QR[ii * ldr + r]);
        const A pr = fast_exp(s - lse);  // 0 for -inf logits and for rows without keys (lse = +inf)
        const A dpt = dP[ii * lds + jj] + DOR[ii * ldr + r];
        A dpr = dpt;
        pt = pr;
        if (cm.dropout) {
          const bool keep = ((j & 1) ? bits.x[1] : bits.x[0]) >= cm.threshold;
          pt = keep ? pr * cm.keep_scale : A(0);
          dpr = keep ? dpt * cm.keep_scale : A(0);
        }
        ds = pr * (dpr - delta);
      }
      if (Pt != nullptr) Pt[ii * ldp + jj] = from_acc<T>(pt);
      dSt[ii * ldp + jj] = from_acc<T>(ds);
      if constexpr (SUMS && Buckets::kTime) {
        S[ii * lds + jj] = pt;
        dP[ii * lds + jj] = ds;
        bid[ii * BK + jj] = static_cast<uint16_t>(r);
      } else if constexpr (SUMS) {
        if (pt != A(0)) bucket_add(PB + ii * ldr, r, kmax, pt, left_p, right_p);
        if (ds != A(0)) bucket_add(DSB + ii * ldr, r, kmax, ds, left_s, right_s);
      }
    }
    if constexpr (SUMS && !Buckets::kTime) {
      bucket_finish(PB + ii * ldr, kmax, left_p, right_p);
      bucket_finish(DSB + ii * ldr, kmax, left_s, right_s);
    }
  }
}

// dk, dv of one key tile.
template <typename T, typename Buckets>
FASTPE_D void kv_block(const RmhaParams& p, unsigned char* smem, int64_t block) {
  using A = Acc<T>;
  constexpr bool kTime = Buckets::kTime;
  constexpr int BQ = Tiles<T, kTime>::kKvQ, BK = Tiles<T, kTime>::kKvK;
  const Dims dims = make_dims(p);
  const KvLayout<T, kTime> lay(dims);
  T* Qs = at<T>(smem, lay.q);
  T* dOs = at<T>(smem, lay.dout);
  T* Ks = at<T>(smem, lay.k);
  T* Vs = at<T>(smem, lay.v);
  A* S = at<A>(smem, lay.s);
  A* dP = at<A>(smem, lay.dpr);
  T* dSt = at<T>(smem, lay.ds);
  A* QR = at<A>(smem, lay.qr);
  A* DOR = at<A>(smem, lay.dor);
  A* row_d = at<A>(smem, lay.rowd);
  A* row_lse = at<A>(smem, lay.rowlse);
  T* TB = at<T>(smem, lay.tb);
  int64_t* tau_q = at<int64_t>(smem, lay.tq);
  int64_t* tau_k = at<int64_t>(smem, lay.tk);
  T* Pt = at<T>(smem, lay.pt);
  A* accK = at<A>(smem, lay.acck);
  A* accV = at<A>(smem, lay.accv);

  const BwdCommon<T> cm(p);
  const Buckets bucket = make_buckets<Buckets>(p, tau_q, tau_k);
  const int64_t nkt = ceil_div(p.Lk, BK);
  const Head hd = make_head(p, block / nkt);
  const int64_t j0 = (block % nkt) * BK;
  const int k_rows = static_cast<int>(p.Lk - j0 < BK ? p.Lk - j0 : BK);

  load_key_side<T, BK, kTime>(p, hd, lay, dims, j0, k_rows, Ks, Vs, tau_k);
  zero_fill(accK, int64_t(BK) * lay.ldak);
  zero_fill(accV, int64_t(BK) * lay.ldav);

  const int64_t nqt = ceil_div(p.Lq, BQ);
  const int64_t qt_begin = p.causal ? j0 / BQ : 0;  // earlier query rows see none of these keys
  for (int64_t qt = qt_begin; qt < nqt; ++qt) {
    const int64_t q0 = qt * BQ;
    const int q_rows = static_cast<int>(p.Lq - q0 < BQ ? p.Lq - q0 : BQ);
    __syncthreads();  // the previous iteration's GEMMs are done with Qs, dOs, Pt, dSt
    load_query_side<T, BQ, kTime>(p, hd, lay, dims, q0, q_rows, Qs, dOs, row_lse, tau_q);
    relative_scores<T, BQ>(p, hd, lay, dims, Qs, dOs, TB, QR, DOR);  // begins with a barrier
    row_delta<T, BQ>(p, hd, q0, q_rows, dOs, lay.ldv, row_d);
    block_gemm<T, Gemm::kNT, false>(S, lay.lds, Qs, lay.ldq, Ks, lay.ldq, BQ, BK, dims.dp, p.tf32);
    block_gemm<T, Gemm::kNT, false>(dP, lay.lds, dOs, lay.ldv, Vs, lay.ldv, BQ, BK, dims.dvp, p.tf32);
    __syncthreads();
    bwd_rows<T, BQ, BK, false>(p, hd, cm, bucket, q0, q_rows, j0, S, dP, lay.lds, QR, DOR, lay.ldr, row_d, row_lse, Pt,
                               dSt, lay.ldp, nullptr, nullptr, nullptr);
    __syncthreads();
    block_gemm<T, Gemm::kTN, true>(accV, lay.ldav, Pt, lay.ldp, dOs, lay.ldv, BK, dims.dvp, BQ, p.tf32);
    block_gemm<T, Gemm::kTN, true>(accK, lay.ldak, dSt, lay.ldp, Qs, lay.ldq, BK, dims.dp, BQ, p.tf32);
  }
  __syncthreads();

  const A scale = static_cast<A>(p.scale);
  T* gk = static_cast<T*>(p.grad_k) + (hd.bh * p.Lk + j0) * p.dh;
  T* gv = static_cast<T*>(p.grad_v) + (hd.bh * p.Lk + j0) * p.dv;
  for (int idx = threadIdx.x; idx < k_rows * p.dh; idx += kThreads) {
    const int jj = idx / p.dh, d = idx % p.dh;
    gk[idx] = from_acc<T>(accK[jj * lay.ldak + d] * scale);
  }
  for (int idx = threadIdx.x; idx < k_rows * p.dv; idx += kThreads) {
    const int jj = idx / p.dv, d = idx % p.dv;
    gv[idx] = from_acc<T>(accV[jj * lay.ldav + d]);
  }
}

// Query tiles per dq block: one (RMHA), or every tile of the sequence for time intervals, whose
// per-block table partials ([K+1, dh] each) would otherwise take B*h*L/16 of them (0.9 GB at
// B256 h2 L200 dh64 K=256); the block sums its tiles' partials in place, in tile order.
template <typename T, bool kTime> FASTPE_HD int64_t dq_tiles_per_block(const RmhaParams& p) {
  return kTime ? ceil_div(p.Lq, Tiles<T, true>::kDqQ) : 1;
}

// dq of query tiles, and their partial sums of the table gradients.
template <typename T, typename Buckets>
FASTPE_D void dq_block(const RmhaParams& p, unsigned char* smem, int64_t block, Acc<T>* ws_k, Acc<T>* ws_v) {
  using A = Acc<T>;
  constexpr bool kTime = Buckets::kTime;
  constexpr int BQ = Tiles<T, kTime>::kDqQ, BK = Tiles<T, kTime>::kDqK;
  static_assert(2 * BQ <= kThreads && BK >= kChunk, "tile shapes");
  const Dims dims = make_dims(p);
  const DqLayout<T, kTime> lay(dims);
  T* Qs = at<T>(smem, lay.q);
  T* dOs = at<T>(smem, lay.dout);
  T* Ks = at<T>(smem, lay.k);
  T* Vs = at<T>(smem, lay.v);
  A* S = at<A>(smem, lay.s);
  A* dP = at<A>(smem, lay.dpr);
  T* dSt = at<T>(smem, lay.ds);
  A* QR = at<A>(smem, lay.qr);
  A* DOR = at<A>(smem, lay.dor);
  A* row_d = at<A>(smem, lay.rowd);
  A* row_lse = at<A>(smem, lay.rowlse);
  T* TB = at<T>(smem, lay.tb);
  uint16_t* bid = at<uint16_t>(smem, lay.bid);
  int64_t* tau_q = at<int64_t>(smem, lay.tq);
  int64_t* tau_k = at<int64_t>(smem, lay.tk);
  A* accQ = at<A>(smem, lay.accq);
  A* PB = at<A>(smem, lay.pb);
  A* DSB = at<A>(smem, lay.dsb);
  T* WT = at<T>(smem, lay.wt);

  const BwdCommon<T> cm(p);
  const Buckets bucket = make_buckets<Buckets>(p, tau_q, tau_k);
  const int nb = dims.nb;
  const int64_t nqt = ceil_div(p.Lq, BQ), per_block = dq_tiles_per_block<T, kTime>(p);
  const int64_t blocks_per_head = nqt / per_block;
  const Head hd = make_head(p, block / blocks_per_head);
  const int64_t qt_first = (block % blocks_per_head) * per_block;
  for (int64_t qt = qt_first; qt < qt_first + per_block; ++qt) {
    const int64_t q0 = qt * BQ;
    const int q_rows = static_cast<int>(p.Lq - q0 < BQ ? p.Lq - q0 : BQ);
    const bool first = qt == qt_first;
    __syncthreads();  // the previous tile's epilogue is done with accQ, the sums and the stages

    load_query_side<T, BQ, kTime>(p, hd, lay, dims, q0, q_rows, Qs, dOs, row_lse, tau_q);
    zero_fill(accQ, int64_t(BQ) * lay.ldak);
    zero_fill(PB, int64_t(BQ) * lay.ldr);
    zero_fill(DSB, int64_t(BQ) * lay.ldr);
    relative_scores<T, BQ>(p, hd, lay, dims, Qs, dOs, TB, QR, DOR);  // begins with a barrier
    row_delta<T, BQ>(p, hd, q0, q_rows, dOs, lay.ldv, row_d);

    const int64_t nkt_all = ceil_div(p.Lk, BK);
    const int64_t nkt = p.causal ? (ceil_div(q0 + q_rows, BK) < nkt_all ? ceil_div(q0 + q_rows, BK) : nkt_all) : nkt_all;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t j0 = kt * BK;
      const int k_rows = static_cast<int>(p.Lk - j0 < BK ? p.Lk - j0 : BK);
      __syncthreads();  // the previous iteration's GEMM and walks are done with Ks, dSt, S, dP
      load_key_side<T, BK, kTime>(p, hd, lay, dims, j0, k_rows, Ks, Vs, tau_k);
      __syncthreads();
      block_gemm<T, Gemm::kNT, false>(S, lay.lds, Qs, lay.ldq, Ks, lay.ldq, BQ, BK, dims.dp, p.tf32);
      block_gemm<T, Gemm::kNT, false>(dP, lay.lds, dOs, lay.ldv, Vs, lay.ldv, BQ, BK, dims.dvp, p.tf32);
      __syncthreads();
      bwd_rows<T, BQ, BK, true>(p, hd, cm, bucket, q0, q_rows, j0, S, dP, lay.lds, QR, DOR, lay.ldr, row_d, row_lse,
                                nullptr, dSt, lay.ldp, PB, DSB, bid);
      __syncthreads();
      if constexpr (kTime) {  // threads [0, BQ) walk the rows' P~, [BQ, 2BQ) their dS, beside the GEMM
        const int t = threadIdx.x, ii = t < BQ ? t : t - BQ;
        if (t < 2 * BQ && ii < q_rows) {
          if (t < BQ) {
            walk_buckets<A, BK>(PB + ii * lay.ldr, S + ii * lay.lds, bid + ii * BK);
          } else {
            walk_buckets<A, BK>(DSB + ii * lay.ldr, dP + ii * lay.lds, bid + ii * BK);
          }
        }
      }
      block_gemm<T, Gemm::kNN, true>(accQ, lay.ldak, dSt, lay.ldp, Ks, lay.ldq, BQ, dims.dp, BK, p.tf32);
    }

    // Relative terms, cw buckets at a time, as block GEMMs on the bucket sums in the input
    // dtype (WT: columns [0, n) Wds, [cw, cw + n) W):
    //   dq += Wds aK;  daK partial = scale Wds^T Q;  daV partial = W^T dO.
    // QR and DOR are no longer needed: they stage the partials.
    A* stage_k = QR;
    A* stage_v = DOR;
    const A scale = static_cast<A>(p.scale);
    const T* rel_k = rel_table<T>(p, hd, p.rel_k, p.dh);
    const bool vec_tk = vector_ok<T>(rel_k, p.dh, p.dh, p.dh, p.dh);
    A* pk = ws_k + block * nb * p.dh;
    A* pv = ws_v + block * nb * p.dv;
    for (int c0 = 0; c0 < dims.rp; c0 += kChunk) {
      const int n = dims.rp - c0 < kChunk ? dims.rp - c0 : kChunk;
      __syncthreads();  // the key loop (or the previous chunk) is done with the sums, WT, TB, stages
      for (int idx = threadIdx.x; idx < BQ * n; idx += kThreads) {
        const int ii = idx / n, c = idx % n;
        WT[ii * lay.ldw + c] = from_acc<T>(DSB[ii * lay.ldr + c0 + c]);
        WT[ii * lay.ldw + dims.cw + c] = from_acc<T>(PB[ii * lay.ldr + c0 + c]);
      }
      load_tile(TB, lay.ldq, rel_k + int64_t(c0) * p.dh, p.dh, nb - c0, n, static_cast<int>(p.dh), dims.dp, vec_tk);
      __syncthreads();
      block_gemm<T, Gemm::kNN, true>(accQ, lay.ldak, WT, lay.ldw, TB, lay.ldq, BQ, dims.dp, n, p.tf32);
      block_gemm<T, Gemm::kTN, false>(stage_k, lay.ldak, WT, lay.ldw, Qs, lay.ldq, n, dims.dp, BQ, p.tf32);
      block_gemm<T, Gemm::kTN, false>(stage_v, lay.ldav, WT + dims.cw, lay.ldw, dOs, lay.ldv, n, dims.dvp, BQ, p.tf32);
      __syncthreads();
      const int rows = nb - c0 < n ? nb - c0 : n;
      for (int idx = threadIdx.x; idx < rows * p.dh; idx += kThreads) {
        const int m = idx / p.dh, d = idx % p.dh;
        A* at_k = pk + int64_t(c0) * p.dh + idx;  // this thread's own element on every tile
        *at_k = (first ? A(0) : *at_k) + stage_k[m * lay.ldak + d] * scale;
      }
      for (int idx = threadIdx.x; idx < rows * p.dv; idx += kThreads) {
        const int m = idx / p.dv, d = idx % p.dv;
        A* at_v = pv + int64_t(c0) * p.dv + idx;
        *at_v = (first ? A(0) : *at_v) + stage_v[m * lay.ldav + d];
      }
    }
    __syncthreads();

    T* gq = static_cast<T*>(p.grad_q) + (hd.bh * p.Lq + q0) * p.dh;
    for (int idx = threadIdx.x; idx < q_rows * p.dh; idx += kThreads) {
      const int ii = idx / p.dh, d = idx % p.dh;
      gq[idx] = from_acc<T>(accQ[ii * lay.ldak + d] * scale);
    }
  }
}

template <typename T> struct BwdGrid {
  int64_t kv_blocks, dq_blocks, dq_tiles;
  explicit BwdGrid(const RmhaParams& p) {
    const bool time = p.tau != nullptr;
    kv_blocks = p.B * p.H * ceil_div(p.Lk, time ? Tiles<T, true>::kKvK : Tiles<T, false>::kKvK);
    // dq blocks per (batch, head)
    dq_tiles = time ? (p.Lq > 0 ? 1 : 0) : ceil_div(p.Lq, Tiles<T, false>::kDqQ);
    dq_blocks = p.B * p.H * dq_tiles;
  }
};

// Workspace: the dq blocks' partial sums for rel_k, then for rel_v.
template <typename T> int64_t ws_k_elems(const RmhaParams& p) {
  return round_up(BwdGrid<T>(p).dq_blocks * p.NB * p.dh, 64);
}

template <typename T, typename Buckets>
__global__ void __launch_bounds__(kThreads, 1) rel_attn_bwd_kernel(const RmhaParams p, int64_t kv_blocks, int64_t ws_v_offset) {
  FASTPE_DYNAMIC_SMEM(smem);
  if (static_cast<int64_t>(blockIdx.x) < kv_blocks) {
    kv_block<T, Buckets>(p, smem, blockIdx.x);
  } else {
    Acc<T>* ws_k = static_cast<Acc<T>*>(p.workspace);
    dq_block<T, Buckets>(p, smem, blockIdx.x - kv_blocks, ws_k, ws_k + ws_v_offset);
  }
}

template <typename T, bool kTime> int64_t bwd_smem_of(const RmhaParams& p) {
  const Dims dims = make_dims(p);
  const int64_t a = KvLayout<T, kTime>(dims).total, b = DqLayout<T, kTime>(dims).total;
  return a > b ? a : b;
}

template <typename T> int64_t bwd_smem(const RmhaParams& p) {
  return p.tau != nullptr ? bwd_smem_of<T, true>(p) : bwd_smem_of<T, false>(p);
}

// Table gradients: the dq blocks' partial sums (workspace rows), summed over batch (and heads,
// for a shared table) by row_sum. which = 0: rel_k, 1: rel_v.
template <typename T> RowSumParams table_sum_params(const RmhaParams& p, int which) {
  const BwdGrid<T> grid(p);
  const int64_t width = p.NB * (which == 0 ? p.dh : p.dv);
  RowSumParams rs;
  rs.src_dtype = sizeof(Acc<T>) == 8 ? DType::kFloat64 : DType::kFloat32;
  rs.dst_dtype = p.dtype;
  rs.src = static_cast<const Acc<T>*>(p.workspace) + (which == 0 ? 0 : ws_k_elems<T>(p));
  rs.src_row_stride = width;
  rs.cols = width;
  rs.dst = which == 0 ? p.grad_rel_k : p.grad_rel_v;
  rs.rows_out = p.Ht;
  rs.mode = RowListMode::kStrided;
  rs.valid_rows = p.Ht;
  if (p.Ht == 1) {  // every (batch, head, tile) block: rows 0 .. dq_blocks-1
    rs.count = grid.dq_blocks;
    rs.base_mult = 0;
    rs.inner = grid.dq_blocks > 0 ? grid.dq_blocks : 1;
    rs.outer_stride = 0;
  } else {  // head ht: rows (b*H + ht)*tiles + t
    rs.count = p.B * grid.dq_tiles;
    rs.base_mult = grid.dq_tiles;
    rs.inner = grid.dq_tiles > 0 ? grid.dq_tiles : 1;
    rs.outer_stride = p.H * grid.dq_tiles;
  }
  return rs;
}

// Workspace: partial sums for rel_k, for rel_v, then row_sum's scratch (shared by both sums).
template <typename T> int64_t partials_bytes(const RmhaParams& p) {
  return round_up((ws_k_elems<T>(p) + BwdGrid<T>(p).dq_blocks * p.NB * p.dv) * int64_t(sizeof(Acc<T>)), 256);
}

template <typename T> int64_t bwd_workspace(const RmhaParams& p) {
  const int64_t a = row_sum_workspace_bytes(table_sum_params<T>(p, 0));
  const int64_t b = row_sum_workspace_bytes(table_sum_params<T>(p, 1));
  return partials_bytes<T>(p) + (a > b ? a : b);
}

template <typename T, typename Buckets>
cudaError_t launch_bwd_kernel(const RmhaParams& p, int64_t blocks, int64_t kv_blocks, cudaStream_t stream) {
  const int64_t smem = bwd_smem_of<T, Buckets::kTime>(p);
  cudaError_t err = allow_dynamic_smem<rel_attn_bwd_kernel<T, Buckets>>(smem);
  if (err != cudaSuccess) return err;
  FASTPE_LAUNCH((rel_attn_bwd_kernel<T, Buckets>), dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, p,
                kv_blocks, ws_k_elems<T>(p));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const RmhaParams& p, cudaStream_t stream) {
  const BwdGrid<T> grid(p);
  const int64_t blocks = grid.kv_blocks + grid.dq_blocks;
  if (blocks > 0) {
    const cudaError_t err = p.tau != nullptr ? launch_bwd_kernel<T, TimeBuckets>(p, blocks, grid.kv_blocks, stream)
                                             : launch_bwd_kernel<T, PositionBuckets>(p, blocks, grid.kv_blocks, stream);
    if (err != cudaSuccess) return err;
  }
  for (int which = 0; which < 2; ++which) {
    RowSumParams rs = table_sum_params<T>(p, which);
    rs.workspace = static_cast<unsigned char*>(p.workspace) + partials_bytes<T>(p);
    const cudaError_t err = row_sum(rs, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace attn

int64_t rmha_backward_smem_bytes(const RmhaParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return attn::bwd_smem<float>(p);
    case DType::kFloat16: return attn::bwd_smem<__half>(p);
    case DType::kBFloat16: return attn::bwd_smem<__nv_bfloat16>(p);
    case DType::kFloat64: return attn::bwd_smem<double>(p);
  }
  return 0;
}

int64_t rmha_backward_workspace_bytes(const RmhaParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return attn::bwd_workspace<float>(p);
    case DType::kFloat16: return attn::bwd_workspace<__half>(p);
    case DType::kBFloat16: return attn::bwd_workspace<__nv_bfloat16>(p);
    case DType::kFloat64: return attn::bwd_workspace<double>(p);
  }
  return 0;
}

cudaError_t rmha_backward(const RmhaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return attn::launch_bwd<float>(p, stream);
    case DType::kFloat16: return attn::launch_bwd<__half>(p, stream);
    case DType::kBFloat16: return attn::launch_bwd<__nv_bfloat16>(p, stream);
    case DType::kFloat64: return attn::launch_bwd<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpe
