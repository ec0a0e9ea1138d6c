// Fused attention, version 1.2: FlashAttention-2 (Dao 2023, "FlashAttention-2") on the tensor cores
// through mma.sync, for every GPU from sm_80 (Ampere) on. bf16/fp16 in, fp32 accumulate, head_dim 64 or
// 128, non-causal, n = kv_lens[b] valid keys per sample. Notation and the accumulator layout: common.cuh.
//
// Forward (fwd_kernel), O = softmax(s Q K^T) V for one (b, h) without ever storing the Lq x n scores:
//   * A block takes 16 MT W query rows: W warps, each owning MT 16-row m-tiles. It streams the n valid
//     keys in tiles of FWD_BN = 64, copying K and V global -> shared with cp.async, double-buffered: tile
//     j + 1 is in flight while tile j is computed.
//   * Per key tile each warp computes S = Q K^T for its rows (mma.m16n8k16, fragments fetched from
//     shared memory by ldmatrix), then one online-softmax step (common.cuh): the running row max m grows,
//     P = 2^(s log2(e) S - m), the row sums l and the output accumulator are rescaled by 2^(m_old - m).
//     Then O += P V, P straight from registers (its C fragments are the next product's A fragments).
//   * At the end O / l is stored, with the row's log-sum-exp lse = m + log2(l) (base 2) for the backward.
//   * Padded keys cost nothing: the loop stops after ceil(n / 64) tiles; the copy zero-fills rows >= n,
//     never reading them, and in the last tile their scores are set to -inf, so P = 0 there.
// Backward, from Q, K, V, O, dO and lse; P is recomputed from lse, never stored:
//   1. delta = rowsum(dO * O) per query row (= rowsum(P * dP)): common.cuh's delta kernel.
//   2. dK, dV (bwd_dkdv_kernel): a block owns 16 W keys and loops over all queries in 32-row tiles,
//      computing the transposes so each warp holds whole key rows: S^T = K Q^T, P^T = 2^(s log2(e) S^T -
//      lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta); dV += P^T dO, dK += dS^T Q, in registers, stored once
//      (dK times s). A padded key gets P = 0 and so exact-zero gradients; a block of padded keys only
//      writes zeros and returns.
//   3. dQ (bwd_dq_kernel): a block owns 16 W query rows and streams the valid keys like the forward,
//      recomputing S, P, dP, dS; dQ += dS K, stored once: 7 products in all instead of 5, but no atomics
//      and no fp32 buffer. Steps 2 and 3 are independent of each other.
//
// mma.m16n8k16's operand fragments (PTX ISA), lane = 4 g + t, beside the C layout of common.cuh:
//   A 16x16 row-major, 4 regs of 2 halves: a0 (row g, cols 2t..2t+1)   a1 (row g+8, cols 2t..2t+1)
//                                          a2 (row g, cols 2t+8..+9)   a3 (row g+8, cols 2t+8..+9)
//   B 16x8 (k x n), 2 regs:                b0 (k 2t..2t+1, col g)      b1 (k 2t+8..2t+9, col g)
// ldmatrix .x4 loads four 8x8 tiles; lanes 8i..8i+7 give the row addresses of tile i, and register i of
// lane (g, t) gets row g, cols 2t..2t+1 of tile i (of its transpose with .trans). Two consequences: the C
// fragments of two adjacent 8-column blocks are exactly the A fragment of one 16-wide k-step (so P never
// leaves registers between the two products), and a row-major [n][k] tile in shared memory (K, for Q K^T)
// gives B fragments with plain ldmatrix, while a [k][n] tile (V, for P V) needs .trans.
#include "common.cuh"

