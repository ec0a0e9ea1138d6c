// Fused attention for Hopper (sm_90a), version 2.1: FlashAttention-3 (Shah et al. 2024, sections 3.1-3.2)
// on the algorithm of portable.cu (read that first: tiling, online softmax, the backward's three steps),
// rebuilt around three features of the H100/H200:
//   * wgmma: a warpgroup (4 warps) issues a 64 x N x 16 product asynchronously, the tensor cores reading
//     the operands from shared memory themselves; one wgmma does the work of 64 mma.sync.
//   * TMA: one thread copies a whole tile global -> shared through a tensor map built on the host, the
//     copy engine writing the 128-byte-swizzled layout wgmma reads.
//   * Warp specialisation: in a block of 384 threads, warpgroup 0 is the producer (one thread issues the
//     copies; setmaxnreg leaves it 24 registers) and warpgroups 1 and 2 are consumers (240 registers, 64
//     rows each). They pass the stages of a two-deep ring of tiles through mbarriers, "full" (the bytes
//     have landed) and "empty" (every consumer warp is done reading): no block-wide barrier per tile.
// Forward (hopper_fwd_kernel): 128 query rows per block, 128-key tiles. Per tile a consumer computes
// S = Q K^T, the online softmax of common.cuh, O += P V (P from registers), with two overlaps that keep the
// tensor cores busy while the exponentials run:
//   ping-pong: the two consumers take turns issuing their products (named barriers 1 and 2), so one
//     warpgroup's softmax runs while the other's products do;
//   in-warpgroup: tile j's S = Q K^T is issued together with tile j-1's O += P V; the softmax of tile j
//     runs while that P V is still on the tensor cores, and O is rescaled once it has landed.
// Backward: the delta kernel (common.cuh), then portable.cu's steps 2 and 3 on wgmma, warp-specialised:
//   hopper_bwd_dkdv_kernel: 128 keys per block (64 per consumer); K, V copied once, then Q, dO (TMA) and
//     lse, delta (the producer's warp 1, plain loads) in 64-query tiles;
//   hopper_bwd_dq_kernel: 128 queries per block; Q, dO copied once, then K, V in 64-key tiles.
// Padded keys: TMA copies rows past n as memory holds them (NaN too; 0 x NaN is NaN on the tensor cores),
// so their scores are set to -inf or P, dS selected to 0, never multiplied by a mask, and the padded rows of
// V (in O += P V) and K (in dQ += dS K) are zeroed in shared memory first. No tensor map: portable.cu runs.
#include <cuda.h>          // CUtensorMap and its enums only: nothing links libcuda (see encode_tiled)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include "common.cuh"

