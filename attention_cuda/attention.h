// The C-style interface between the kernels (attention.cu: CUDA headers only, so it compiles without
// torch's CUDA headers) and the torch binding (binding.cpp: torch headers only, no CUDA headers).
#pragma once

// One (B, L, heads, head_dim) tensor: element strides of the first three dims; the last dim is
// contiguous, every row start 16-byte aligned (the Python side copies anything else).
struct AttnTensor {
    void* ptr;
    long long stride_b, stride_l, stride_h;
};

struct AttnParams {
    AttnTensor q, k, v, o;      // forward: q, k, v in, o out
    AttnTensor dout, dq, dk, dv;  // backward: dout in, dq, dk, dv out
    float* lse;                 // (B, H, Lq) fp32: log2-sum-exp2 of the scaled scores, forward out, backward in
    float* delta;               // (B, H, Lq) fp32 workspace: rowsum(dout * o)
    float* dq_accum;            // unused since version 1.1 (dQ is written once by its own kernel); may be null
    const int* kv_lens;         // (B,) int32 on the device: valid keys per sample, each in [1, len_k]
    int batch, heads, len_q, len_k, head_dim;
    float scale;                // softmax scale, 1/sqrt(head_dim)
    int is_bf16;                // 1: bf16, 0: fp16
};

// Each returns 0 (cudaSuccess) or a cudaError_t code; attn_error_string turns it into words.
int attn_forward(const AttnParams& p, void* stream);
int attn_backward(const AttnParams& p, void* stream);
const char* attn_error_string(int err);
// The kernels the last attn_forward / attn_backward call launched, in words ("1.2", "2.0", "2.1 ws", ...):
// environment choices fall back silently where they do not apply, so tests and the benchmark ask.
const char* attn_last_forward();
const char* attn_last_backward();