namespace {
// Each warp owns 16 rows (queries in the forward and dQ kernels, keys in the dK/dV kernel); the warp
// counts W are chosen in the launchers at the bottom.
constexpr int FWD_BN = 64;    // forward: keys per tile
constexpr int BWD_BM = 32;    // backward dK/dV: queries per tile
constexpr int DQ_BN = 64;     // backward dQ: keys per tile
constexpr int DQ_CHUNK = 32;  // backward dQ: keys taken from S to dQ at a time (see there)
// Shared-memory rows are padded by 16 bytes: with D = 128 a row is 272 bytes, so the 8 row addresses of
// one ldmatrix tile fall 4 banks apart and cover all 32 banks once (no conflicts). Same for D = 64.
constexpr int PAD = 8;

// PTX wrappers --------------------------------------------------------------------------------------
// 16-byte async copy global -> shared. With valid == false the source is not read and 16 zero bytes
// are written: that is how rows past L (or past kv_len) become zeros without a branch around the copy.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
// c += a * b for one 16x8x16 block.
template <typename T>
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#define MMA(TY)                                                                                         \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, " \
        "{%8, %9}, {%0, %1, %2, %3};\n"                                                                 \
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
    if constexpr (std::is_same<T, __nv_bfloat16>::value) MMA("bf16"); else MMA("f16");
#undef MMA
}

// Tiles ---------------------------------------------------------------------------------------------
// Start async copies of rows [row0, row0 + ROWS) of one (b, h) slice (row stride ld elements) into a
// [ROWS][D + PAD] shared tile by the block's NT threads; rows >= n are zero-filled and never read.
// Consecutive threads take consecutive 16-byte chunks of a row: one coalesced read per row.
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(T* tile, const T* g, long long ld, int row0, int n) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    static_assert((ROWS * CHUNKS) % NT == 0, "tile chunks must split evenly over the threads");
#pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / NT; ++i) {
        const int c = i * NT + threadIdx.x;
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const bool valid = row0 + r < n;
        cp_async_16(tile + r * (D + PAD) + col, valid ? g + (row0 + r) * ld + col : g, valid);
    }
}

// ldmatrix row address of lane `lane` for an A fragment (16x16 at row r0, col c0 of a [.][stride]
// tile, A row-major in the tile), and likewise the .trans B fragment of a [k][n] tile: tiles 0..3 =
// (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
template <typename T>
__device__ __forceinline__ const T* frag_a(const T* tile, int stride, int r0, int c0, int lane) {
    return tile + (r0 + (lane & 15)) * stride + c0 + (lane >> 4) * 8;
}
// ldmatrix row address for the B fragments of two adjacent 8-wide n blocks from an [n][k] tile: tiles
// 0..3 = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15): r[0], r[1] are b0, b1 of
// block n0, r[2], r[3] those of block n0 + 8.
template <typename T>
__device__ __forceinline__ const T* frag_b(const T* tile, int stride, int n0, int k0, int lane) {
    return tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + k0 + ((lane >> 3) & 1) * 8;
}

