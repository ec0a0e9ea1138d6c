// What the two attention kernels share (portable.cu: version 1.2, mma.sync, any GPU from sm_80;
// hopper.cu: version 2.1, wgmma and TMA, sm_90a): the online softmax on accumulator fragments, the
// backward's view of one (sample, head) and its first step, the delta kernel. CUDA headers only.
// Notation: B batch, H heads, D head_dim (64 or 128), Lq queries, Lk keys, n = kv_lens[b] the valid keys
// of sample b, s = 1/sqrt(D) the softmax scale.
//
// The accumulator layout both kernels compute in (PTX ISA, "Matrix Fragments for mma.m16n8k16"): a 16x8
// fp32 block C is spread over a warp's 32 lanes, lane = 4 g + t; c0, c1 hold row g, columns 2t and 2t + 1,
// c2, c3 row g + 8, the same columns. A wgmma accumulator (64 rows per warpgroup) has this layout in each
// of its four warps, warp w holding rows 16 w .. 16 w + 15. So a thread owns rows g and g + 8 of every
// 16-row tile, and the 4 lanes of a quad (same g) share a row: the softmax below serves both kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <type_traits>
#include "attention.h"

namespace {
constexpr float LOG2E = 1.4426950408889634f;

// Conversions and the exponential -------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
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
// C fragments of 8-column blocks 2kk, 2kk + 1 -> the A fragment of k-step kk (portable.cu's header).
template <typename T, int NB>
__device__ __forceinline__ void pack_a(const float (&c)[NB][4], int kk, uint32_t (&a)[4]) {
    a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// 2^x on the special-function unit; 2^-inf = 0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ---------------------------------------------------------------------------------------------------
// The forward's online softmax. s[nb][e] is row g + 8 (e / 2), key nb * 8 + 2t + (e % 2) of the tile.
// Keys at or past kv_len (only in a tile that ends past it) drop out of the softmax. key0: the tile's first key.
template <int NB>
__device__ __forceinline__ void mask_keys(float (&s)[NB][4], int key0, int kv_len, int t) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (key0 + nb * 8 + 2 * t + (e & 1) >= kv_len) s[nb][e] = -INFINITY;
}

// One step on a tile of raw scores S: the new running row max m (base-2 units, x * s * log2(e), so each
// exponential is one ex2), P = 2^(S s log2e - m) in place of S, the row sums l and the output accumulator o
// rescaled by 2^(m_old - m). Every tile holds a valid key (its first is below kv_len), so each row max is
// finite: no inf - inf. l is this thread's part of the row sum; the quad is summed once, at the end.
// softmax_rows does all but the rescale of o, returning the factors in alpha (hopper.cu applies them once
// the previous tile's P V, still on the tensor cores, has landed in o); softmax_step does both.
template <int NB>
__device__ __forceinline__ void softmax_rows(float (&s)[NB][4], float (&m_row)[2], float (&l_row)[2],
                                             float scale_log2, float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // Row max and row sum as pairwise trees: 4 dependent steps instead of a 16-long chain.
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

// The backward's view of one (b, h), and its stores -------------------------------------------------
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

// scale * acc to this thread's rows row_g, row_g + 8 of a [.][stride_l] output; rows >= n are not stored.
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

// Backward, step 1 (both kernels): delta[b, h, i] = sum_d dO[i, d] O[i, d] (= rowsum(P * dP)), a warp a row.
template <typename T, int D>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const AttnParams p) {
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

// Host side -----------------------------------------------------------------------------------------
// Launch kernel<<<grid, threads, smem, stream>>>(args...), first raising its dynamic shared-memory limit
// (a block gets more than 48 KB only then); returns the launch's error.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, Args... args) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, threads, smem, stream>>>(args...);
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_delta(const AttnParams& p, cudaStream_t stream) {  // 8 rows per block of 256 threads
    const long long rows = static_cast<long long>(p.batch) * p.len_q * p.heads;
    return launch(bwd_delta_kernel<T, D>, dim3(static_cast<unsigned>((rows + 7) / 8)), 256, 0, stream, p);
}
}  // namespace

// The entry point `name` (attention.h): fn<T, D>(p, stream) for p's dtype and head_dim, four instantiations.
#define ATTN_ENTRY(name, fn)                                                                         \
    int name(const AttnParams& p, void* s) {                                                         \
        const cudaStream_t st = static_cast<cudaStream_t>(s);                                        \
        const bool d128 = p.head_dim == 128;                                                         \
        return p.is_bf16 ? (d128 ? fn<__nv_bfloat16, 128>(p, st) : fn<__nv_bfloat16, 64>(p, st))   \
                         : (d128 ? fn<__half, 128>(p, st) : fn<__half, 64>(p, st));                  \
    }
