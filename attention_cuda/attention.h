// The C-style interface between the kernels (portable.cu, hopper.cu: CUDA headers only) and the torch
// binding (binding.cpp: torch headers only).
#pragma once

// One (B, L, heads, head_dim) tensor: element strides of the first three dims; the last dim is
// contiguous, every row start 16-byte aligned (the Python side copies anything else).
struct AttnTensor { void* ptr; long long stride_b, stride_l, stride_h; };

struct AttnParams {
    AttnTensor q, k, v, o;        // forward: q, k, v in, o out
    AttnTensor dout, dq, dk, dv;  // backward: dout in, dq, dk, dv out
    float* lse;                   // (B, H, Lq) fp32: log2-sum-exp2 of the scaled scores, forward out
    float* delta;                 // (B, H, Lq) fp32 workspace: rowsum(dout * o)
    const int* sta_windows;       // null, or (H, 3) int32 on the device: hopper.cu's sliding-tile forward
    const int* kv_lens;           // (B,) int32 on the device: valid keys per sample, each in [1, len_k]
    int batch, heads, len_q, len_k, head_dim;
    float scale;                  // softmax scale, 1/sqrt(head_dim)
    int is_bf16;                  // 1: bf16, 0: fp16
    int sta_grid[3];              // with sta_windows: the latent (T, H, W) whose tiles lead the sequence
};

// Each returns 0 (cudaSuccess) or a cudaError_t code, which attn_error_string puts into words.
// Version 1.2 (portable.cu), any GPU from sm_80 on:
int attn_portable_forward(const AttnParams& p, void* stream);
int attn_portable_backward(const AttnParams& p, void* stream);
// Version 2.1 (hopper.cu), compute capability 9.0 only; ATTN_NO_TENSOR_MAP: the driver refused a tensor
// map for these strides, nothing was launched, and the caller runs version 1.2 instead.
constexpr int ATTN_NO_TENSOR_MAP = -1;
int attn_hopper_forward(const AttnParams& p, void* stream);
int attn_hopper_backward(const AttnParams& p, void* stream);
const char* attn_error_string(int err);