// ---------------------------------------------------------------------------------------------------
// Forward: one block = 16 MT W query rows of one (b, h). With MT = 2 each K/V fragment read from shared
// memory feeds two mma (half the shared-memory reads per FLOP, the limit here), and Q is re-read from
// shared memory at every k-step instead of held in D/2 registers.
template <typename T, int D, int W, int MT>
__global__ void __launch_bounds__(W * 32) fwd_kernel(const AttnParams p) {
    constexpr int NT = W * 32, FWD_BM = 16 * MT * W, STRIDE = D + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);  // [FWD_BM][STRIDE]
    T* sK = sQ + FWD_BM * STRIDE;        // [2][FWD_BN][STRIDE]
    T* sV = sK + 2 * FWD_BN * STRIDE;    // [2][FWD_BN][STRIDE]
    const int m0 = blockIdx.x * FWD_BM, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int r0 = warp * 16 * MT;  // this warp's first row in the block
    const int kv_len = p.kv_lens[b], n_tiles = (kv_len + FWD_BN - 1) / FWD_BN;  // keys past kv_len: no cost
    const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
    const T* k = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
    const T* v = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;
    load_tile<T, FWD_BM, D, NT>(sQ, q, p.q.stride_l, m0, p.len_q);
    load_tile<T, FWD_BN, D, NT>(sK, k, p.k.stride_l, 0, kv_len);
    load_tile<T, FWD_BN, D, NT>(sV, v, p.v.stride_l, 0, kv_len);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    // MT = 1: this warp's 16 query rows as A fragments, held in registers for the whole key loop (D/4
    // regs). MT = 2 reads them from sQ inside the loop instead (sQ is never overwritten).
    uint32_t qf[MT == 1 ? D / 16 : 1][4];
    if constexpr (MT == 1) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(qf[ks], frag_a(sQ, STRIDE, r0, ks * 16, lane));
    }
    // Two rows per thread and m-tile: r = 0 is row g, r = 1 is row g + 8 (softmax_step above).
    const float scale_log2 = p.scale * LOG2E;
    float o[MT][D / 8][4] = {};
    float m_row[MT][2], l_row[MT][2];  // l: this thread's part of the row sums; the quad is summed at the end
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m_row[mt][0] = m_row[mt][1] = -INFINITY, l_row[mt][0] = l_row[mt][1] = 0.f;

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < n_tiles) {  // buffer buf^1 was last read in iteration j-1, before its closing barrier
            load_tile<T, FWD_BN, D, NT>(sK + (buf ^ 1) * FWD_BN * STRIDE, k, p.k.stride_l, (j + 1) * FWD_BN, kv_len);
            load_tile<T, FWD_BN, D, NT>(sV + (buf ^ 1) * FWD_BN * STRIDE, v, p.v.stride_l, (j + 1) * FWD_BN, kv_len);
            cp_async_commit();
        }
        const T *sKj = sK + buf * FWD_BN * STRIDE, *sVj = sV + buf * FWD_BN * STRIDE;
        // S = Q K^T: 16 MT rows x FWD_BN keys per warp.
        float s[MT][FWD_BN / 8][4] = {};
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (MT == 1) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) qa[0][e] = qf[ks][e];
                } else {
                    ldmatrix_x4(qa[mt], frag_a(sQ, STRIDE, r0 + 16 * mt, ks * 16, lane));
                }
            }
#pragma unroll
            for (int nb = 0; nb < FWD_BN / 8; nb += 2) {
                uint32_t kf[4];
                ldmatrix_x4(kf, frag_b(sKj, STRIDE, nb * 8, ks * 16, lane));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma<T>(s[mt][nb], qa[mt], kf[0], kf[1]);
                    mma<T>(s[mt][nb + 1], qa[mt], kf[2], kf[3]);
                }
            }
        }
        // Keys past kv_len (only in the last tile) drop out of the softmax.
        if ((j + 1) * FWD_BN > kv_len) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mask_keys(s[mt], j * FWD_BN, kv_len, t);
        }
        // Online softmax: new running max, rescale what was accumulated under the old one.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) softmax_step(s[mt], o[mt], m_row[mt], l_row[mt], scale_log2);
        // O += P V. The C fragments of key blocks 2kk and 2kk+1 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < FWD_BN / 16; ++kk) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) pack_a<T>(s[mt], kk, pa[mt]);
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, frag_a(sVj, STRIDE, kk * 16, nd * 8, lane));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma<T>(o[mt][nd], pa[mt], vf[0], vf[1]);
                    mma<T>(o[mt][nd + 1], pa[mt], vf[2], vf[3]);
                }
            }
        }
        cp_async_wait_all();  // tile j+1 has landed (this thread's copies) ...
        __syncthreads();      // ... everyone's, and everyone is done reading tile j
    }
    // O = acc / l, and the row's log2-sum-exp2 for the backward.
    T* out = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
    float* lse = p.lse + (static_cast<long long>(b) * p.heads + h) * p.len_q;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_rows(o[mt], m_row[mt], l_row[mt], out, p.o.stride_l, lse, m0 + r0 + 16 * mt + g, p.len_q, t);
}

