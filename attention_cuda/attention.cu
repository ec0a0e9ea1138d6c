// Fused attention. Version 1.2 (every GPU from sm_80): FlashAttention-2 style tiling on the tensor cores
// through mma.sync (m16n8k16, bf16/fp16 in, fp32 accumulate), ldmatrix loads from shared memory, cp.async
// copies from global memory, online softmax in base 2, per-sample key lengths. Forward and backward.
// Version 2.0 (sm_90a): the same work on wgmma, in the *_wgmma_kernel functions below; version 2.1
// (sm_90a, the default on Hopper since it was measured fastest): TMA copies, warp specialisation and, in
// the forward, FlashAttention-3's two overlaps, the *_ws_kernel functions.
//
// Depends on CUDA headers only; binding.cpp wraps it for torch. Notation: B batch, H heads, D head_dim,
// Lq queries, Lk keys, n = kv_lens[b] valid keys. softmax scale s = 1/sqrt(D).
//
// Work: forward 4*Lq*n*D FLOPs per (b, h) (Q K^T and P V, 2 each); backward 10*Lq*n*D of useful work
// (recomputing Q K^T, then dP = dO V^T, dV, dK, dQ), 2.5x the forward. Executed since version 1.1:
// 14*Lq*n*D, 3.5x, because the dQ kernel recomputes Q K^T and dO V^T instead of taking dS from the dK/dV
// kernel through fp32 atomics. The forward moves at least 4*L*D*2 bytes per (b, h) (read Q, K, V,
// write O): n/2 FLOP per byte, ~34,000 at L = 67,576, against the H100's ~230
// (779 TFLOP/s over 3.35 TB/s). The tensor cores set the pace, not memory.
//
// mma.m16n8k16 fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4*g + t:
//   A 16x16 row-major, 4 regs of 2 halves: a0 (row g,   cols 2t..2t+1)   a1 (row g+8, cols 2t..2t+1)
//                                          a2 (row g,   cols 2t+8..+9)   a3 (row g+8, cols 2t+8..+9)
//   B 16x8 (k x n),    2 regs:             b0 (k 2t..2t+1, col g)        b1 (k 2t+8..2t+9, col g)
//   C 16x8 fp32,       4 floats:           c0,c1 (row g, cols 2t, 2t+1)  c2,c3 (row g+8, same cols)
// ldmatrix .x4 loads four 8x8 tiles; lanes 8i..8i+7 give the row addresses of tile i, and register i of
// lane (g, t) gets row g, cols 2t..2t+1 of tile i (of its transpose with .trans).
// Two useful consequences: the C fragments of two adjacent 8-column blocks are exactly the A fragment
// of one 16-wide k-step (so P never leaves registers between the two products), and a row-major
// [n][k] tile in shared memory (K, for Q K^T) gives B fragments with plain ldmatrix, while a [k][n]
// tile (V, for P V) needs .trans.

#include <cuda.h>  // CUtensorMap and its enums only: nothing links libcuda (see tensor_map)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#include "attention.h"

namespace {

// Every kernel below but the delta one is templated on its warp count W; each warp owns 16 rows (query
// rows in the forward and the dQ kernel, key rows in the dK/dV kernel), so a block covers 16 W rows.
// The choice per head_dim is made in the launchers at the bottom (warps_for).
constexpr int FWD_BN = 64;          // forward: keys per tile
constexpr int BWD_BM = 32;          // backward dK/dV: queries per tile
constexpr int DQ_BN = 64;           // backward dQ: keys per tile
constexpr int DQ_CHUNK = 32;        // backward dQ: keys taken from S to dQ at a time (see there)
// Shared-memory rows are padded by 16 bytes: with D = 128 a row is 272 bytes, so the 8 row addresses of
// one ldmatrix tile fall 4 banks apart and cover all 32 banks once (no conflicts). Same for D = 64.
constexpr int PAD = 8;
constexpr float LOG2E = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

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
template <typename T> __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values, the first in the low half (the lower column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&x);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 x = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&x);
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// 2^x on the special-function unit; 2^-inf = 0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---------------------------------------------------------------------------------------------------
// wgmma (sm_90a only; PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"). A warpgroup, 4
// consecutive warps starting at a multiple of 4, computes D (64 x N, fp32, in registers) (+)= A (64 x 16)
// B (16 x N) asynchronously: issue (wgmma.mma_async), close a group (commit_group), wait for it
// (wait_group). Within the warpgroup, warp w holds rows 16w..16w+15 of D in exactly the mma.m16n8 C layout
// above, repeated over the N/8 column blocks, and an A taken from registers is the mma.m16n8k16 A fragment
// of the warp's 16 rows: the fragment bookkeeping of the mma.sync kernel carries over unchanged.
//
// Operands in shared memory are described by a 64-bit descriptor (bits 0-13 start address >> 4, 16-29
// "leading" byte offset >> 4, 32-45 "stride" byte offset >> 4, 62-63 swizzle: 1 = 128-byte) and must lie
// in the canonical 128-byte-swizzled layout: rows of 64 elements (128 B) in 1024-byte groups of 8 rows,
// the 16-byte chunk c of row r stored at chunk position c ^ (r % 8) (the hardware XORs address bits 4-6
// with bits 7-9, so the tiles start 1024-byte aligned). A tile with D = 128 columns is stored as two
// such 64-column halves one after the other. Then:
//   K-major operand (the 16-wide k-slice contiguous: Q as A, K as B of Q K^T): 8-row groups 1024 B apart
//     (stride offset); the k-step's start address moves 32 B along the 128-byte row, then to the next half.
//   MN-major operand (V as B of P V: rows are keys = k, columns d = n; "transpose B" set): 8-key groups
//     1024 B apart (stride offset), the two 64-column halves of d one half-tile apart (leading offset).

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)  // sm_90a code only (unused helpers warn elsewhere)
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_addr, uint32_t leading_bytes, uint32_t stride_bytes) {
    return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | static_cast<uint64_t>(leading_bytes >> 4) << 16 |
           static_cast<uint64_t>(stride_bytes >> 4) << 32 | 1ull << 62;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N of this thread's most recent groups are pending (older groups complete in order).
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
// Shared memory written by cp.async (the generic proxy) must be fenced before wgmma (the async proxy) reads it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif
// The compiler sees a wgmma's accumulators as written when the instruction is issued, not when wait_group
// returns: this pins every read of them after the wait (an empty volatile asm that "rewrites" each one).
template <int NB>
__device__ __forceinline__ void fence_regs(float (&d)[NB][4]) {
#pragma unroll
    for (int i = 0; i < NB; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e]) :: "memory");
}

#define WGMMA_ACC64 \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
    "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
    "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define WGMMA_REGS64 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WGMMA_ACC128 \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
    "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
    "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), \
    "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
    "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
    "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
    "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define WGMMA_REGS128 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
    " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
    " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"


// d (+)= A B, m64nNk16 (N = 64 or 128), A (64 x 16) and B (16 x N, K-major) from shared memory;
// accumulate = 0 overwrites d (the first k-step of a product).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#define WGMMA_SS(TY, NN, A, B, P)                                                                            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                              \
                 "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TY "." TY " " WGMMA_REGS##NN              \
                 ", " A ", " B ", p, 1, 1, 0, 0;\n}\n"                                                          \
                 : WGMMA_ACC##NN : "l"(desc_a), "l"(desc_b), "r"(accumulate))
    if constexpr (N == 128) {
        if constexpr (std::is_same<T, __nv_bfloat16>::value) WGMMA_SS("bf16", 128, "%64", "%65", "%66");
        else WGMMA_SS("f16", 128, "%64", "%65", "%66");
    } else {
        static_assert(N == 64, "wgmma_ss: N = 64 or 128");
        if constexpr (std::is_same<T, __nv_bfloat16>::value) WGMMA_SS("bf16", 64, "%32", "%33", "%34");
        else WGMMA_SS("f16", 64, "%32", "%33", "%34");
    }
#undef WGMMA_SS
}

// d += A B, m64nNk16 (N = 64 or 128), A from registers (the m16n8k16 A fragment of the warp's 16 rows), B
// (16 x N) MN-major from shared memory (transpose bit set).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
#define WGMMA_RS(TY, NN, A0, A1, A2, A3, B, P)                                                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                               \
                 "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TY "." TY " " WGMMA_REGS##NN               \
                 ", {" A0 ", " A1 ", " A2 ", " A3 "}, " B ", p, 1, 1, 1;\n}\n"                                 \
                 : WGMMA_ACC##NN : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
    if constexpr (N == 128) {
        if constexpr (std::is_same<T, __nv_bfloat16>::value) WGMMA_RS("bf16", 128, "%64", "%65", "%66", "%67", "%68", "%69");
        else WGMMA_RS("f16", 128, "%64", "%65", "%66", "%67", "%68", "%69");
    } else {
        static_assert(N == 64, "wgmma_rs: N = 64 or 128");
        if constexpr (std::is_same<T, __nv_bfloat16>::value) WGMMA_RS("bf16", 64, "%32", "%33", "%34", "%35", "%36", "%37");
        else WGMMA_RS("f16", 64, "%32", "%33", "%34", "%35", "%36", "%37");
    }
#undef WGMMA_RS
}

// The two shapes of product the wgmma kernels run, over tiles stored by load_tile_sw128 (rows of D columns,
// split into 64-column halves of `rows` x 128 B each):
// d = A B^T, contracting the head dim: A = 64 rows at a (of an A_ROWS-row tile), B = N rows at b (of a
// B_ROWS-row tile), both K-major; D / 16 k-steps, 32 B apart along a 128-byte row, then the next half.
// Issued, not committed.
template <typename T, int N, int D, int A_ROWS, int B_ROWS>
__device__ __forceinline__ void wgmma_dot_rows(float (&d)[N / 8][4], uint32_t a, uint32_t b) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t col = (ks % 4) * 32;  // leading offset: unused by swizzled K-major operands
        wgmma_ss<T, N>(d, sw128_desc(a + (ks / 4) * A_ROWS * 128 + col, 16, 1024),
                       sw128_desc(b + (ks / 4) * B_ROWS * 128 + col, 16, 1024), ks > 0);
    }
}
// d += A X, contracting a tile's rows: A from registers (a[kk] covers rows 16 kk..16 kk + 15), X = the
// ROWS x D tile at x as an MN-major operand: k-step kk starts 16 rows (2,048 B) in, and the tile's two
// 64-column halves are ROWS x 128 B apart. Issued, not committed.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void wgmma_acc_rows(float (&d)[D / 8][4], const uint32_t (&a)[ROWS / 16][4], uint32_t x) {
#pragma unroll
    for (int kk = 0; kk < ROWS / 16; ++kk) wgmma_rs<T, D>(d, a[kk], sw128_desc(x + kk * 16 * 128, ROWS * 128, 1024));
}

// ---------------------------------------------------------------------------------------------------
// Tiles