namespace {
// ---------------------------------------------------------------------------------------------------
// wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"): a warpgroup computes D (64 x N,
// fp32, in registers) (+)= A (64 x 16) B (16 x N) asynchronously: issue (wgmma.mma_async), close a group
// (commit_group), wait for it (wait_group). Warp w holds rows 16w..16w+15 of D in the C layout of
// common.cuh, and an A taken from registers is the mma.m16n8k16 A fragment of its 16 rows (portable.cu).
// Shared-memory operands are given by a 64-bit descriptor (bits 0-13 start address >> 4, 16-29 "leading"
// byte offset >> 4, 32-45 "stride" byte offset >> 4, 62-63 swizzle: 1 = 128-byte) and lie in the
// 128-byte-swizzled layout: rows of 64 elements (128 B) in 1024-byte groups of 8 rows, 16-byte chunk c of
// row r at position c ^ (r % 8) (tiles start 1024-byte aligned); a D = 128 tile is two 64-column halves.
//   K-major operand (k contiguous: Q as A, K as B of Q K^T): 8-row groups 1024 B apart (stride offset);
//     a k-step moves 32 B along the 128-byte row, then to the next half.
//   MN-major operand (V as B of P V, "transpose B" set): 8-key groups 1024 B apart (stride offset), the
//     two 64-column halves of d one half-tile apart (leading offset).
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
// The compiler sees a wgmma's accumulators (float) as written at issue, not when wait_group returns, and
// its register A operand (uint32_t) as read at issue, though the tensor cores read it until then: an empty
// volatile asm that "rewrites" each one pins the former's reads after the wait and keeps the latter live.
template <typename R, int NB>
__device__ __forceinline__ void fence_regs(R (&d)[NB][4]) {
#pragma unroll
    for (int i = 0; i < NB; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if constexpr (std::is_same<R, float>::value) asm volatile("" : "+f"(d[i][e]) :: "memory");
            else asm volatile("" : "+r"(d[i][e]) :: "memory");
        }
}

// The accumulator operands of an m64nN wgmma: d[0..N/8)[0..4), as in-out registers.
#define WGMMA_D(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WGMMA_ACC64 WGMMA_D(0), WGMMA_D(1), WGMMA_D(2), WGMMA_D(3), WGMMA_D(4), WGMMA_D(5), WGMMA_D(6), WGMMA_D(7)
#define WGMMA_R0_31 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_REGS64 "{" WGMMA_R0_31 "}"
#define WGMMA_ACC128 \
    WGMMA_ACC64, WGMMA_D(8), WGMMA_D(9), WGMMA_D(10), WGMMA_D(11), WGMMA_D(12), WGMMA_D(13), WGMMA_D(14), WGMMA_D(15)
#define WGMMA_REGS128 \
    "{" WGMMA_R0_31 "," \
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
    static_assert(N == 64 || N == 128, "wgmma_ss: N = 64 or 128");
    constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
    if constexpr (N == 128 && bf16) WGMMA_SS("bf16", 128, "%64", "%65", "%66");
    else if constexpr (N == 128) WGMMA_SS("f16", 128, "%64", "%65", "%66");
    else if constexpr (bf16) WGMMA_SS("bf16", 64, "%32", "%33", "%34");
    else WGMMA_SS("f16", 64, "%32", "%33", "%34");
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
    static_assert(N == 64 || N == 128, "wgmma_rs: N = 64 or 128");
    constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
    if constexpr (N == 128 && bf16) WGMMA_RS("bf16", 128, "%64", "%65", "%66", "%67", "%68", "%69");
    else if constexpr (N == 128) WGMMA_RS("f16", 128, "%64", "%65", "%66", "%67", "%68", "%69");
    else if constexpr (bf16) WGMMA_RS("bf16", 64, "%32", "%33", "%34", "%35", "%36", "%37");
    else WGMMA_RS("f16", 64, "%32", "%33", "%34", "%35", "%36", "%37");
#undef WGMMA_RS
}

// The kernels' two shapes of product (issued, not committed), over D-column tiles stored as 64-column halves:
// d = A B^T, contracting the head dim: A = 64 rows at a (of an A_ROWS-row tile), B = N rows at b (of a
// B_ROWS-row tile), both K-major.
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
// common.cuh's pack_a for a whole tile (NB / 2 k-steps), before its products are issued.
template <typename T, int NB>
__device__ __forceinline__ void pack_a(const float (&c)[NB][4], uint32_t (&a)[NB / 2][4]) {
#pragma unroll
    for (int kk = 0; kk < NB / 2; ++kk) pack_a<T>(c, kk, a[kk]);
}

// TMA copies, mbarriers, named barriers -------------------------------------------------------------
// mbarrier (PTX ISA "mbarrier"): a 64-bit shared object whose current phase completes when its expected
// arrivals have arrived and its expected bytes (TMA copies) have landed; waits name the phase's parity.
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
// A wait past 2^32 ns of %globaltimer (~4 s) is a synchronisation bug: trap (the launch fails), not hang.
// One asm block: as a C++ loop the forward spilled (docs/attention.md, "Hopper, 2.1").
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred ready, more;\n.reg .u64 t0, t1;\nmov.u64 t0, %%globaltimer;\nwait_again:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n@ready bra wait_done;\n"
                 "mov.u64 t1, %%globaltimer;\nsub.u64 t1, t1, t0;\nsetp.lt.u64 more, t1, 4294967296;\n"
                 "@more bra wait_again;\ntrap;\nwait_done:\n}\n" :: "r"(bar), "r"(parity) : "memory");
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
// Zero rows [first, ROWS) of a swizzled ROWS x D tile, by NT threads (i in 0..NT-1; the swizzle moves
// chunks within a row only). The tensor cores read the tile next: each thread fences its stores into the
// async proxy; the caller then syncs the NT threads.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void zero_tail_rows(unsigned char* tile, int first, int i) {
    for (int c = first * 8 + i; c < ROWS * 8; c += NT)  // 8 chunks of 16 B per 128-byte row