// ---------------------------------------------------------------------------------------------------
// Backward, step 2 (dK, dV): a block loops over all queries in BWD_BM-row tiles (double-buffered).
template <typename T, int D, int W>
__global__ void __launch_bounds__(W * 32) bwd_dkdv_kernel(const AttnParams p) {
    constexpr int NT = W * 32, BWD_BN = 16 * W, STRIDE = D + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);  // [BWD_BN][STRIDE]
    T* sV = sK + BWD_BN * STRIDE;        // [BWD_BN][STRIDE]
    T* sQ = sV + BWD_BN * STRIDE;        // [2][BWD_BM][STRIDE]
    T* sdO = sQ + 2 * BWD_BM * STRIDE;   // [2][BWD_BM][STRIDE]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * BWD_BM * STRIDE);  // [2][BWD_BM]
    float* sDelta = sLse + 2 * BWD_BM;                                 // [2][BWD_BM]
    const int n0 = blockIdx.x * BWD_BN, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_len = p.kv_lens[b];
    const BwdSlice<T> in = bwd_slice<T>(p, b, h);
    if (n0 >= kv_len) {  // a block of padded keys only: their gradients are zero, nothing else to do
        zero_key_rows<T, D, NT>(p, in, n0, min(BWD_BN, p.len_k - n0));
        return;
    }
    const T *q = in.q, *k = in.k, *v = in.v, *dout = in.dout;
    // Queries past Lq: zero Q and dO rows, lse = +inf (BwdSlice::lse_at): they add nothing.
    auto load_queries = [&](int tile, int buf) {
        load_tile<T, BWD_BM, D, NT>(sQ + buf * BWD_BM * STRIDE, q, p.q.stride_l, tile * BWD_BM, p.len_q);
        load_tile<T, BWD_BM, D, NT>(sdO + buf * BWD_BM * STRIDE, dout, p.dout.stride_l, tile * BWD_BM, p.len_q);
        if (threadIdx.x < BWD_BM) {  // NT >= 128 > BWD_BM
            sLse[buf * BWD_BM + threadIdx.x] = in.lse_at(tile * BWD_BM + threadIdx.x, p.len_q);
            sDelta[buf * BWD_BM + threadIdx.x] = in.delta_at(tile * BWD_BM + threadIdx.x, p.len_q);
        }
    };
    load_tile<T, BWD_BN, D, NT>(sK, k, p.k.stride_l, n0, kv_len);  // keys past kv_len: zero rows, masked below
    load_tile<T, BWD_BN, D, NT>(sV, v, p.v.stride_l, n0, kv_len);
    load_queries(0, 0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    const float scale_log2 = p.scale * LOG2E;
    const int kw = warp * 16;  // this warp's first key within the block
    const int q_tiles = (p.len_q + BWD_BM - 1) / BWD_BM;
    // Which of this thread's two key rows (g, g + 8) are real keys; fixed for the whole query loop.
    const bool valid_key[2] = {n0 + kw + g < kv_len, n0 + kw + g + 8 < kv_len};
    float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};

    for (int it = 0; it < q_tiles; ++it) {
        const int buf = it & 1;
        if (it + 1 < q_tiles) {  // buffer buf^1 was last read before the previous iteration's final barrier
            load_queries(it + 1, buf ^ 1);
            cp_async_commit();
        }
        const T *sQi = sQ + buf * BWD_BM * STRIDE, *sdOi = sdO + buf * BWD_BM * STRIDE;
        const float *lse_i = sLse + buf * BWD_BM, *delta_i = sDelta + buf * BWD_BM;
        // S^T = K Q^T and dP^T = V dO^T: 16 keys x BWD_BM queries per warp.
        float st[BWD_BM / 8][4] = {}, dpt[BWD_BM / 8][4] = {};
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            uint32_t ka[4], va[4];
            ldmatrix_x4(ka, frag_a(sK, STRIDE, kw, ks * 16, lane));
            ldmatrix_x4(va, frag_a(sV, STRIDE, kw, ks * 16, lane));
#pragma unroll
            for (int nb = 0; nb < BWD_BM / 8; nb += 2) {
                uint32_t qb[4], db[4];
                ldmatrix_x4(qb, frag_b(sQi, STRIDE, nb * 8, ks * 16, lane));
                ldmatrix_x4(db, frag_b(sdOi, STRIDE, nb * 8, ks * 16, lane));
                mma<T>(st[nb], ka, qb[0], qb[1]);
                mma<T>(st[nb + 1], ka, qb[2], qb[3]);
                mma<T>(dpt[nb], va, db[0], db[1]);
                mma<T>(dpt[nb + 1], va, db[2], db[3]);
            }
        }
        // P^T from the saved lse (key rows g, g+8; query columns 2t, 2t+1), then dS^T in place of dP^T.