// Start async copies of rows [row0, row0 + ROWS) of one (b, h) slice (row stride ld elements) into a
// [ROWS][D + PAD] shared tile; rows >= n are zero-filled and never read. Consecutive threads take
// consecutive 16-byte chunks of a row: each row is one coalesced 256-byte (D = 128) read.
// NT is the block's thread count (kernels differ in their warp counts).
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
// ldmatrix row address for the B fragments of two adjacent 8-wide n blocks from an [n][k] tile:
// tiles 0..3 = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15), so r[0], r[1] are
// b0, b1 of n block n0 and r[2], r[3] those of block n0 + 8. With .trans on a [k][m] tile the same
// addresses give the A fragment of the transposed tile (used for dS in the backward).
template <typename T>
__device__ __forceinline__ const T* frag_b(const T* tile, int stride, int n0, int k0, int lane) {
    return tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + k0 + ((lane >> 3) & 1) * 8;
}

// ---------------------------------------------------------------------------------------------------
// Shared by the kernels below

// One (b, h) slice of the backward's inputs: Q, K, V, dO rows (stride_l apart) and lse, delta (one per row).
// A query row at or past Lq reads lse = +inf (so its P is 2^-inf = 0) and delta = 0: it adds nothing.
template <typename T>
struct BwdSlice {
    const T *q, *k, *v, *dout;
    const float *lse, *delta;
    T *dk, *dv;  // the dK/dV kernels' outputs
    __device__ float lse_at(int i, int len_q) const { return i < len_q ? lse[i] : INFINITY; }
    __device__ float delta_at(int i, int len_q) const { return i < len_q ? delta[i] : 0.f; }
};
template <typename T>
__device__ __forceinline__ BwdSlice<T> bwd_slice(const AttnParams& p, int b, int h) {
    const long long rows = (static_cast<long long>(b) * p.heads + h) * p.len_q;
    return {static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h,
            static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h,
            static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h,
            static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + h * p.dout.stride_h,
            p.lse + rows, p.delta + rows,
            static_cast<T*>(p.dk.ptr) + b * p.dk.stride_b + h * p.dk.stride_h,
            static_cast<T*>(p.dv.ptr) + b * p.dv.stride_b + h * p.dv.stride_h};
}

// A dK/dV block of padded keys only (its first key n0 >= kv_len): their gradients are zero, written here.
template <typename T, int D, int NT>
__device__ __forceinline__ void zero_key_rows(const AttnParams& p, const BwdSlice<T>& in, int n0, int rows) {
    for (int c = threadIdx.x; c < rows * (D / 8); c += NT) {
        const int r = n0 + c / (D / 8), col = (c % (D / 8)) * 8;
        *reinterpret_cast<uint4*>(in.dk + r * p.dk.stride_l + col) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(in.dv + r * p.dv.stride_l + col) = make_uint4(0, 0, 0, 0);
    }
}

// scale * acc to rows row_g and row_g + 8 of a [.][stride_l] output (C-fragment rows of this thread; its
// columns nd * 8 + 2t, + 1); rows at or past n are not stored.
template <typename T, int ND>
__device__ __forceinline__ void store_scaled(const float (&acc)[ND][4], T* out, long long stride_l, int row_g, int n,
                                             int t, float scale) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row_g + 8 * r;
        if (row >= n) continue;
        T* o = out + row * stride_l + 2 * t;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
            *reinterpret_cast<uint32_t*>(o + nd * 8) = pack2<T>(acc[nd][2 * r] * scale, acc[nd][2 * r + 1] * scale);
    }
}

// C fragments of 8-column blocks (NB of them) -> A fragments of NB / 2 16-wide k-steps: blocks 2kk and
// 2kk + 1 are k-step kk (the identity in the header comment). For the wgmma kernels, which pack a whole
// tile before issuing its products.
template <typename T, int NB>
__device__ __forceinline__ void pack_a(const float (&c)[NB][4], uint32_t (&a)[NB / 2][4]) {
#pragma unroll
    for (int kk = 0; kk < NB / 2; ++kk) {
        a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// ---------------------------------------------------------------------------------------------------
// The forward's softmax, shared by both forward kernels. A thread holds two rows of a 16-row m-tile, g and
// g + 8, as C fragments: s[nb][e] is row g + 8 (e / 2), key nb * 8 + 2t + (e % 2) of the tile (the mma C
// layout above, and also wgmma's accumulator layout within each warp of a warpgroup).

// Keys at or past kv_len (only in a tile that ends past it) drop out of the softmax. key0: the tile's first key.
template <int NB>
__device__ __forceinline__ void mask_keys(float (&s)[NB][4], int key0, int kv_len, int t) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (key0 + nb * 8 + 2 * t + (e & 1) >= kv_len) s[nb][e] = -INFINITY;
}

// One online-softmax step on a tile of raw scores S: the new running row max m (base-2 units, x * s *
// log2(e), so each exponential is one ex2), P = 2^(S s log2e - m) in place of S, the row sums l and the
// output accumulator o rescaled by 2^(m_old - m). Every tile holds at least one valid key (its first key is
// below kv_len), so each row max is finite: no inf - inf. l is this thread's part of the row sum; the quad
// is summed once, at the end.
// softmax_rows does all but the rescale of o and returns the factors in alpha (version 2.1 applies them only
// once the previous tile's P V, still running on the tensor cores, has landed in o); softmax_step does both.
template <int NB>
__device__ __forceinline__ void softmax_rows(float (&s)[NB][4], float (&m_row)[2], float (&l_row)[2],
                                             float scale_log2, float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // Row max and row sum as pairwise trees (4 dependent steps instead of a 16-long chain: with 2 warps per
        // scheduler there is little else to hide each step's latency behind).
        float red[NB];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) red[nb] = fmaxf(s[nb][2 * r], s[nb][2 * r + 1]);
#pragma unroll
        for (int w = NB / 2; w > 0; w /= 2)  // constant trip counts (i < NB / 2), so NB = 16 unrolls fully too
#pragma unroll
            for (int i = 0; i < NB / 2; ++i)
                if (i < w) red[i] = fmaxf(red[i], red[i + w]);
        float mx = red[0];
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share a row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_row[r], mx * scale_log2);
        alpha[r] = fast_exp2(m_row[r] - m_new);  // first tile: 2^-inf = 0
        m_row[r] = m_new;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) s[nb][e] = fast_exp2(fmaf(s[nb][e], scale_log2, -m_new));
            red[nb] = s[nb][2 * r] + s[nb][2 * r + 1];
        }
#pragma unroll
        for (int w = NB / 2; w > 0; w /= 2)
#pragma unroll
            for (int i = 0; i < NB / 2; ++i)
                if (i < w) red[i] += red[i + w];
        l_row[r] = l_row[r] * alpha[r] + red[0];
    }
}
template <int ND>
__device__ __forceinline__ void rescale_rows(float (&o)[ND][4], const float (&alpha)[2]) {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
        o[nd][0] *= alpha[0]; o[nd][1] *= alpha[0];
        o[nd][2] *= alpha[1]; o[nd][3] *= alpha[1];
    }
}
template <int NB, int ND>
__device__ __forceinline__ void softmax_step(float (&s)[NB][4], float (&o)[ND][4], float (&m_row)[2],
                                             float (&l_row)[2], float scale_log2) {
    float alpha[2];
    softmax_rows(s, m_row, l_row, scale_log2, alpha);
    rescale_rows(o, alpha);
}

// O = acc / l to the output dtype, and the row's log2-sum-exp2 m + log2(l) for the backward (l >= 1: the
// max term is 1). row_g: the global row of this thread's row g; rows at or past Lq are not stored.
template <typename T, int ND>
__device__ __forceinline__ void store_rows(const float (&o)[ND][4], const float (&m_row)[2], const float (&l_row)[2],
                                           T* out, long long stride_l, float* lse, int row_g, int len_q, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_row[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = row_g + 8 * r;
        if (row >= len_q) continue;
        const float inv = 1.f / l;
        T* orow = out + row * stride_l + 2 * t;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
            *reinterpret_cast<uint32_t*>(orow + nd * 8) = pack2<T>(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv);
        if (t == 0) lse[row] = m_row[r] + log2f(l);
    }
}

// ---------------------------------------------------------------------------------------------------
// Forward: one block = BM = 16 MT W query rows of one (b, h); each warp owns 16 MT consecutive rows (MT
// m-tiles of 16) and streams all valid keys in FWD_BN-key tiles, double-buffered (the copy of tile j+1
// overlaps the math on tile j). Every warp reads every K/V tile from shared memory: with MT = 1 each K/V
// fragment loaded by ldmatrix feeds one mma (256 B of shared-memory reads per mma, Q held in registers);
// with MT = 2 it feeds two, as in FlashAttention-2's 128-row tiles, and Q, which would then need D/2
// registers, is re-read from shared memory at every k-step (Q K^T 192 B per mma, P V 128 B). At 128 B per
// clock per SM, 256 B per 4,096-FLOP mma caps the SM at 2,048 FLOP/clock (~470 TFLOP/s on 132 SMs at
// 1.75 GHz) before any other cost; MT = 2 lifts that cap to ~750. A larger W makes each tile copied from
// L2 serve more rows (W = 4, MT = 1 at 67k: ~880 GB of K/V copied from L2 per call).

template <typename T, int D, int W, int MT>
__global__ void __launch_bounds__(W * 32) attn_fwd_kernel(const AttnParams p) {
    constexpr int NT = W * 32, FWD_BM = 16 * MT * W;
    constexpr int STRIDE = D + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);  // [FWD_BM][STRIDE]
    T* sK = sQ + FWD_BM * STRIDE;        // [2][FWD_BN][STRIDE]
    T* sV = sK + 2 * FWD_BN * STRIDE;    // [2][FWD_BN][STRIDE]

    const int m0 = blockIdx.x * FWD_BM, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int r0 = warp * 16 * MT;  // this warp's first row in the block
    const int kv_len = p.kv_lens[b];
    const int n_tiles = (kv_len + FWD_BN - 1) / FWD_BN;  // keys past kv_len cost nothing
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
        const T* sKj = sK + buf * FWD_BN * STRIDE;
        const T* sVj = sV + buf * FWD_BN * STRIDE;

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
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
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
// Forward, version 2.0 (sm_90a): both products on wgmma. One block = two warpgroups = WG_BM = 128 query
// rows of one (b, h), 64 per warpgroup; keys in WG_BN = 128-key tiles, K and V double-buffered through
// cp.async into the 128-byte-swizzled layout wgmma reads (load_tile_sw128). Per tile and warpgroup:
//   S = Q K^T   8 (D = 128) wgmma m64n128k16, Q and K from shared memory, one commit, wait;
//   softmax     softmax_step on the accumulators, exactly as in the mma.sync kernel (same layout);
//   O += P V    8 wgmma m64nDk16, P from registers (the C -> A fragment identity again), V from shared.
// The tensor cores read Q, K and V from shared memory themselves: no ldmatrix, no per-warp fragment loads,
// and one m64n128k16 does the work of 64 mma.m16n8k16 (16 per warp). What this version does not do
// yet (FlashAttention-3's next steps, NOTES.md): overlap one warpgroup's softmax with the other's products
// (here both run in step between the per-tile barriers), TMA copies from a producer warp, and the next
// tile's Q K^T issued before this tile's softmax.
constexpr int WG_BM = 128, WG_BN = 128;