#pragma unroll
        for (int half = 0; half < D / 64; ++half)
            *reinterpret_cast<uint4*>(tile + half * ROWS * 128 + c * 16) = make_uint4(0, 0, 0, 0);
    fence_proxy_async();
}
#endif

// Forward -------------------------------------------------------------------------------------------
constexpr int WG_BM = 128, WG_BN = 128;  // query rows per block (64 per consumer), keys per tile
constexpr int WS_STAGES = 2, WS_THREADS = 384;
// mbarriers, 8 bytes each after the tiles: Q full, then per stage K full, V full, K empty, V empty.
constexpr int WS_BARS = 1 + 4 * WS_STAGES;
template <typename T, int D> constexpr int fwd_ws_smem() {  // Q, stages x (K, V), barriers, valid keys, align
    return (WG_BM + 2 * WS_STAGES * WG_BN) * D * 2 + WS_BARS * 8 + WS_STAGES * 4 + 1024;
}

// The key tiles a forward block visits: dense, [0, kv_len); sliding-tile attention (docs/attention.md), the
// tiles of the head's window (a text block: all) of the 384-slot tiles leading the sequence, then the text.
// Key tiles of padding slots only are skipped; `idle`: a block of padding-slot queries only.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ int sta_tile(int d) { return d == 0 ? 6 : 8; }  // __init__.py's STA_TILE (t, h, w)
struct KeyTiles {
    int lo[3], len[3], n_win = 0, base = 0, kv_len, n = 0, k = 0, c = 0;  // k, c: next()'s tile and key tile
    bool idle = false;
    // Tile i of the window: its index in the tile grid and its tokens (fewer at the grid's edge).
    __device__ int tile(const AttnParams& p, int i, int& tokens) const {
        const int t[3] = {lo[0] + i / (len[1] * len[2]), lo[1] + i / len[2] % len[1], lo[2] + i % len[2]};
        int index = 0;
        tokens = 1;
        for (int d = 0; d < 3; ++d) {
            index = index * ((p.sta_grid[d] + sta_tile(d) - 1) / sta_tile(d)) + t[d];
            tokens *= min(sta_tile(d), p.sta_grid[d] - t[d] * sta_tile(d));
        }
        return index;
    }
    __device__ KeyTiles(const AttnParams& p, int m0, int h, int kv_len_) : kv_len(kv_len_) {
        if (p.sta_windows != nullptr) {
            int nt[3], q = m0 / 384, tokens = 1;
            for (int d = 0; d < 3; ++d) nt[d] = (p.sta_grid[d] + sta_tile(d) - 1) / sta_tile(d);
            const int qc[3] = {q / (nt[1] * nt[2]), q / nt[2] % nt[1], q % nt[2]};
            base = nt[0] * nt[1] * nt[2] * 384;
            for (int d = 0; d < 3; ++d) {  // centred on the query's tile, shifted inward at the grid's edge
                const int half = p.sta_windows[3 * h + d] / 2, mid = min(max(qc[d], half), nt[d] - 1 - half);
                lo[d] = m0 < base ? max(mid - half, 0) : 0;
                len[d] = m0 < base ? min(mid + half, nt[d] - 1) - lo[d] + 1 : nt[d];
                tokens *= min(sta_tile(d), p.sta_grid[d] - qc[d] * sta_tile(d));  // the query tile's
            }
            idle = m0 < base && m0 % 384 >= tokens;
            n_win = len[0] * len[1] * len[2];
            for (int i = 0; i < n_win; ++i) {
                tile(p, i, tokens);
                n += (tokens + WG_BN - 1) / WG_BN;
            }
        }
        n += (kv_len - base + WG_BN - 1) / WG_BN;
    }
    // The next key tile: its first key, and in `valid` its valid keys (>= 1: every row max is finite).
    __device__ int next(const AttnParams& p, int& valid) {
        if (k < n_win) {
            int tokens;
            const int key0 = tile(p, k, tokens) * 384 + c * WG_BN;
            valid = min(WG_BN, tokens - c * WG_BN);
            if (++c * WG_BN >= tokens) ++k, c = 0;  // the window's next tile
            return key0;
        }
        const int key0 = base + c++ * WG_BN;  // the text's tiles
        valid = min(WG_BN, kv_len - key0);
        return key0;
    }
};
#endif