#pragma unroll
        for (int nb = 0; nb < BWD_BM / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = nb * 8 + 2 * t + (e & 1);
                const float pv = valid_key[e >> 1] ? fast_exp2(fmaf(st[nb][e], scale_log2, -lse_i[qi])) : 0.f;
                st[nb][e] = pv;
                dpt[nb][e] = pv * (dpt[nb][e] - delta_i[qi]);
            }
        }
        // dV += P^T dO and dK += dS^T Q: A from registers, B = dO / Q tiles ([query][d]: .trans).
#pragma unroll
        for (int kk = 0; kk < BWD_BM / 16; ++kk) {
            uint32_t pa[4], sa[4];
            pack_a<T>(st, kk, pa);
            pack_a<T>(dpt, kk, sa);
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {
                uint32_t db[4], qb[4];
                ldmatrix_x4_trans(db, frag_a(sdOi, STRIDE, kk * 16, nd * 8, lane));
                ldmatrix_x4_trans(qb, frag_a(sQi, STRIDE, kk * 16, nd * 8, lane));
                mma<T>(dv_acc[nd], pa, db[0], db[1]);
                mma<T>(dv_acc[nd + 1], pa, db[2], db[3]);
                mma<T>(dk_acc[nd], sa, qb[0], qb[1]);
                mma<T>(dk_acc[nd + 1], sa, qb[2], qb[3]);
            }
        }
        cp_async_wait_all();
        __syncthreads();  // next tile landed; sQ/sdO/sLse/sDelta of this one free to overwrite
    }
    // dK = s * dS^T Q (the scale of S = s Q K^T), dV as accumulated. Rows past kv_len hold exact zeros.
    store_scaled(dk_acc, in.dk, p.dk.stride_l, n0 + kw + g, p.len_k, t, p.scale);
    store_scaled(dv_acc, in.dv, p.dv.stride_l, n0 + kw + g, p.len_k, t, 1.f);
}