// Start async copies of rows [row0, row0 + ROWS) (rows >= n zero-filled) into a [ROWS][D] tile in the
// 128-byte-swizzled layout: 16-byte chunk c of row r at (c / 8) * ROWS * 128 + r * 128 + ((c % 8) ^ (r % 8))
// * 16 bytes. Consecutive threads take consecutive chunks of a global row, as in load_tile.
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile_sw128(unsigned char* tile, const T* g, long long ld, int row0, int n) {
    constexpr int CHUNKS = D / 8;
    static_assert((ROWS * CHUNKS) % NT == 0 && ROWS % 8 == 0, "tile chunks must split evenly over the threads");
#pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / NT; ++i) {
        const int c = i * NT + threadIdx.x;
        const int r = c / CHUNKS, col = c % CHUNKS;
        const bool valid = row0 + r < n;
        cp_async_16(tile + (col / 8) * ROWS * 128 + r * 128 + (((col % 8) ^ (r % 8)) * 16),
                    valid ? g + (row0 + r) * ld + col * 8 : g, valid);
    }
}

template <typename T, int D> constexpr int fwd_wgmma_smem() {  // Q, 2 x K, 2 x V, + 1 KB to align to 1024
    return (WG_BM + 4 * WG_BN) * D * static_cast<int>(sizeof(T)) + 1024;
}

template <typename T, int D>
__global__ void __launch_bounds__(256, 1) attn_fwd_wgmma_kernel(const AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int NT = 256;
    constexpr int Q_BYTES = WG_BM * D * 2, KV_BYTES = WG_BN * D * 2;  // 32 KB each at D = 128
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sK = sQ + Q_BYTES;     // [2][KV_BYTES]
    unsigned char* sV = sK + 2 * KV_BYTES;  // [2][KV_BYTES]

    const int m0 = blockIdx.x * WG_BM, h = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, t = lane % 4;
    const int kv_len = p.kv_lens[b];
    const int n_tiles = (kv_len + WG_BN - 1) / WG_BN;
    const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.stride_b + h * p.q.stride_h;
    const T* k = static_cast<const T*>(p.k.ptr) + b * p.k.stride_b + h * p.k.stride_h;
    const T* v = static_cast<const T*>(p.v.ptr) + b * p.v.stride_b + h * p.v.stride_h;

    load_tile_sw128<T, WG_BM, D, NT>(sQ, q, p.q.stride_l, m0, p.len_q);
    load_tile_sw128<T, WG_BN, D, NT>(sK, k, p.k.stride_l, 0, kv_len);
    load_tile_sw128<T, WG_BN, D, NT>(sV, v, p.v.stride_l, 0, kv_len);
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();

    // This warpgroup's 64 query rows start 64 * 128 B into each 64-column half of sQ.
    const uint32_t q_addr = smem_u32(sQ) + wg * 64 * 128;
    const float scale_log2 = p.scale * LOG2E;
    float o[D / 8][4] = {};
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < n_tiles) {  // buffer buf^1 was last read in iteration j-1, before its closing barrier
            load_tile_sw128<T, WG_BN, D, NT>(sK + (buf ^ 1) * KV_BYTES, k, p.k.stride_l, (j + 1) * WG_BN, kv_len);
            load_tile_sw128<T, WG_BN, D, NT>(sV + (buf ^ 1) * KV_BYTES, v, p.v.stride_l, (j + 1) * WG_BN, kv_len);
            cp_async_commit();
        }
        const uint32_t k_addr = smem_u32(sK + buf * KV_BYTES), v_addr = smem_u32(sV + buf * KV_BYTES);

        // S = Q K^T: 64 rows x 128 keys per warpgroup.
        float s[WG_BN / 8][4];
        wgmma_fence();
        wgmma_dot_rows<T, WG_BN, D, WG_BM, WG_BN>(s, q_addr, k_addr);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);

        if ((j + 1) * WG_BN > kv_len) mask_keys(s, j * WG_BN, kv_len, t);
        softmax_step(s, o, m_row, l_row, scale_log2);

        // O += P V, V as an MN-major operand.
        uint32_t pa[WG_BN / 16][4];
        pack_a<T>(s, pa);
        wgmma_fence();
        wgmma_acc_rows<T, D, WG_BN>(o, pa, v_addr);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);

        cp_async_wait_all();  // tile j+1 has landed (this thread's copies) ...
        fence_proxy_async();  // ... is visible to wgmma ...
        __syncthreads();      // ... everyone's, and everyone is done reading tile j
    }

    T* out = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
    float* lse = p.lse + (static_cast<long long>(b) * p.heads + h) * p.len_q;
    store_rows(o, m_row, l_row, out, p.o.stride_l, lse, m0 + wg * 64 + warp * 16 + lane / 4, p.len_q, t);
#endif
}

// ---------------------------------------------------------------------------------------------------
// Forward, version 2.1 (sm_90a; the default there): FlashAttention-3's structure around version
// 2.0's products (paper: Shah et al. 2024, "FlashAttention-3", sections 3.1-3.2). Three warpgroups:
//   warpgroup 0, the producer: one thread issues TMA (bulk tensor) copies, Q once and then K and V tile by
//     tile into a ring of WS_STAGES shared-memory stages; the copy engine writes the 128-byte-swizzled
//     layout itself (tensor maps built on the host, tensor_map). It gives most of its registers away
//     (setmaxnreg 24), the consumers take them (240).
//   warpgroups 1 and 2, the consumers: 64 query rows each, as the two warpgroups of version 2.0, but no
//     longer in step: each waits for a stage's "full" mbarrier (the copy's bytes have landed) and arrives on
//     its "empty" mbarrier when its products no longer read it, one arrival per warp (8 per stage).
// Two overlaps, each a template switch so a GPU run can time them apart:
//   PINGPONG  the consumers take turns issuing their products (two named barriers): while one warpgroup
//             runs its softmax (exponentials, ~0.6 of the ~2.2 us per tile in NOTES.md's count), the other's
//             products keep the tensor cores busy.
//   OVERLAP   within a warpgroup, tile j's S = Q K^T is issued together with tile j-1's O += P V; the
//             softmax of tile j runs while P V of tile j-1 is still on the tensor cores, and o is rescaled
//             once that has landed (softmax_rows / rescale_rows).
// Padded keys: the producer copies ceil(kv_len / 128) tiles; keys past kv_len in the last one are masked
// to -inf as before, and their V rows, which TMA copies as they are in memory (anything, even NaN: 0 x NaN
// is NaN on the tensor cores too), are zeroed in shared memory before P V (zero_tail_rows, by both
// consumers, which then meet at a barrier: no write can overlap a read of the other's product).
constexpr int WS_STAGES = 2;
constexpr int WS_THREADS = 384;
// mbarriers, 8 bytes each after the tiles: Q full, then per stage K full, V full, K empty, V empty.
constexpr int WS_BARS = 1 + 4 * WS_STAGES;
template <typename T, int D> constexpr int fwd_ws_smem() {  // Q + stages x (K + V) + barriers + 1 KB to align
    return (WG_BM + 2 * WS_STAGES * WG_BN) * D * static_cast<int>(sizeof(T)) + WS_BARS * 8 + 1024;
}

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
// mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier"): a 64-bit shared
// object whose current phase completes when its expected arrivals have arrived and its expected
// transaction bytes (TMA copies) have landed; waits name the parity of the phase they wait for.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// One arrival that also announces `bytes` of copies which will complete on this barrier.
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
// Spin until the phase of the given parity has completed (true at once for the phase before the first).
// Every legitimate wait here lasts microseconds (a tile's copy or a tile's products); one still waiting
// after 2^32 ns (~4 s, by the global nanosecond timer: try_wait may suspend the thread for an unspecified
// while before it returns false, so a count of tries says little about time) is a synchronisation bug, and
// the kernel traps (the launch fails with an error) instead of hanging the GPU. The loop stays inside one
// asm block: written as a C++ loop, ptxas kept more registers live around it and spilled in the overlapped
// forward.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred ready, more;\n.reg .u64 t0, t1;\nmov.u64 t0, %%globaltimer;\n"
                 "wait_again:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
                 "@ready bra wait_done;\n"
                 "mov.u64 t1, %%globaltimer;\n"
                 "sub.u64 t1, t1, t0;\n"
                 "setp.lt.u64 more, t1, 4294967296;\n"
                 "@more bra wait_again;\n"
                 "trap;\n"
                 "wait_done:\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// Copy the box at coordinates (c0 innermost .. c3) of a 4-d tensor map into shared memory at dst; the
// bytes complete on mbarrier bar. dst must be 1024-byte aligned for the 128-byte swizzle.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 :: "r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}
// Named barriers 1.. (0 is __syncthreads): sync waits until `threads` have arrived or synced; arrive doesn't wait.
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
#endif
// A wgmma reads its register A operand until wait_group returns: this keeps those registers' values (and
// so the registers) live until then, as fence_regs does for the accumulators.
template <int NK>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[NK][4]) {
#pragma unroll
    for (int i = 0; i < NK; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e]) :: "memory");
}

// Zero rows [first, ROWS) of a swizzled ROWS x D tile, by NT threads (thread index i in 0..NT-1). The
// swizzle permutes 16-byte chunks within a row only, so a row's 128 bytes per 64-column half stay where
// they are. The tensor cores read the tile next: each writing thread fences its stores into the async
// proxy; the caller then syncs the NT threads.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void zero_tail_rows(unsigned char* tile, int first, int i) {
    for (int c = first * 8 + i; c < ROWS * 8; c += NT)  // 8 chunks of 16 B per 128-byte row
#pragma unroll
        for (int half = 0; half < D / 64; ++half)
            *reinterpret_cast<uint4*>(tile + half * ROWS * 128 + c * 16) = make_uint4(0, 0, 0, 0);
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    fence_proxy_async();
#endif
}