template <typename T, int D>
__global__ void __launch_bounds__(WS_THREADS, 1)
    hopper_fwd_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
                      const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int Q_BYTES = WG_BM * D * 2, KV_BYTES = WG_BN * D * 2;  // 32 KB each at D = 128
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sK = sQ + Q_BYTES;                   // [WS_STAGES][KV_BYTES]
    unsigned char* sV = sK + WS_STAGES * KV_BYTES;      // [WS_STAGES][KV_BYTES]
    const uint32_t bars = smem_u32(sV + WS_STAGES * KV_BYTES), q_full = bars;
    auto k_full = [&](int st) { return bars + 8 * (1 + st); };
    auto v_full = [&](int st) { return bars + 8 * (1 + WS_STAGES + st); };
    auto k_empty = [&](int st) { return bars + 8 * (1 + 2 * WS_STAGES + st); };
    auto v_empty = [&](int st) { return bars + 8 * (1 + 3 * WS_STAGES + st); };
    int* s_valid = reinterpret_cast<int*>(sV + WS_STAGES * KV_BYTES + WS_BARS * 8);  // per stage: valid keys
    const int h = blockIdx.y, b = blockIdx.z;  // sliding-tile: the text blocks (every image tile) go first
    const int m0 = (p.sta_windows ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * WG_BM;
    const int wg = threadIdx.x / 128;
    KeyTiles keys(p, m0, h, p.kv_lens[b]);
    const int n_tiles = keys.n;
    if (keys.idle) {  // padding-slot queries only: zeros, so the DiT's padding tokens stay finite
        T* out = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
        for (int i = threadIdx.x; i < WG_BM * D / 8; i += WS_THREADS)
            *reinterpret_cast<uint4*>(out + (m0 + i / (D / 8)) * p.o.stride_l + i % (D / 8) * 8) = uint4{};
        return;
    }
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
                int valid, key0 = keys.next(p, valid);
                if (j >= WS_STAGES) mbar_wait(k_empty(st), parity ^ 1);
                s_valid[st] = valid;  // released to the consumers by the arrival on K full
                mbar_arrive_expect(k_full(st), KV_BYTES);
                for (int half = 0; half < D / 64; ++half)
                    tma_load_4d(smem_u32(sK + st * KV_BYTES) + half * WG_BN * 128, &map_k, k_full(st), half * 64, h,
                                key0, b);
                if (j >= WS_STAGES) mbar_wait(v_empty(st), parity ^ 1);
                mbar_arrive_expect(v_full(st), KV_BYTES);
                for (int half = 0; half < D / 64; ++half)
                    tma_load_4d(smem_u32(sV + st * KV_BYTES) + half * WG_BN * 128, &map_v, v_full(st), half * 64, h,
                                key0, b);
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        const int cw = wg - 1;  // consumer 0 or 1: query rows 64 cw .. 64 cw + 63 of the block
        const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, t = lane % 4;
        const uint32_t q_addr = smem_u32(sQ) + cw * 64 * 128;
        const float scale_log2 = p.scale * LOG2E;
        // Named barrier 1 + c: "consumer c may issue". Consumer 0 goes first; each passes the turn on after
        // issuing a tile's products (id 3: both consumers, after zeroing V's padded rows).
        if (cw == 1) named_arrive(1, 256);
        float o[D / 8][4] = {};
        float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
        float s[WG_BN / 8][4];
        uint32_t pa[WG_BN / 16][4];  // P of the tile whose P V is pending
        float alpha[2];              // the last softmax's rescale factors, applied to o once it may be touched
        mbar_wait(q_full, 0);
        // Tile j's S = Q K^T, issued on this consumer's turn (with tile j-1's P V behind it, if with_pv),
        // then waited for, K released, masked, and its softmax computed into alpha (not applied).
        auto scores = [&](int j, bool with_pv) {
            const int st = j % WS_STAGES, prev = (j + WS_STAGES - 1) % WS_STAGES;
            mbar_wait(k_full(st), (j / WS_STAGES) & 1);
            const int valid = s_valid[st];  // read before the named barrier, so before this warp releases K
            if (with_pv) mbar_wait(v_full(prev), ((j - 1) / WS_STAGES) & 1);
            named_sync(1 + cw, 256);
            wgmma_fence();
            wgmma_dot_rows<T, WG_BN, D, WG_BM, WG_BN>(s, q_addr, smem_u32(sK + st * KV_BYTES));
            wgmma_commit();
            if (with_pv) {  // tile j-1 < the last: its keys past `valid` are padding slots, finite, P = 0
                wgmma_acc_rows<T, D, WG_BN>(o, pa, smem_u32(sV + prev * KV_BYTES));
                wgmma_commit();
                named_arrive(1 + (cw ^ 1), 256);
                wgmma_wait<1>();  // S has landed; P V may still run
            } else {
                named_arrive(1 + (cw ^ 1), 256);
                wgmma_wait<0>();
            }
            fence_regs(s);
            if (lane == 0) mbar_arrive(k_empty(st));  // this warp no longer reads K tile j
            if (valid < WG_BN) mask_keys(s, 0, valid, t);
            softmax_rows(s, m_row, l_row, scale_log2, alpha);
        };
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
        // The last tile's O += P V, its padded V rows zeroed first by both consumers, then a barrier.
        const int last = (n_tiles - 1) % WS_STAGES;
        mbar_wait(v_full(last), ((n_tiles - 1) / WS_STAGES) & 1);
        const int tail = s_valid[last];  // valid keys in the last tile (nothing overwrites it any more)
        if (tail < WG_BN) {
            zero_tail_rows<WG_BN, D, 256>(sV + last * KV_BYTES, tail, threadIdx.x - 128);
            named_sync(3, 256);
        }
        wgmma_fence();
        wgmma_acc_rows<T, D, WG_BN>(o, pa, smem_u32(sV + last * KV_BYTES));
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pa);
        if (lane == 0) mbar_arrive(v_empty(last));
        // Consumer 1 passed the turn once more than consumer 0 took it: take it, so no arrival is left over.
        if (cw == 0) named_sync(1, 256);
        T* out = static_cast<T*>(p.o.ptr) + b * p.o.stride_b + h * p.o.stride_h;
        float* lse = p.lse + (static_cast<long long>(b) * p.heads + h) * p.len_q;
        store_rows(o, m_row, l_row, out, p.o.stride_l, lse, m0 + cw * 64 + warp * 16 + lane / 4, p.len_q, t);
    }