// ---------------------------------------------------------------------------------------------------
// Backward, step 3 (dQ): the forward's loop shape, K and V double-buffered, Q and dO held as A fragments.
template <typename T, int D, int W>
__global__ void __launch_bounds__(W * 32) bwd_dq_kernel(const AttnParams p) {
    constexpr int NT = W * 32, BM = 16 * W, BN = DQ_BN, STRIDE = D + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);  // [2][BN][STRIDE]
    T* sV = sK + 2 * BN * STRIDE;        // [2][BN][STRIDE]
    // Q and dO pass through the K/V buffers before the key loop (registers after it): 99 KB GPUs fit any W.
    static_assert(2 * BM <= 4 * BN, "Q and dO must fit in the K/V buffers");
    T* sQ = sK;                 // [BM][STRIDE], before the key loop only
    T* sdO = sQ + BM * STRIDE;  // [BM][STRIDE], before the key loop only
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_len = p.kv_lens[b], n_tiles = (kv_len + BN - 1) / BN;  // keys past kv_len cost nothing
    const BwdSlice<T> in = bwd_slice<T>(p, b, h);
    const T *q = in.q, *k = in.k, *v = in.v, *dout = in.dout;
    // Rows past Lq load as zeros (their results are not stored).
    load_tile<T, BM, D, NT>(sQ, q, p.q.stride_l, m0, p.len_q);
    load_tile<T, BM, D, NT>(sdO, dout, p.dout.stride_l, m0, p.len_q);
    cp_async_commit();
    // This thread's two rows (g and g + 8 of the warp's 16): their lse and delta, read once.
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_lse[r] = in.lse_at(m0 + warp * 16 + g + 8 * r, p.len_q);
        row_delta[r] = in.delta_at(m0 + warp * 16 + g + 8 * r, p.len_q);
    }
    cp_async_wait_all();
    __syncthreads();
    // This warp's 16 rows of Q and dO as A fragments, in registers for the whole key loop (D/2 regs).
    uint32_t qf[D / 16][4], df[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        ldmatrix_x4(qf[ks], frag_a(sQ, STRIDE, warp * 16, ks * 16, lane));
        ldmatrix_x4(df[ks], frag_a(sdO, STRIDE, warp * 16, ks * 16, lane));
    }
    __syncthreads();  // every warp has its Q and dO fragments: the buffers go to K and V now
    load_tile<T, BN, D, NT>(sK, k, p.k.stride_l, 0, kv_len);
    load_tile<T, BN, D, NT>(sV, v, p.v.stride_l, 0, kv_len);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();  // tile 0 is in
    const float scale_log2 = p.scale * LOG2E;
    float dq[D / 8][4] = {};

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < n_tiles) {  // buffer buf^1 was last read in iteration j-1, before its closing barrier
            load_tile<T, BN, D, NT>(sK + (buf ^ 1) * BN * STRIDE, k, p.k.stride_l, (j + 1) * BN, kv_len);
            load_tile<T, BN, D, NT>(sV + (buf ^ 1) * BN * STRIDE, v, p.v.stride_l, (j + 1) * BN, kv_len);
            cp_async_commit();
        }
        const T *sKj = sK + buf * BN * STRIDE, *sVj = sV + buf * BN * STRIDE;
        const bool tail = (j + 1) * BN > kv_len;  // the last tile, partly past kv_len
        // The tile in chunks of DQ_CHUNK keys, each taken all the way from S to dQ, so only one chunk's S
        // and dP are live next to Q, dO and dQ (all 64 keys at once spill at D = 128); same mma count.
#pragma unroll
        for (int c0 = 0; c0 < BN; c0 += DQ_CHUNK) {
            // S = Q K^T and dP = dO V^T: 16 rows x DQ_CHUNK keys per warp.
            float s[DQ_CHUNK / 8][4] = {}, dp[DQ_CHUNK / 8][4] = {};
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
                for (int nb = 0; nb < DQ_CHUNK / 8; nb += 2) {
                    uint32_t kf[4], vf[4];
                    ldmatrix_x4(kf, frag_b(sKj, STRIDE, c0 + nb * 8, ks * 16, lane));
                    ldmatrix_x4(vf, frag_b(sVj, STRIDE, c0 + nb * 8, ks * 16, lane));
                    mma<T>(s[nb], qf[ks], kf[0], kf[1]);
                    mma<T>(s[nb + 1], qf[ks], kf[2], kf[3]);
                    mma<T>(dp[nb], df[ks], vf[0], vf[1]);
                    mma<T>(dp[nb + 1], df[ks], vf[2], vf[3]);
                }
            }
            // dS = P (dP - delta), into s. Keys past kv_len (only in the last tile; their K and V rows were
            // zero-filled, so s and dp are finite there) get P = 0.
#pragma unroll
            for (int nb = 0; nb < DQ_CHUNK / 8; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float pv = fast_exp2(fmaf(s[nb][e], scale_log2, -row_lse[e >> 1]));
                    if (tail && j * BN + c0 + nb * 8 + 2 * t + (e & 1) >= kv_len) pv = 0.f;
                    s[nb][e] = pv * (dp[nb][e] - row_delta[e >> 1]);
                }
            }
            // dQ += dS K: dS as A fragments, K a [key][d] = [k][n] tile read with .trans (as V in P V).