template <typename T, int D, bool PINGPONG, bool OVERLAP>
__global__ void __launch_bounds__(WS_THREADS, 1)
    attn_fwd_ws_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
                       const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int Q_BYTES = WG_BM * D * 2, KV_BYTES = WG_BN * D * 2;  // 32 KB each at D = 128
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sK = sQ + Q_BYTES;                   // [WS_STAGES][KV_BYTES]
    unsigned char* sV = sK + WS_STAGES * KV_BYTES;      // [WS_STAGES][KV_BYTES]
    const uint32_t bars = smem_u32(sV + WS_STAGES * KV_BYTES);
    const uint32_t q_full = bars;
    auto k_full = [&](int st) { return bars + 8 * (1 + st); };
    auto v_full = [&](int st) { return bars + 8 * (1 + WS_STAGES + st); };
    auto k_empty = [&](int st) { return bars + 8 * (1 + 2 * WS_STAGES + st); };
    auto v_empty = [&](int st) { return bars + 8 * (1 + 3 * WS_STAGES + st); };

    const int m0 = blockIdx.x * WG_BM, h = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x / 128;
    const int kv_len = p.kv_lens[b];
    const int n_tiles = (kv_len + WG_BN - 1) / WG_BN;

    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int st = 0; st < WS_STAGES; ++st) {
            mbar_init(k_full(st), 1);  // the producer's arrive_expect; the copies' bytes complete the phase
            mbar_init(v_full(st), 1);
            mbar_init(k_empty(st), 8);  // one arrival per consumer warp
            mbar_init(v_empty(st), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
    }
    __syncthreads();

    if (wg == 0) {
        // Producer. Tile j goes to stage j % WS_STAGES; its n-th use (n = j / WS_STAGES) waits for the
        // consumers' release of the use before, the empty barrier's phase n - 1.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) {
            mbar_arrive_expect(q_full, Q_BYTES);
            for (int half = 0; half < D / 64; ++half)  // rows past len_q: zeros (outside the tensor map)
                tma_load_4d(smem_u32(sQ) + half * WG_BM * 128, &map_q, q_full, half * 64, h, m0, b);
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j % WS_STAGES;
                const uint32_t parity = (j / WS_STAGES) & 1;
                if (j >= WS_STAGES) mbar_wait(k_empty(st), parity ^ 1);
                mbar_arrive_expect(k_full(st), KV_BYTES);
                for (int half = 0; half < D / 64; ++half)
                    tma_load_4d(smem_u32(sK + st * KV_BYTES) + half * WG_BN * 128, &map_k, k_full(st), half * 64, h,
                                j * WG_BN, b);
                if (j >= WS_STAGES) mbar_wait(v_empty(st), parity ^ 1);
                mbar_arrive_expect(v_full(st), KV_BYTES);
                for (int half = 0; half < D / 64; ++half)
                    tma_load_4d(smem_u32(sV + st * KV_BYTES) + half * WG_BN * 128, &map_v, v_full(st), half * 64, h,
                                j * WG_BN, b);
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        const int cw = wg - 1;  // consumer 0 or 1: query rows 64 cw .. 64 cw + 63 of the block
        const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, t = lane % 4;
        const uint32_t q_addr = smem_u32(sQ) + cw * 64 * 128;
        const float scale_log2 = p.scale * LOG2E;
        const int tail = kv_len - (n_tiles - 1) * WG_BN;  // valid keys in the last tile, 1..128
        // Named barrier 1 + c: "consumer c may issue". Consumer 0 goes first; each passes the turn on after
        // issuing a tile's products (id 3: both consumers, after zeroing V's padded rows).
        if (PINGPONG && cw == 1) named_arrive(1, 256);

        float o[D / 8][4] = {};
        float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
        float s[WG_BN / 8][4];
        uint32_t pa[WG_BN / 16][4];  // P of the tile whose P V is pending (OVERLAP) or next
        float alpha[2];              // the last softmax's rescale factors, applied to o once it may be touched
        mbar_wait(q_full, 0);

        // Tile j's S = Q K^T, issued on this consumer's turn (and, with OVERLAP, tile j-1's P V behind it), then
        // waited for, K released, masked, and its softmax computed into alpha (not applied).
        auto scores = [&](int j, bool with_pv) {
            const int st = j % WS_STAGES, prev = (j + WS_STAGES - 1) % WS_STAGES;
            mbar_wait(k_full(st), (j / WS_STAGES) & 1);
            if (with_pv) mbar_wait(v_full(prev), ((j - 1) / WS_STAGES) & 1);
            if (PINGPONG) named_sync(1 + cw, 256);
            wgmma_fence();
            wgmma_dot_rows<T, WG_BN, D, WG_BM, WG_BN>(s, q_addr, smem_u32(sK + st * KV_BYTES));
            wgmma_commit();
            if (with_pv) {  // tile j-1 < the last: no padded V rows
                wgmma_acc_rows<T, D, WG_BN>(o, pa, smem_u32(sV + prev * KV_BYTES));
                wgmma_commit();
                if (PINGPONG) named_arrive(1 + (cw ^ 1), 256);
                wgmma_wait<1>();  // S has landed; P V may still run
            } else {
                if (PINGPONG) named_arrive(1 + (cw ^ 1), 256);
                wgmma_wait<0>();
            }
            fence_regs(s);
            if (lane == 0) mbar_arrive(k_empty(st));  // this warp no longer reads K tile j
            if (j == n_tiles - 1 && tail < WG_BN) mask_keys(s, j * WG_BN, kv_len, t);
            softmax_rows(s, m_row, l_row, scale_log2, alpha);
        };
        // O += P V for tile j, the last (zeroing its padded V rows first) or any (without OVERLAP).
        auto values = [&](int j) {
            const int st = j % WS_STAGES;
            mbar_wait(v_full(st), (j / WS_STAGES) & 1);
            if (j == n_tiles - 1 && tail < WG_BN) {  // both consumers share the work, then wait for each other
                zero_tail_rows<WG_BN, D, 256>(sV + st * KV_BYTES, tail, threadIdx.x - 128);
                named_sync(3, 256);
            }
            wgmma_fence();
            wgmma_acc_rows<T, D, WG_BN>(o, pa, smem_u32(sV + st * KV_BYTES));
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(o);
            fence_regs(pa);
            if (lane == 0) mbar_arrive(v_empty(st));
        };

        if (OVERLAP) {
            scores(0, false);
            pack_a<T>(s, pa);  // o is still 0: nothing to rescale
            for (int j = 1; j < n_tiles; ++j) {
                scores(j, true);
                wgmma_wait<0>();  // tile j-1's P V has landed in o; its P registers and V stage are free
                fence_regs(o);
                fence_regs(pa);
                if (lane == 0) mbar_arrive(v_empty((j - 1) % WS_STAGES));
                rescale_rows(o, alpha);
                pack_a<T>(s, pa);
            }
            values(n_tiles - 1);
        } else {
            for (int j = 0; j < n_tiles; ++j) {
                scores(j, false);
                rescale_rows(o, alpha);
                pack_a<T>(s, pa);
                values(j);
            }
        }
        // Consumer 1 passed the turn once more than consumer 0 took it: take it, so no arrival is left over.
        if (PINGPONG && cw == 0) named_sync(1, 256);

        T* out = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
        float* lse = p.lse + (static_cast<long long>(b) * p.heads + h) * p.len_q;
        store_rows(o, m_row, l_row, out, p.o.stride_l, lse, m0 + cw * 64 + warp * 16 + lane / 4, p.len_q, t);
    }
#endif
}

// ---------------------------------------------------------------------------------------------------
// Backward, step 1: delta[b, h, i] = sum_d dO[i, d] * O[i, d] (= rowsum(P * dP)), one warp per row.

template <typename T, int D>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const AttnParams p) {
    const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= static_cast<long long>(p.batch) * p.len_q * p.heads) return;
    const int h = row % p.heads, i = (row / p.heads) % p.len_q, b = row / (static_cast<long long>(p.heads) * p.len_q);
    const T* o = static_cast<const T*>(p.o.ptr) + b * p.o.stride_b + i * p.o.stride_l + h * p.o.stride_h;
    const T* d = static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + i * p.dout.stride_l + h * p.dout.stride_h;
    float acc = 0.f;
#pragma unroll
    for (int c = lane; c < D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) p.delta[(static_cast<long long>(b) * p.heads + h) * p.len_q + i] = acc;
}

// Backward, step 2 (dK, dV): one block = BWD_BN = 16 W keys of one (b, h), each warp owning 16 of them, looping
// over all queries in BWD_BM-row tiles (double-buffered). With P recomputed from the saved log-sum-exp:
//   S^T = K Q^T, P^T = 2^(S^T s log2e - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dS^T Q  (in registers: this warp's keys only, no reduction across warps)
// Computing the transposes directly gives each warp whole key rows. dQ is not computed here (version 1
// added dS K into an fp32 dQ buffer with atomics from every key block: ~36 GB of reductions per (sample,
// head) at 67k); attn_bwd_dq_kernel computes it instead, once per query tile.