#endif
}

// ---------------------------------------------------------------------------------------------------
// Backward: no ping-pong and no in-warpgroup overlap (the dK/dV consumers hold 128 accumulator registers,
// dK and dV, besides a tile's S^T and dP^T: no room for a second tile's scores).
constexpr int WGB_BN = 128, WGB_BM = 64;  // dK/dV: keys per block (64 per warpgroup), queries per tile
constexpr int WGQ_BM = 128, WGQ_BN = 64;  // dQ: queries per block (64 per warpgroup), keys per tile
constexpr int WSB_STAGES = 2;
template <typename T, int D> constexpr int dkdv_ws_smem() {  // K, V, stages x (Q, dO, lse, delta), barriers, align
    return (2 * WGB_BN + 2 * WSB_STAGES * WGB_BM) * D * static_cast<int>(sizeof(T)) + WSB_STAGES * 2 * WGB_BM * 4 +
           (1 + 2 * WSB_STAGES) * 8 + 1024;
}
template <typename T, int D> constexpr int dq_ws_smem() {  // Q, dO, stages x (K, V), barriers, align
    return (2 * WGQ_BM + 2 * WSB_STAGES * WGQ_BN) * D * static_cast<int>(sizeof(T)) + (1 + 2 * WSB_STAGES) * 8 + 1024;
}