#pragma unroll
            for (int kk = 0; kk < DQ_CHUNK / 16; ++kk) {
                uint32_t sa[4];
                pack_a<T>(s, kk, sa);
#pragma unroll
                for (int nd = 0; nd < D / 8; nd += 2) {
                    uint32_t kb[4];
                    ldmatrix_x4_trans(kb, frag_a(sKj, STRIDE, c0 + kk * 16, nd * 8, lane));
                    mma<T>(dq[nd], sa, kb[0], kb[1]);
                    mma<T>(dq[nd + 1], sa, kb[2], kb[3]);
                }
            }
        }
        cp_async_wait_all();  // tile j+1 has landed (this thread's copies) ...
        __syncthreads();      // ... everyone's, and everyone is done reading tile j
    }
    // dQ = s * dS K (the scale of S = s Q K^T), to the input dtype; rows past Lq are not stored.
    T* dqp = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h;
    store_scaled(dq, dqp, p.dq.stride_l, m0 + warp * 16 + g, p.len_q, t, p.scale);
}

// Launchers -----------------------------------------------------------------------------------------
// Shared memory a block may opt into: 227 KB on the H100, 163 KB on the A100, 99 KB on sm_86 and sm_89.
int max_smem_per_block() {
    int dev = 0, bytes = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
    return bytes;
}
template <typename T, int D, int W, int MT> constexpr int fwd_smem() {  // Q, 2 x K, 2 x V
    return (16 * MT * W + 4 * FWD_BN) * (D + PAD) * static_cast<int>(sizeof(T));
}
template <typename T, int D, int W, int MT>
cudaError_t launch_forward(const AttnParams& p, cudaStream_t stream) {
    constexpr int BM = 16 * MT * W;
    const dim3 grid((p.len_q + BM - 1) / BM, p.heads, p.batch);
    return launch(fwd_kernel<T, D, W, MT>, grid, W * 32, fwd_smem<T, D, W, MT>(), stream, p);
}

// The forward's block: 32 query rows per warp; at D = 128, 8 warps, so each K/V tile copied serves 256
// rows (139,264 B of shared memory); where that does not fit (sm_86, sm_89), 4 warps x 16 rows (87,040 B).
template <typename T, int D>
cudaError_t forward(const AttnParams& p, cudaStream_t stream) {
    if constexpr (D == 128) {
        if (fwd_smem<T, D, 8, 2>() <= max_smem_per_block()) return launch_forward<T, D, 8, 2>(p, stream);
        return launch_forward<T, D, 4, 1>(p, stream);
    } else {
        return launch_forward<T, D, 4, 2>(p, stream);
    }
}

// The backward: delta, then dK/dV (4 warps: 64 keys per block) and dQ (8 warps at D = 128, 4 at D = 64),
// which depend on delta and lse only, not on each other.
template <typename T, int D>
cudaError_t backward(const AttnParams& p, cudaStream_t stream) {
    constexpr int DKDV_W = 4, DQ_W = D == 128 ? 8 : 4, BYTES = sizeof(T);
    // Shared memory: dK/dV K, V, 2 x (Q, dO, lse, delta); dQ 2 x (K, V), which Q and dO pass through first.
    constexpr int DKDV_SMEM = (2 * 16 * DKDV_W + 4 * BWD_BM) * (D + PAD) * BYTES + 4 * BWD_BM * 4;
    constexpr int DQ_SMEM = 4 * DQ_BN * (D + PAD) * BYTES;
    cudaError_t err = launch_delta<T, D>(p, stream);
    if (err == cudaSuccess)
        err = launch(bwd_dkdv_kernel<T, D, DKDV_W>, dim3((p.len_k + 16 * DKDV_W - 1) / (16 * DKDV_W), p.heads,
                     p.batch), DKDV_W * 32, DKDV_SMEM, stream, p);
    if (err == cudaSuccess)
        err = launch(bwd_dq_kernel<T, D, DQ_W>, dim3((p.len_q + 16 * DQ_W - 1) / (16 * DQ_W), p.heads, p.batch),
                     DQ_W * 32, DQ_SMEM, stream, p);
    return err;
}
}  // namespace

ATTN_ENTRY(attn_portable_forward, forward)
ATTN_ENTRY(attn_portable_backward, backward)
const char* attn_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