template <typename T, int D, int W>
__global__ void __launch_bounds__(W * 32) attn_bwd_dkdv_kernel(const AttnParams p) {
    constexpr int NT = W * 32, BWD_BN = 16 * W;
    constexpr int STRIDE = D + PAD;
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
    float dk_acc[D / 8][4] = {};
    float dv_acc[D / 8][4] = {};

    for (int it = 0; it < q_tiles; ++it) {
        const int buf = it & 1;
        if (it + 1 < q_tiles) {  // buffer buf^1 was last read before the previous iteration's final barrier
            load_queries(it + 1, buf ^ 1);
            cp_async_commit();
        }
        const T* sQi = sQ + buf * BWD_BM * STRIDE;
        const T* sdOi = sdO + buf * BWD_BM * STRIDE;
        const float* lse_i = sLse + buf * BWD_BM;
        const float* delta_i = sDelta + buf * BWD_BM;

        // S^T = K Q^T and dP^T = V dO^T: 16 keys x BWD_BM queries per warp.
        float st[BWD_BM / 8][4] = {};
        float dpt[BWD_BM / 8][4] = {};
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
            const uint32_t pa[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                                    pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                    pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
            const uint32_t sa[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                                    pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                    pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
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

// Backward, step 3 (dQ): one block = DQ_BM = 16 W query rows of one (b, h), each warp owning 16 rows,
// streaming the valid keys in DQ_BN-key tiles (K and V double-buffered), the forward's loop shape:
//   S = Q K^T, P = 2^(S s log2e - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K,
// Q and dO held in registers as A fragments, dQ accumulated in registers and written once, scaled by s.
// This recomputes S and dP, which the dK/dV kernel also computes (backward matmul work 5 -> 7 products,
// 2.5x -> 3.5x the forward's), in exchange for no atomics and no fp32 dQ buffer.

template <typename T, int D, int W>
__global__ void __launch_bounds__(W * 32) attn_bwd_dq_kernel(const AttnParams p) {
    constexpr int NT = W * 32;
    constexpr int BM = 16 * W, BN = DQ_BN;
    constexpr int STRIDE = D + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);  // [2][BN][STRIDE]
    T* sV = sK + 2 * BN * STRIDE;        // [2][BN][STRIDE]
    // Q and dO pass through the K/V buffers before the key loop (they live in registers after it), so the
    // block needs 69,632 B at D = 128 whatever W is: within the 99 KB per block of sm_86/sm_89 too.
    static_assert(2 * BM <= 4 * BN, "Q and dO must fit in the K/V buffers");
    T* sQ = sK;                 // [BM][STRIDE], before the key loop only
    T* sdO = sQ + BM * STRIDE;  // [BM][STRIDE], before the key loop only

    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_len = p.kv_lens[b];
    const int n_tiles = (kv_len + BN - 1) / BN;  // keys past kv_len cost nothing
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
        const T* sKj = sK + buf * BN * STRIDE;
        const T* sVj = sV + buf * BN * STRIDE;
        const bool tail = (j + 1) * BN > kv_len;  // the last tile, partly past kv_len

        // The tile in chunks of DQ_CHUNK keys, each taken all the way from S to dQ, so only one chunk's S
        // and dP are live next to Q, dO and dQ (all 64 keys at once: 255 registers and a spill at D = 128).
        // The ldmatrix and mma counts are the same as for the whole tile at once.
#pragma unroll
        for (int c0 = 0; c0 < BN; c0 += DQ_CHUNK) {
            // S = Q K^T and dP = dO V^T: 16 rows x DQ_CHUNK keys per warp. B fragments from the [key][d]
            // tiles with plain ldmatrix, as in the forward.
            float s[DQ_CHUNK / 8][4] = {};
            float dp[DQ_CHUNK / 8][4] = {};
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
            // dQ += dS K. The C fragments of key blocks 2kk and 2kk+1 are the A fragment of k-step kk; K
            // is a [key][d] = [k][n] tile, so its B fragments come with .trans (as V in the forward's P V).
#pragma unroll
            for (int kk = 0; kk < DQ_CHUNK / 16; ++kk) {
                const uint32_t sa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                        pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
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

// ---------------------------------------------------------------------------------------------------
// Backward, version 2.0 (sm_90a, ATTENTION_CUDA_BWD_WGMMA=1): the same three steps and the same
// recomputation as the mma.sync backward (delta kernel unchanged), every product a wgmma. One tile in shared
// memory serves both as a K-major operand (its rows on the N side of B, e.g. Q in S^T = K Q^T) and as an
// MN-major one (its rows on the k side, e.g. Q in dK += dS^T Q): the 128-byte-swizzled layout is the same,
// only the descriptor differs (see the wgmma notes above).
constexpr int WGB_BN = 128, WGB_BM = 64;  // dK/dV: keys per block (64 per warpgroup), queries per tile
constexpr int WGQ_BM = 128, WGQ_BN = 64;  // dQ: queries per block (64 per warpgroup), keys per tile

template <typename T, int D> constexpr int dkdv_wgmma_smem() {  // K, V, 2 x (Q, dO), 2 x (lse, delta), + align
    return (2 * WGB_BN + 4 * WGB_BM) * D * static_cast<int>(sizeof(T)) + 4 * WGB_BM * static_cast<int>(sizeof(float)) + 1024;
}
template <typename T, int D> constexpr int dq_wgmma_smem() {  // Q, dO, 2 x (K, V), + align
    return (2 * WGQ_BM + 4 * WGQ_BN) * D * static_cast<int>(sizeof(T)) + 1024;
}

// One dK/dV tile for one warpgroup (versions 2.0 and 2.1): its 64 keys (k_addr, v_addr: 64-row slices of
// the block's K and V) against a 64-query tile (q_addr, do_addr; lse_i, delta_i: the tile's 64 values):
//   S^T = K Q^T, dP^T = V dO^T  (wgmma m64n64k16, A and B from shared memory; issued as two groups)
//   P^T = 2^(S^T s log2e - lse), dS^T = P^T (dP^T - delta), both selected to 0 for keys past kv_len (never
//         multiplied: version 2.1 copies padded K and V rows as they are, NaN included)
//   dV += P^T dO, dK += dS^T Q  (wgmma m64nDk16, A from registers, dO and Q as MN-major B: the K-major B of
//         the first two products, read through another descriptor)
template <typename T, int D>
__device__ __forceinline__ void dkdv_tile(float (&dk_acc)[D / 8][4], float (&dv_acc)[D / 8][4], uint32_t k_addr,
                                          uint32_t v_addr, uint32_t q_addr, uint32_t do_addr, const float* lse_i,
                                          const float* delta_i, const bool (&valid_key)[2], float scale_log2, int t) {
    float s[WGB_BM / 8][4], dp[WGB_BM / 8][4];  // S^T and dP^T: key rows g, g + 8 of the warp; query columns
    wgmma_fence();
    wgmma_dot_rows<T, WGB_BM, D, WGB_BN, WGB_BM>(s, k_addr, q_addr);
    wgmma_commit();
    wgmma_dot_rows<T, WGB_BM, D, WGB_BN, WGB_BM>(dp, v_addr, do_addr);
    wgmma_commit();
    wgmma_wait<1>();  // S^T is in (dP^T may still be running)
    fence_regs(s);
    uint32_t pa[WGB_BM / 16][4], sa[WGB_BM / 16][4];
#pragma unroll
    for (int nb = 0; nb < WGB_BM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int qi = nb * 8 + 2 * t + (e & 1);
            s[nb][e] = valid_key[e >> 1] ? fast_exp2(fmaf(s[nb][e], scale_log2, -lse_i[qi])) : 0.f;
        }
    pack_a<T>(s, pa);
    wgmma_wait<0>();
    fence_regs(dp);
#pragma unroll
    for (int nb = 0; nb < WGB_BM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            dp[nb][e] = valid_key[e >> 1] ? s[nb][e] * (dp[nb][e] - delta_i[nb * 8 + 2 * t + (e & 1)]) : 0.f;
    pack_a<T>(dp, sa);
    wgmma_fence();
    wgmma_acc_rows<T, D, WGB_BM>(dv_acc, pa, do_addr);
    wgmma_acc_rows<T, D, WGB_BM>(dk_acc, sa, q_addr);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dv_acc);
    fence_regs(dk_acc);
    fence_regs(pa);
    fence_regs(sa);
}

// One dQ tile for one warpgroup (versions 2.0 and 2.1): its 64 queries (q_addr, do_addr; row_lse, row_delta:
// this thread's two rows) against the 64-key tile at k_addr, v_addr whose first key is key0:
//   S = Q K^T, dP = dO V^T (m64n64k16, two groups); P = 2^(S s log2e - lse), dS = P (dP - delta), both
//   selected to 0 for keys past kv_len; before_dq() (version 2.1 zeroes the padded K rows there); dQ += dS K
//   (m64nDk16, dS from registers, K as an MN-major B).
template <typename T, int D, typename BeforeDq>
__device__ __forceinline__ void dq_tile(float (&dq)[D / 8][4], uint32_t q_addr, uint32_t do_addr, uint32_t k_addr,
                                        uint32_t v_addr, const float (&row_lse)[2], const float (&row_delta)[2],
                                        int key0, int kv_len, float scale_log2, int t, BeforeDq before_dq) {
    const bool tail = key0 + WGQ_BN > kv_len;  // the last tile, partly past kv_len
    float s[WGQ_BN / 8][4], dp[WGQ_BN / 8][4];
    wgmma_fence();
    wgmma_dot_rows<T, WGQ_BN, D, WGQ_BM, WGQ_BN>(s, q_addr, k_addr);
    wgmma_commit();
    wgmma_dot_rows<T, WGQ_BN, D, WGQ_BM, WGQ_BN>(dp, do_addr, v_addr);
    wgmma_commit();
    wgmma_wait<1>();  // S is in (dP may still be running)
    fence_regs(s);
#pragma unroll
    for (int nb = 0; nb < WGQ_BN / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const bool masked = tail && key0 + nb * 8 + 2 * t + (e & 1) >= kv_len;
            s[nb][e] = masked ? 0.f : fast_exp2(fmaf(s[nb][e], scale_log2, -row_lse[e >> 1]));
        }
    wgmma_wait<0>();
    fence_regs(dp);
    uint32_t sa[WGQ_BN / 16][4];
#pragma unroll
    for (int nb = 0; nb < WGQ_BN / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const bool masked = tail && key0 + nb * 8 + 2 * t + (e & 1) >= kv_len;
            dp[nb][e] = masked ? 0.f : s[nb][e] * (dp[nb][e] - row_delta[e >> 1]);
        }
    pack_a<T>(dp, sa);
    before_dq();
    wgmma_fence();
    wgmma_acc_rows<T, D, WGQ_BN>(dq, sa, k_addr);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);
    fence_regs(sa);
}

// dK, dV: one block = 128 keys of one (b, h), 64 per warpgroup, looping over the queries in 64-row tiles
// (Q, dO, lse, delta double-buffered through cp.async); per tile and warpgroup, dkdv_tile.
template <typename T, int D>
__global__ void __launch_bounds__(256, 1) attn_bwd_dkdv_wgmma_kernel(const AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int NT = 256;
    constexpr int KV_BYTES = WGB_BN * D * 2, QT_BYTES = WGB_BM * D * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sK = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sV = sK + KV_BYTES;
    unsigned char* sQ = sV + KV_BYTES;       // [2][QT_BYTES]
    unsigned char* sdO = sQ + 2 * QT_BYTES;  // [2][QT_BYTES]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * QT_BYTES);  // [2][WGB_BM]
    float* sDelta = sLse + 2 * WGB_BM;                          // [2][WGB_BM]

    const int n0 = blockIdx.x * WGB_BN, h = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_len = p.kv_lens[b];
    const BwdSlice<T> in = bwd_slice<T>(p, b, h);
    if (n0 >= kv_len) {  // a block of padded keys only: their gradients are zero, nothing else to do
        zero_key_rows<T, D, NT>(p, in, n0, min(WGB_BN, p.len_k - n0));
        return;
    }

    const T *q = in.q, *k = in.k, *v = in.v, *dout = in.dout;

    // Queries past Lq: zero Q and dO rows, lse = +inf (BwdSlice::lse_at): they add nothing.
    auto load_queries = [&](int tile, int buf) {
        load_tile_sw128<T, WGB_BM, D, NT>(sQ + buf * QT_BYTES, q, p.q.stride_l, tile * WGB_BM, p.len_q);
        load_tile_sw128<T, WGB_BM, D, NT>(sdO + buf * QT_BYTES, dout, p.dout.stride_l, tile * WGB_BM, p.len_q);
        if (threadIdx.x < WGB_BM) {
            sLse[buf * WGB_BM + threadIdx.x] = in.lse_at(tile * WGB_BM + threadIdx.x, p.len_q);
            sDelta[buf * WGB_BM + threadIdx.x] = in.delta_at(tile * WGB_BM + threadIdx.x, p.len_q);
        }
    };
    load_tile_sw128<T, WGB_BN, D, NT>(sK, k, p.k.stride_l, n0, kv_len);  // keys past kv_len: zero rows, masked below
    load_tile_sw128<T, WGB_BN, D, NT>(sV, v, p.v.stride_l, n0, kv_len);
    load_queries(0, 0);
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();

    const float scale_log2 = p.scale * LOG2E;
    const int q_tiles = (p.len_q + WGB_BM - 1) / WGB_BM;
    const int key_g = n0 + wg * 64 + warp * 16 + g;  // this thread's key rows: key_g and key_g + 8
    const bool valid_key[2] = {key_g < kv_len, key_g + 8 < kv_len};
    const uint32_t k_addr = smem_u32(sK) + wg * 64 * 128, v_addr = smem_u32(sV) + wg * 64 * 128;
    float dk_acc[D / 8][4] = {};
    float dv_acc[D / 8][4] = {};

    for (int it = 0; it < q_tiles; ++it) {
        const int buf = it & 1;
        if (it + 1 < q_tiles) {  // buffer buf^1 was last read before the previous iteration's final barrier
            load_queries(it + 1, buf ^ 1);
            cp_async_commit();
        }
        const uint32_t q_addr = smem_u32(sQ + buf * QT_BYTES), do_addr = smem_u32(sdO + buf * QT_BYTES);
        const float* lse_i = sLse + buf * WGB_BM;
        const float* delta_i = sDelta + buf * WGB_BM;

        dkdv_tile<T, D>(dk_acc, dv_acc, k_addr, v_addr, q_addr, do_addr, lse_i, delta_i, valid_key, scale_log2, t);

        cp_async_wait_all();  // the next tile has landed (this thread's copies) ...
        fence_proxy_async();  // ... is visible to wgmma ...
        __syncthreads();      // ... everyone's, and this tile's buffers are free to overwrite
    }

    // dK = s * dS^T Q (the scale of S = s Q K^T), dV as accumulated. Rows past kv_len hold exact zeros.
    store_scaled(dk_acc, in.dk, p.dk.stride_l, key_g, p.len_k, t, p.scale);
    store_scaled(dv_acc, in.dv, p.dv.stride_l, key_g, p.len_k, t, 1.f);
#endif
}

// dQ: one block = 128 queries of one (b, h), 64 per warpgroup, streaming the valid keys in 64-key tiles (K, V
// double-buffered; Q and dO stay in shared memory, where the tensor cores read them every tile); per tile and
// warpgroup, dq_tile.
template <typename T, int D>
__global__ void __launch_bounds__(256, 1) attn_bwd_dq_wgmma_kernel(const AttnParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int NT = 256;
    constexpr int QT_BYTES = WGQ_BM * D * 2, KV_BYTES = WGQ_BN * D * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sdO = sQ + QT_BYTES;
    unsigned char* sK = sdO + QT_BYTES;      // [2][KV_BYTES]
    unsigned char* sV = sK + 2 * KV_BYTES;   // [2][KV_BYTES]

    const int m0 = blockIdx.x * WGQ_BM, h = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_len = p.kv_lens[b];
    const int n_tiles = (kv_len + WGQ_BN - 1) / WGQ_BN;  // keys past kv_len cost nothing
    const BwdSlice<T> in = bwd_slice<T>(p, b, h);
    const T *q = in.q, *k = in.k, *v = in.v, *dout = in.dout;

    // Rows past Lq load as zeros (their results are not stored).
    load_tile_sw128<T, WGQ_BM, D, NT>(sQ, q, p.q.stride_l, m0, p.len_q);
    load_tile_sw128<T, WGQ_BM, D, NT>(sdO, dout, p.dout.stride_l, m0, p.len_q);
    load_tile_sw128<T, WGQ_BN, D, NT>(sK, k, p.k.stride_l, 0, kv_len);
    load_tile_sw128<T, WGQ_BN, D, NT>(sV, v, p.v.stride_l, 0, kv_len);
    cp_async_commit();

    // This thread's two rows (g and g + 8 of its warp's 16): lse and delta, read once.
    const int row_g = m0 + wg * 64 + warp * 16 + g;
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_lse[r] = in.lse_at(row_g + 8 * r, p.len_q);
        row_delta[r] = in.delta_at(row_g + 8 * r, p.len_q);
    }
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();

    const uint32_t q_addr = smem_u32(sQ) + wg * 64 * 128, do_addr = smem_u32(sdO) + wg * 64 * 128;
    const float scale_log2 = p.scale * LOG2E;
    float dq[D / 8][4] = {};

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < n_tiles) {  // buffer buf^1 was last read in iteration j-1, before its closing barrier
            load_tile_sw128<T, WGQ_BN, D, NT>(sK + (buf ^ 1) * KV_BYTES, k, p.k.stride_l, (j + 1) * WGQ_BN, kv_len);
            load_tile_sw128<T, WGQ_BN, D, NT>(sV + (buf ^ 1) * KV_BYTES, v, p.v.stride_l, (j + 1) * WGQ_BN, kv_len);
            cp_async_commit();
        }
        const uint32_t k_addr = smem_u32(sK + buf * KV_BYTES), v_addr = smem_u32(sV + buf * KV_BYTES);

        dq_tile<T, D>(dq, q_addr, do_addr, k_addr, v_addr, row_lse, row_delta, j * WGQ_BN, kv_len, scale_log2, t, [] {});

        cp_async_wait_all();  // tile j+1 has landed (this thread's copies) ...
        fence_proxy_async();  // ... is visible to wgmma ...
        __syncthreads();      // ... everyone's, and everyone is done reading tile j
    }

    // dQ = s * dS K, to the input dtype; rows past Lq are not stored.
    T* dqp = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h;
    store_scaled(dq, dqp, p.dq.stride_l, row_g, p.len_q, t, p.scale);
#endif
}

// ---------------------------------------------------------------------------------------------------
// Backward, version 2.1 (sm_90a; the default there, ATTENTION_CUDA_BWD_WGMMA=ws): version 2.0's
// two kernels (the same products, the same recomputation) with the forward 2.1's structure: a producer
// warpgroup (setmaxnreg 24) feeding a two-stage ring through TMA and mbarriers, two consumer warpgroups
// (240) that no longer step together through a block barrier per tile. No ping-pong and no in-warpgroup
// overlap: the dK/dV consumers hold 128 accumulator registers (dK and dV) besides a tile's S^T and dP^T,
// which leaves no room for a second tile's scores.
// Padded keys (TMA copies whatever memory holds; NaN in the tests): every P and dS of a key past kv_len is
// selected to 0, never multiplied by a mask, so NaN in K or V cannot reach them; the one product that
// reads K rows as the contracted dimension (dQ += dS K) gets its last tile's padded K rows zeroed first.
constexpr int WSB_STAGES = 2;
template <typename T, int D> constexpr int dkdv_ws_smem() {  // K, V, stages x (Q, dO, lse, delta), barriers, align
    return (2 * WGB_BN + 2 * WSB_STAGES * WGB_BM) * D * static_cast<int>(sizeof(T)) + WSB_STAGES * 2 * WGB_BM * 4 +
           (1 + 2 * WSB_STAGES) * 8 + 1024;
}
template <typename T, int D> constexpr int dq_ws_smem() {  // Q, dO, stages x (K, V), barriers, align
    return (2 * WGQ_BM + 2 * WSB_STAGES * WGQ_BN) * D * static_cast<int>(sizeof(T)) + (1 + 2 * WSB_STAGES) * 8 + 1024;
}

// dK, dV: one block = 128 keys (64 per consumer warpgroup), query tiles of 64 rows. The producer's thread 0
// copies K and V once and Q, dO tile by tile; its warp 1 copies each tile's lse and delta (64 floats each,
// with lse_at / delta_at's values past Lq) with plain loads and stores, every lane arriving on the stage's
// full barrier after its stores (33 arrivals: 1 expect_tx + 32).
template <typename T, int D>
__global__ void __launch_bounds__(WS_THREADS, 1)
    attn_bwd_dkdv_ws_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
                            const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
                            const __grid_constant__ CUtensorMap map_do) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int KV_BYTES = WGB_BN * D * 2, QT_BYTES = WGB_BM * D * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sK = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sV = sK + KV_BYTES;
    unsigned char* sQ = sV + KV_BYTES;                // [WSB_STAGES][QT_BYTES]
    unsigned char* sdO = sQ + WSB_STAGES * QT_BYTES;  // [WSB_STAGES][QT_BYTES]
    float* sLse = reinterpret_cast<float*>(sdO + WSB_STAGES * QT_BYTES);  // [WSB_STAGES][WGB_BM]
    float* sDelta = sLse + WSB_STAGES * WGB_BM;                          // [WSB_STAGES][WGB_BM]
    const uint32_t bars = smem_u32(sDelta + WSB_STAGES * WGB_BM);
    const uint32_t kv_full = bars;
    auto q_full = [&](int st) { return bars + 8 * (1 + st); };
    auto q_empty = [&](int st) { return bars + 8 * (1 + WSB_STAGES + st); };

    const int n0 = blockIdx.x * WGB_BN, h = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x / 128;
    const int kv_len = p.kv_lens[b];
    const BwdSlice<T> in = bwd_slice<T>(p, b, h);
    if (n0 >= kv_len) {  // a block of padded keys only: their gradients are zero, nothing else to do
        zero_key_rows<T, D, WS_THREADS>(p, in, n0, min(WGB_BN, p.len_k - n0));
        return;
    }
    const int q_tiles = (p.len_q + WGB_BM - 1) / WGB_BM;

    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);
        for (int st = 0; st < WSB_STAGES; ++st) {
            mbar_init(q_full(st), 1 + 32);
            mbar_init(q_empty(st), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (threadIdx.x == 0) {
            mbar_arrive_expect(kv_full, 2 * KV_BYTES);
            for (int half = 0; half < D / 64; ++half) {
                tma_load_4d(smem_u32(sK) + half * WGB_BN * 128, &map_k, kv_full, half * 64, h, n0, b);
                tma_load_4d(smem_u32(sV) + half * WGB_BN * 128, &map_v, kv_full, half * 64, h, n0, b);
            }
            for (int it = 0; it < q_tiles; ++it) {
                const int st = it % WSB_STAGES;
                if (it >= WSB_STAGES) mbar_wait(q_empty(st), ((it / WSB_STAGES) & 1) ^ 1);
                mbar_arrive_expect(q_full(st), 2 * QT_BYTES);
                for (int half = 0; half < D / 64; ++half) {  // rows past Lq: zeros
                    tma_load_4d(smem_u32(sQ + st * QT_BYTES) + half * WGB_BM * 128, &map_q, q_full(st), half * 64, h,
                                it * WGB_BM, b);
                    tma_load_4d(smem_u32(sdO + st * QT_BYTES) + half * WGB_BM * 128, &map_do, q_full(st), half * 64,
                                h, it * WGB_BM, b);
                }
            }
        } else if (warp == 1) {
            for (int it = 0; it < q_tiles; ++it) {
                const int st = it % WSB_STAGES;
                if (it >= WSB_STAGES) mbar_wait(q_empty(st), ((it / WSB_STAGES) & 1) ^ 1);
#pragma unroll
                for (int r = lane; r < WGB_BM; r += 32) {
                    sLse[st * WGB_BM + r] = in.lse_at(it * WGB_BM + r, p.len_q);
                    sDelta[st * WGB_BM + r] = in.delta_at(it * WGB_BM + r, p.len_q);
                }
                mbar_arrive(q_full(st));  // release: this lane's stores are visible to whoever waits on the phase
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        const int cw = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const float scale_log2 = p.scale * LOG2E;
        const int key_g = n0 + cw * 64 + warp * 16 + g;  // this thread's key rows: key_g and key_g + 8
        const bool valid_key[2] = {key_g < kv_len, key_g + 8 < kv_len};
        const uint32_t k_addr = smem_u32(sK) + cw * 64 * 128, v_addr = smem_u32(sV) + cw * 64 * 128;
        float dk_acc[D / 8][4] = {};
        float dv_acc[D / 8][4] = {};
        mbar_wait(kv_full, 0);

        for (int it = 0; it < q_tiles; ++it) {
            const int st = it % WSB_STAGES;
            mbar_wait(q_full(st), (it / WSB_STAGES) & 1);
            const uint32_t q_addr = smem_u32(sQ + st * QT_BYTES), do_addr = smem_u32(sdO + st * QT_BYTES);
            const float* lse_i = sLse + st * WGB_BM;
            const float* delta_i = sDelta + st * WGB_BM;

            dkdv_tile<T, D>(dk_acc, dv_acc, k_addr, v_addr, q_addr, do_addr, lse_i, delta_i, valid_key, scale_log2, t);
            __syncwarp();  // every lane's loads of lse and delta are ordered before lane 0's release
            if (lane == 0) mbar_arrive(q_empty(st));  // this warp is done with the stage (Q, dO, lse, delta)
        }
        store_scaled(dk_acc, in.dk, p.dk.stride_l, key_g, p.len_k, t, p.scale);
        store_scaled(dv_acc, in.dv, p.dv.stride_l, key_g, p.len_k, t, 1.f);
    }
#endif
}

// dQ: one block = 128 queries (64 per consumer warpgroup; Q and dO copied once), key tiles of 64 rows, K and
// V of a tile on one full barrier. The last tile's keys past kv_len: S and dS selected to 0; their K rows
// zeroed in shared memory before dQ += dS K, between two barriers of both consumers (the first: both have
// finished reading K for S; the second: the zeros are in).
template <typename T, int D>
__global__ void __launch_bounds__(WS_THREADS, 1)
    attn_bwd_dq_ws_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
                          const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
                          const __grid_constant__ CUtensorMap map_do) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int QT_BYTES = WGQ_BM * D * 2, KV_BYTES = WGQ_BN * D * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sdO = sQ + QT_BYTES;
    unsigned char* sK = sdO + QT_BYTES;               // [WSB_STAGES][KV_BYTES]
    unsigned char* sV = sK + WSB_STAGES * KV_BYTES;   // [WSB_STAGES][KV_BYTES]
    const uint32_t bars = smem_u32(sV + WSB_STAGES * KV_BYTES);
    const uint32_t q_full = bars;
    auto kv_full = [&](int st) { return bars + 8 * (1 + st); };
    auto kv_empty = [&](int st) { return bars + 8 * (1 + WSB_STAGES + st); };

    const int m0 = blockIdx.x * WGQ_BM, h = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x / 128;
    const int kv_len = p.kv_lens[b];
    const int n_tiles = (kv_len + WGQ_BN - 1) / WGQ_BN;

    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int st = 0; st < WSB_STAGES; ++st) {
            mbar_init(kv_full(st), 1);
            mbar_init(kv_empty(st), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) {
            mbar_arrive_expect(q_full, 2 * QT_BYTES);
            for (int half = 0; half < D / 64; ++half) {  // rows past Lq: zeros
                tma_load_4d(smem_u32(sQ) + half * WGQ_BM * 128, &map_q, q_full, half * 64, h, m0, b);
                tma_load_4d(smem_u32(sdO) + half * WGQ_BM * 128, &map_do, q_full, half * 64, h, m0, b);
            }
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j % WSB_STAGES;
                if (j >= WSB_STAGES) mbar_wait(kv_empty(st), ((j / WSB_STAGES) & 1) ^ 1);
                mbar_arrive_expect(kv_full(st), 2 * KV_BYTES);
                for (int half = 0; half < D / 64; ++half) {
                    tma_load_4d(smem_u32(sK + st * KV_BYTES) + half * WGQ_BN * 128, &map_k, kv_full(st), half * 64, h,
                                j * WGQ_BN, b);
                    tma_load_4d(smem_u32(sV + st * KV_BYTES) + half * WGQ_BN * 128, &map_v, kv_full(st), half * 64, h,
                                j * WGQ_BN, b);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        const int cw = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const BwdSlice<T> in = bwd_slice<T>(p, b, h);
        const int row_g = m0 + cw * 64 + warp * 16 + g;
        float row_lse[2], row_delta[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_lse[r] = in.lse_at(row_g + 8 * r, p.len_q);
            row_delta[r] = in.delta_at(row_g + 8 * r, p.len_q);
        }
        const uint32_t q_addr = smem_u32(sQ) + cw * 64 * 128, do_addr = smem_u32(sdO) + cw * 64 * 128;
        const float scale_log2 = p.scale * LOG2E;
        const int tail = kv_len - (n_tiles - 1) * WGQ_BN;  // valid keys in the last tile, 1..64
        float dq[D / 8][4] = {};
        mbar_wait(q_full, 0);

        for (int j = 0; j < n_tiles; ++j) {
            const int st = j % WSB_STAGES;
            mbar_wait(kv_full(st), (j / WSB_STAGES) & 1);
            const uint32_t k_addr = smem_u32(sK + st * KV_BYTES), v_addr = smem_u32(sV + st * KV_BYTES);
            dq_tile<T, D>(dq, q_addr, do_addr, k_addr, v_addr, row_lse, row_delta, j * WGQ_BN, kv_len, scale_log2, t,
                          [&] {
                              if (j == n_tiles - 1 && tail < WGQ_BN) {
                                  named_sync(3, 256);  // both consumers' S = Q K^T on this stage are done
                                  zero_tail_rows<WGQ_BN, D, 256>(sK + st * KV_BYTES, tail, threadIdx.x - 128);
                                  named_sync(3, 256);
                              }
                          });
            if (lane == 0) mbar_arrive(kv_empty(st));
        }
        T* dqp = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h;
        store_scaled(dq, dqp, p.dq.stride_l, row_g, p.len_q, t, p.scale);
    }
#endif
}

// ---------------------------------------------------------------------------------------------------
// Launchers

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
    // Above 48 KB a block gets dynamic shared memory only after raising the kernel's limit.
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Warps per block of the three big kernels. At D = 128: the forward and the dQ kernel take 8 warps, so
// each K/V tile copied into shared memory serves 16 W MT query rows (the forward: 256 rows with MT = 2;
// 255 registers x 256 threads and 136 KB of shared memory, 1 block of 8 warps per SM); the dK/dV kernel
// keeps version 1's 4 warps. At D = 64 all three take 4 warps. For timing without a rebuild,
// ATTENTION_CUDA_FWD_WARPS, ATTENTION_CUDA_DQ_WARPS, ATTENTION_CUDA_DKDV_WARPS = 4 or 8 override the
// D = 128 choice (read at every launch; anything else is ignored). Measured on an H200 (NOTES.md, version
// 1.2), forward at 67k: 8 warps x 32 rows 354 TFLOP/s, 4 x 32 313, 8 x 16 (version 1.1) 290; D = 64: 32
// rows 303, 16 rows 247.
int warps_for(const char* env_name, int fallback) {
    const char* s = std::getenv(env_name);
    if (s != nullptr && (s[0] == '4' || s[0] == '8') && s[1] == '\0') return s[0] - '0';
    return fallback;
}
// Query rows per warp in the forward, 16 or 32 (MT = 1 or 2 above), any head_dim: 32 by default;
// ATTENTION_CUDA_FWD_ROWS = 16 or 32 overrides it.
int rows_for(const char* env_name, int fallback) {
    const char* s = std::getenv(env_name);
    if (s != nullptr && (strcmp(s, "16") == 0 || strcmp(s, "32") == 0)) return atoi(s);
    return fallback;
}
constexpr int FWD_WARPS_DEFAULT = 8, FWD_ROWS_DEFAULT = 32;

// Shared memory a block may opt into on the current device (227 KB on the H100, 163 KB on the A100,
// 99 KB on sm_86/sm_89): an 8-warp choice that does not fit falls back to 4 warps.
int max_smem_per_block() {
    int dev = 0, bytes = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
    return bytes;
}
template <typename T, int D, int W, int MT> constexpr int fwd_smem() {
    return (16 * MT * W + 4 * FWD_BN) * (D + PAD) * static_cast<int>(sizeof(T));
}
template <typename T, int D, int W> constexpr int dkdv_smem() {
    return (2 * 16 * W + 4 * BWD_BM) * (D + PAD) * static_cast<int>(sizeof(T)) + 4 * BWD_BM * static_cast<int>(sizeof(float));
}

const char* last_forward = "";   // what attn_last_forward / attn_last_backward report
const char* last_backward = "";

template <typename T, int D, int W, int MT>
cudaError_t launch_forward(const AttnParams& p, cudaStream_t stream) {
    constexpr int BM = 16 * MT * W;
    const int smem = fwd_smem<T, D, W, MT>();  // D = 128: 87,040 B (W, MT = 4, 1); 104,448 B (8, 1 or 4, 2); 139,264 B (8, 2)
    cudaError_t err = allow_smem(attn_fwd_kernel<T, D, W, MT>, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((p.len_q + BM - 1) / BM, p.heads, p.batch);
    attn_fwd_kernel<T, D, W, MT><<<grid, W * 32, smem, stream>>>(p);
    last_forward = "1.2";
    return cudaGetLastError();
}

// Which Hopper version to launch (compute capability 9.0 only: their sm_90a code exists for nothing else).
// Version 2.1 with both overlaps ("ws") is the default there, forward and backward: the fastest measured
// (NOTES.md; H200, 2026-11-26, 24 heads x 128 at 67k-119k tokens: forward 614-623 TFLOP/s against version
// 1.2's 356-357 and cuDNN's 564-566; forward+backward 455-460 against 1.2's 233-234). For comparisons,
// read at every launch: ATTENTION_CUDA_FWD_WGMMA = ws, ws-pingpong (2.1 without the in-warpgroup overlap),
// ws-plain (2.1 with neither: TMA and mbarriers only), 1 (version 2.0), 0 (version 1.2, mma.sync);
// ATTENTION_CUDA_BWD_WGMMA = ws, 1, 0 likewise; anything else means 1.2. Returns the choice, or null on
// other GPUs (version 1.2 everywhere).
const char* hopper_choice(const char* env_name) {
    int dev = 0, major = 0, minor = 0;
    const bool sm90 = cudaGetDevice(&dev) == cudaSuccess &&
                      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                      major == 9 && minor == 0;
    if (!sm90) return nullptr;
    const char* s = std::getenv(env_name);
    return s == nullptr ? "ws" : s;
}
bool chosen(const char* choice, const char* value) { return choice != nullptr && strcmp(choice, value) == 0; }

template <typename T, int D>
cudaError_t launch_forward_wgmma(const AttnParams& p, cudaStream_t stream) {
    const int smem = fwd_wgmma_smem<T, D>();  // D = 128: 164,864 B; D = 64: 82,944 B
    cudaError_t err = allow_smem(attn_fwd_wgmma_kernel<T, D>, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((p.len_q + WG_BM - 1) / WG_BM, p.heads, p.batch);
    attn_fwd_wgmma_kernel<T, D><<<grid, 256, smem, stream>>>(p);
    last_forward = "2.0";
    return cudaGetLastError();
}

// Version 2.1's copies read global memory through tensor maps (CUDA driver API "Tensor Map Object
// Management"), one per tensor, passed to the kernel by value. cuTensorMapEncodeTiled is a driver function:
// it is fetched through the runtime, so the extension needs no libcuda at link time.
using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;
EncodeTiled encode_tiled() {
    static const EncodeTiled fn = [] {
        void* ptr = nullptr;
        cudaDriverEntryPointQueryResult found;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) !=
                cudaSuccess || found != cudaDriverEntryPointSuccess)
            return static_cast<EncodeTiled>(nullptr);
        return reinterpret_cast<EncodeTiled>(ptr);
    }();
    return fn;
}
// A (B, len, H, D) tensor as a 4-d map, innermost dimension first: (D, H, len, B), byte strides of the
// outer three; a box is 64 columns (128 bytes, the widest the 128-byte swizzle takes) x 1 head x `rows` rows
// x 1 sample, written to shared memory in the 128-byte-swizzled layout, zeros where it leaves the tensor.
// A size-1 dimension's stride is never used: the natural one stands in (the driver wants multiples of 16).
// False where the driver refuses (e.g. strides not multiples of 16 bytes): the caller falls back.
bool tensor_map(CUtensorMap* map, const AttnTensor& x, int len, const AttnParams& p, int rows) {
    const EncodeTiled encode = encode_tiled();
    if (encode == nullptr) return false;
    const cuuint64_t s_h = p.heads == 1 ? p.head_dim * 2 : x.stride_h * 2;
    const cuuint64_t s_l = len == 1 ? s_h * p.heads : x.stride_l * 2;
    const cuuint64_t s_b = p.batch == 1 ? s_l * len : x.stride_b * 2;
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.heads),
                                static_cast<cuuint64_t>(len), static_cast<cuuint64_t>(p.batch)};
    const cuuint64_t strides[3] = {s_h, s_l, s_b};
    const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(rows), 1};
    const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
    return encode(map, p.is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, x.ptr, dims,
                  strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int D, bool PINGPONG, bool OVERLAP>
cudaError_t launch_forward_ws(const AttnParams& p, const CUtensorMap (&maps)[3], cudaStream_t stream) {
    const int smem = fwd_ws_smem<T, D>();  // D = 128: 164,936 B; D = 64: 83,016 B
    cudaError_t err = allow_smem(attn_fwd_ws_kernel<T, D, PINGPONG, OVERLAP>, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((p.len_q + WG_BM - 1) / WG_BM, p.heads, p.batch);
    attn_fwd_ws_kernel<T, D, PINGPONG, OVERLAP><<<grid, WS_THREADS, smem, stream>>>(p, maps[0], maps[1], maps[2]);
    last_forward = PINGPONG ? (OVERLAP ? "2.1 ws" : "2.1 ws-pingpong") : "2.1 ws-plain";
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t forward(const AttnParams& p, cudaStream_t stream) {
    const int smem_max = max_smem_per_block();
    const char* choice = hopper_choice("ATTENTION_CUDA_FWD_WGMMA");
    CUtensorMap maps[3];
    if (choice != nullptr && strncmp(choice, "ws", 2) == 0 && fwd_ws_smem<T, D>() <= smem_max &&
        tensor_map(&maps[0], p.q, p.len_q, p, WG_BM) && tensor_map(&maps[1], p.k, p.len_k, p, WG_BN) &&
        tensor_map(&maps[2], p.v, p.len_k, p, WG_BN)) {
        if (chosen(choice, "ws")) return launch_forward_ws<T, D, true, true>(p, maps, stream);
        if (chosen(choice, "ws-pingpong")) return launch_forward_ws<T, D, true, false>(p, maps, stream);
        if (chosen(choice, "ws-plain")) return launch_forward_ws<T, D, false, false>(p, maps, stream);
    }
    if (chosen(choice, "1") && fwd_wgmma_smem<T, D>() <= smem_max) return launch_forward_wgmma<T, D>(p, stream);
    const bool rows32 = rows_for("ATTENTION_CUDA_FWD_ROWS", FWD_ROWS_DEFAULT) == 32;
    if constexpr (D == 128) {
        if (warps_for("ATTENTION_CUDA_FWD_WARPS", FWD_WARPS_DEFAULT) == 8) {
            if (rows32 && fwd_smem<T, D, 8, 2>() <= smem_max) return launch_forward<T, D, 8, 2>(p, stream);
            if (!rows32 && fwd_smem<T, D, 8, 1>() <= smem_max) return launch_forward<T, D, 8, 1>(p, stream);
        }
    }
    if (rows32 && fwd_smem<T, D, 4, 2>() <= smem_max) return launch_forward<T, D, 4, 2>(p, stream);
    return launch_forward<T, D, 4, 1>(p, stream);
}

template <typename T, int D, int W>
cudaError_t launch_dkdv(const AttnParams& p, cudaStream_t stream) {
    constexpr int BN = 16 * W;
    const int smem = dkdv_smem<T, D, W>();  // D = 128: 70,144 B (W = 4), 104,960 B (W = 8)
    cudaError_t err = allow_smem(attn_bwd_dkdv_kernel<T, D, W>, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((p.len_k + BN - 1) / BN, p.heads, p.batch);
    attn_bwd_dkdv_kernel<T, D, W><<<grid, W * 32, smem, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int D, int W>
cudaError_t launch_dq(const AttnParams& p, cudaStream_t stream) {
    constexpr int BM = 16 * W;
    const int smem = 4 * DQ_BN * (D + PAD) * static_cast<int>(sizeof(T));  // 69,632 B at D = 128 (Q, dO staged in it)
    cudaError_t err = allow_smem(attn_bwd_dq_kernel<T, D, W>, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid((p.len_q + BM - 1) / BM, p.heads, p.batch);
    attn_bwd_dq_kernel<T, D, W><<<grid, W * 32, smem, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_backward_wgmma(const AttnParams& p, cudaStream_t stream) {
    cudaError_t err = allow_smem(attn_bwd_dkdv_wgmma_kernel<T, D>, dkdv_wgmma_smem<T, D>());  // D = 128: 133,120 B
    if (err != cudaSuccess) return err;
    err = allow_smem(attn_bwd_dq_wgmma_kernel<T, D>, dq_wgmma_smem<T, D>());  // D = 128: 132,096 B
    if (err != cudaSuccess) return err;
    attn_bwd_dkdv_wgmma_kernel<T, D><<<dim3((p.len_k + WGB_BN - 1) / WGB_BN, p.heads, p.batch), 256,
                                       dkdv_wgmma_smem<T, D>(), stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    attn_bwd_dq_wgmma_kernel<T, D><<<dim3((p.len_q + WGQ_BM - 1) / WGQ_BM, p.heads, p.batch), 256,
                                     dq_wgmma_smem<T, D>(), stream>>>(p);
    last_backward = "2.0";
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_backward_ws(const AttnParams& p, const CUtensorMap (&maps)[4], const CUtensorMap (&maps_dq)[4],
                               cudaStream_t stream) {
    cudaError_t err = allow_smem(attn_bwd_dkdv_ws_kernel<T, D>, dkdv_ws_smem<T, D>());  // D = 128: 133,160 B
    if (err != cudaSuccess) return err;
    err = allow_smem(attn_bwd_dq_ws_kernel<T, D>, dq_ws_smem<T, D>());  // D = 128: 132,136 B
    if (err != cudaSuccess) return err;
    attn_bwd_dkdv_ws_kernel<T, D><<<dim3((p.len_k + WGB_BN - 1) / WGB_BN, p.heads, p.batch), WS_THREADS,
                                    dkdv_ws_smem<T, D>(), stream>>>(p, maps[0], maps[1], maps[2], maps[3]);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    attn_bwd_dq_ws_kernel<T, D><<<dim3((p.len_q + WGQ_BM - 1) / WGQ_BM, p.heads, p.batch), WS_THREADS,
                                  dq_ws_smem<T, D>(), stream>>>(p, maps_dq[0], maps_dq[1], maps_dq[2], maps_dq[3]);
    last_backward = "2.1 ws";
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t backward(const AttnParams& p, cudaStream_t stream) {
    const long long rows = static_cast<long long>(p.batch) * p.len_q * p.heads;
    attn_bwd_delta_kernel<T, D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);  // 8 rows per block
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const char* choice = hopper_choice("ATTENTION_CUDA_BWD_WGMMA");
    // Version 2.1's two kernels tile differently (dK/dV: 128 keys x 64-query tiles; dQ: 128 queries x 64-key
    // tiles): each has its own maps (q, k, v, dout), boxes of its tile heights.
    CUtensorMap maps[4], maps_dq[4];
    if (chosen(choice, "ws") && std::max(dkdv_ws_smem<T, D>(), dq_ws_smem<T, D>()) <= max_smem_per_block() &&
        tensor_map(&maps[0], p.q, p.len_q, p, WGB_BM) && tensor_map(&maps[1], p.k, p.len_k, p, WGB_BN) &&
        tensor_map(&maps[2], p.v, p.len_k, p, WGB_BN) && tensor_map(&maps[3], p.dout, p.len_q, p, WGB_BM) &&
        tensor_map(&maps_dq[0], p.q, p.len_q, p, WGQ_BM) && tensor_map(&maps_dq[1], p.k, p.len_k, p, WGQ_BN) &&
        tensor_map(&maps_dq[2], p.v, p.len_k, p, WGQ_BN) && tensor_map(&maps_dq[3], p.dout, p.len_q, p, WGQ_BM))
        return launch_backward_ws<T, D>(p, maps, maps_dq, stream);
    if (chosen(choice, "1") && std::max(dkdv_wgmma_smem<T, D>(), dq_wgmma_smem<T, D>()) <= max_smem_per_block())
        return launch_backward_wgmma<T, D>(p, stream);
    // dK/dV and dQ are independent of each other; both need only delta (and lse from the forward).
    last_backward = "1.2";
    int dkdv_warps = 4, dq_warps = 4;
    if constexpr (D == 128) {
        dkdv_warps = warps_for("ATTENTION_CUDA_DKDV_WARPS", 4);
        if (dkdv_smem<T, D, 8>() > max_smem_per_block()) dkdv_warps = 4;
        dq_warps = warps_for("ATTENTION_CUDA_DQ_WARPS", 8);
    }
    if constexpr (D == 128) {
        err = dkdv_warps == 8 ? launch_dkdv<T, D, 8>(p, stream) : launch_dkdv<T, D, 4>(p, stream);
        if (err != cudaSuccess) return err;
        return dq_warps == 8 ? launch_dq<T, D, 8>(p, stream) : launch_dq<T, D, 4>(p, stream);
    } else {
        err = launch_dkdv<T, D, 4>(p, stream);
        if (err != cudaSuccess) return err;
        return launch_dq<T, D, 4>(p, stream);
    }
}

}  // namespace

int attn_forward(const AttnParams& p, void* stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (p.is_bf16) return p.head_dim == 128 ? forward<__nv_bfloat16, 128>(p, s) : forward<__nv_bfloat16, 64>(p, s);
    return p.head_dim == 128 ? forward<__half, 128>(p, s) : forward<__half, 64>(p, s);
}

int attn_backward(const AttnParams& p, void* stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (p.is_bf16) return p.head_dim == 128 ? backward<__nv_bfloat16, 128>(p, s) : backward<__nv_bfloat16, 64>(p, s);
    return p.head_dim == 128 ? backward<__half, 128>(p, s) : backward<__half, 64>(p, s);
}

const char* attn_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
const char* attn_last_forward() { return last_forward; }
const char* attn_last_backward() { return last_backward; }