// One dK/dV tile for one warpgroup: its 64 keys (k_addr, v_addr) against 64 queries (q_addr, do_addr;
// lse_i, delta_i): S^T = K Q^T, dP^T = V dO^T (two groups); P^T, dS^T, selected to 0 for keys past
// kv_len; dV += P^T dO, dK += dS^T Q (A from registers; dO, Q read again as MN-major B operands).
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

// One dQ tile for one warpgroup: its 64 queries (q_addr, do_addr; row_lse, row_delta: this thread's rows)
// against the 64 keys at k_addr, v_addr from key0: S = Q K^T, dP = dO V^T (two groups); P, dS, selected to
// 0 for keys past kv_len; before_dq() (padded K rows zeroed); dQ += dS K (K as an MN-major B).
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

// dK, dV: the producer's thread 0 copies K and V once, then Q and dO tile by tile; its warp 1 copies lse
// and delta with plain loads, every lane arriving on the stage's full barrier (33: 1 expect_tx + 32).
template <typename T, int D>
__global__ void __launch_bounds__(WS_THREADS, 1)
    hopper_bwd_dkdv_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
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
    const uint32_t bars = smem_u32(sDelta + WSB_STAGES * WGB_BM), kv_full = bars;
    auto q_full = [&](int st) { return bars + 8 * (1 + st); };
    auto q_empty = [&](int st) { return bars + 8 * (1 + WSB_STAGES + st); };
    const int n0 = blockIdx.x * WGB_BN, h = blockIdx.y, b = blockIdx.z, wg = threadIdx.x / 128;
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
        float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};
        mbar_wait(kv_full, 0);
        for (int it = 0; it < q_tiles; ++it) {
            const int st = it % WSB_STAGES;
            mbar_wait(q_full(st), (it / WSB_STAGES) & 1);
            const uint32_t q_addr = smem_u32(sQ + st * QT_BYTES), do_addr = smem_u32(sdO + st * QT_BYTES);
            dkdv_tile<T, D>(dk_acc, dv_acc, k_addr, v_addr, q_addr, do_addr, sLse + st * WGB_BM,
                            sDelta + st * WGB_BM, valid_key, scale_log2, t);
            __syncwarp();  // every lane's loads of lse and delta are ordered before lane 0's release
            if (lane == 0) mbar_arrive(q_empty(st));  // this warp is done with the stage (Q, dO, lse, delta)
        }
        store_scaled(dk_acc, in.dk, p.dk.stride_l, key_g, p.len_k, t, p.scale);
        store_scaled(dv_acc, in.dv, p.dv.stride_l, key_g, p.len_k, t, 1.f);
    }
#endif
}

// dQ: K and V of a tile complete one full barrier. The last tile's padded K rows are zeroed before
// dQ += dS K, between two barriers of both consumers (both done reading K for S; the zeros are in).
template <typename T, int D>
__global__ void __launch_bounds__(WS_THREADS, 1)
    hopper_bwd_dq_kernel(const AttnParams p, const __grid_constant__ CUtensorMap map_q,
                         const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
                         const __grid_constant__ CUtensorMap map_do) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int QT_BYTES = WGQ_BM * D * 2, KV_BYTES = WGQ_BN * D * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // 1024-byte aligned
    unsigned char* sdO = sQ + QT_BYTES;
    unsigned char* sK = sdO + QT_BYTES;               // [WSB_STAGES][KV_BYTES]
    unsigned char* sV = sK + WSB_STAGES * KV_BYTES;   // [WSB_STAGES][KV_BYTES]
    const uint32_t bars = smem_u32(sV + WSB_STAGES * KV_BYTES), q_full = bars;
    auto kv_full = [&](int st) { return bars + 8 * (1 + st); };
    auto kv_empty = [&](int st) { return bars + 8 * (1 + WSB_STAGES + st); };
    const int m0 = blockIdx.x * WGQ_BM, h = blockIdx.y, b = blockIdx.z, wg = threadIdx.x / 128;
    const int kv_len = p.kv_lens[b], n_tiles = (kv_len + WGQ_BN - 1) / WGQ_BN;
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
// Launchers. TMA reads global memory through tensor maps (CUDA driver API "Tensor Map Object Management"),
// passed to the kernel by value; cuTensorMapEncodeTiled is fetched through the runtime: nothing links libcuda.
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
// False where the driver refuses. The driver call needs the device's context current on this thread, which
// autograd's backward thread may not have yet (cudaSetDevice makes the primary context current).
bool tensor_map(CUtensorMap* map, const AttnTensor& x, int len, const AttnParams& p, int rows) {
    const EncodeTiled encode = encode_tiled();
    int dev;
    if (encode == nullptr || cudaGetDevice(&dev) != cudaSuccess || cudaSetDevice(dev) != cudaSuccess) return false;
    const cuuint64_t s_h = p.heads == 1 ? p.head_dim * 2 : x.stride_h * 2;
    const cuuint64_t s_l = len == 1 ? s_h * p.heads : x.stride_l * 2;
    const cuuint64_t s_b = p.batch == 1 ? s_l * len : x.stride_b * 2;
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.heads),
                                static_cast<cuuint64_t>(len), static_cast<cuuint64_t>(p.batch)};
    const cuuint64_t strides[3] = {s_h, s_l, s_b};
    const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(rows), 1}, elem_strides[4] = {1, 1, 1, 1};
    return encode(map, p.is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, x.ptr, dims,
                  strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int D>
int forward(const AttnParams& p, cudaStream_t stream) {
    CUtensorMap maps[3];
    if (!tensor_map(&maps[0], p.q, p.len_q, p, WG_BM) || !tensor_map(&maps[1], p.k, p.len_k, p, WG_BN) ||
        !tensor_map(&maps[2], p.v, p.len_k, p, WG_BN))
        return ATTN_NO_TENSOR_MAP;
    return launch(hopper_fwd_kernel<T, D>, dim3((p.len_q + WG_BM - 1) / WG_BM, p.heads, p.batch), WS_THREADS,
                  fwd_ws_smem<T, D>(), stream, p, maps[0], maps[1], maps[2]);  // D = 128: 164,944 B
}

template <typename T, int D>
int backward(const AttnParams& p, cudaStream_t stream) {
    CUtensorMap maps[4], maps_dq[4];  // q, k, v, dout: dK/dV's boxes (64 queries, 128 keys), dQ's (128, 64)
    if (!tensor_map(&maps[0], p.q, p.len_q, p, WGB_BM) || !tensor_map(&maps[1], p.k, p.len_k, p, WGB_BN) ||
        !tensor_map(&maps[2], p.v, p.len_k, p, WGB_BN) || !tensor_map(&maps[3], p.dout, p.len_q, p, WGB_BM) ||
        !tensor_map(&maps_dq[0], p.q, p.len_q, p, WGQ_BM) || !tensor_map(&maps_dq[1], p.k, p.len_k, p, WGQ_BN) ||
        !tensor_map(&maps_dq[2], p.v, p.len_k, p, WGQ_BN) || !tensor_map(&maps_dq[3], p.dout, p.len_q, p, WGQ_BM))
        return ATTN_NO_TENSOR_MAP;
    cudaError_t err = launch_delta<T, D>(p, stream);
    if (err == cudaSuccess)  // D = 128: 133,160 B of shared memory
        err = launch(hopper_bwd_dkdv_kernel<T, D>, dim3((p.len_k + WGB_BN - 1) / WGB_BN, p.heads, p.batch),
                     WS_THREADS, dkdv_ws_smem<T, D>(), stream, p, maps[0], maps[1], maps[2], maps[3]);
    if (err == cudaSuccess)  // D = 128: 132,136 B
        err = launch(hopper_bwd_dq_kernel<T, D>, dim3((p.len_q + WGQ_BM - 1) / WGQ_BM, p.heads, p.batch),
                     WS_THREADS, dq_ws_smem<T, D>(), stream, p, maps_dq[0], maps_dq[1], maps_dq[2], maps_dq[3]);
    return err;
}
}  // namespace

ATTN_ENTRY(attn_hopper_forward, forward)
ATTN_ENTRY(attn_hopper_backward, backward)
