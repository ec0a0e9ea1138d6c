// torch binding of the kernels (portable.cu: version 1.2; hopper.cu: version 2.1): allocates outputs and
// workspaces, fills AttnParams, launches on the stream the caller passes
// (torch.cuda.current_stream().cuda_stream). Only torch headers here, no CUDA headers: the checks a user
// can trip are made in Python (__init__.py) with one-line messages; these are internal invariants.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "attention.h"

namespace {

// The kernel versions the last forward and backward launched, for last_kernels().
const char* last_forward = "";
const char* last_backward = "";

AttnTensor view(const torch::Tensor& x) { return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)}; }

void check_input(const torch::Tensor& x, const torch::Tensor& like, const char* name) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.scalar_type() == like.scalar_type() &&
                    x.device() == like.device(),
                "attention_cuda: ", name, " must be a 4-d CUDA tensor like q");
    bool aligned = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
    for (int d = 0; d < 3; ++d)  // a size-1 dim's stride is never used
        aligned = aligned && (x.stride(d) % 8 == 0 || x.size(d) == 1);
    TORCH_CHECK(aligned, "attention_cuda: ", name, " rows must be contiguous and 16-byte aligned");
}

AttnParams params(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& kv_lens) {
    check_input(q, q, "q");
    check_input(k, q, "k");
    check_input(v, q, "v");
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
                "attention_cuda: bf16 or fp16 only");
    TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "attention_cuda: head_dim 64 or 128 only");
    TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                    q.size(3) == k.size(3),
                "attention_cuda: q, k, v shapes disagree");
    TORCH_CHECK(kv_lens.is_cuda() && kv_lens.scalar_type() == torch::kInt32 && kv_lens.is_contiguous() &&
                kv_lens.numel() == q.size(0), "attention_cuda: kv_lens must be (B,) int32 on the GPU");
    AttnParams p = {};
    p.q = view(q);
    p.k = view(k);
    p.v = view(v);
    p.kv_lens = kv_lens.data_ptr<int>();
    p.batch = q.size(0);
    p.len_q = q.size(1);
    p.heads = q.size(2);
    p.head_dim = q.size(3);
    p.len_k = k.size(1);
    p.scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim));
    p.is_bf16 = q.scalar_type() == torch::kBFloat16;
    return p;
}

// Returns (o (B, Lq, H, D), lse (B, H, Lq) fp32). hopper: try version 2.1 first (compute capability 9.0
// only); it falls back to 1.2 where the driver refuses a tensor map.
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_lens,
                                   int64_t stream, bool hopper) {
    AttnParams p = params(q, k, v, kv_lens);
    auto o = torch::empty({p.batch, p.len_q, p.heads, p.head_dim}, q.options());
    auto lse = torch::empty({p.batch, p.heads, p.len_q}, q.options().dtype(torch::kFloat32));
    p.o = view(o);
    p.lse = lse.data_ptr<float>();
    void* s = reinterpret_cast<void*>(stream);
    int err = hopper ? attn_hopper_forward(p, s) : ATTN_NO_TENSOR_MAP;
    last_forward = err == ATTN_NO_TENSOR_MAP ? "1.2" : "2.1 ws";
    if (err == ATTN_NO_TENSOR_MAP) err = attn_portable_forward(p, s);
    TORCH_CHECK(err == 0, "attention_cuda forward: ", attn_error_string(err));
    return {o, lse};
}

// Sliding-tile attention's forward (version 2.1 only; attention_cuda/__init__.py checks the layout):
// windows (H, 3) int32 on the GPU, grid the latent (T, H, W) whose tile-ordered tokens lead the sequence.
std::vector<torch::Tensor> forward_sparse(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                          torch::Tensor kv_lens, int64_t stream, torch::Tensor windows,
                                          std::vector<int64_t> grid) {
    AttnParams p = params(q, k, v, kv_lens);
    TORCH_CHECK(windows.is_cuda() && windows.scalar_type() == torch::kInt32 && windows.is_contiguous() &&
                    windows.numel() == 3 * p.heads && grid.size() == 3,
                "attention_cuda: sparse windows must be (H, 3) int32 on the GPU and grid (T, H, W)");
    auto o = torch::empty({p.batch, p.len_q, p.heads, p.head_dim}, q.options());
    auto lse = torch::empty({p.batch, p.heads, p.len_q}, q.options().dtype(torch::kFloat32));
    p.o = view(o);
    p.lse = lse.data_ptr<float>();
    p.sta_windows = windows.data_ptr<int>();
    for (int d = 0; d < 3; ++d) p.sta_grid[d] = static_cast<int>(grid[d]);
    int err = attn_hopper_forward(p, reinterpret_cast<void*>(stream));
    TORCH_CHECK(err != ATTN_NO_TENSOR_MAP, "attention_cuda: the driver refused a tensor map, and only "
                "version 2.1 runs sliding-tile attention; pass contiguous q, k, v");
    last_forward = "2.1 ws";
    TORCH_CHECK(err == 0, "attention_cuda forward: ", attn_error_string(err));
    return {o, lse};
}

// Returns (dq, dk, dv), each shaped like its input.
std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor o,
                                    torch::Tensor lse, torch::Tensor dout, torch::Tensor kv_lens,
                                    int64_t stream, bool hopper) {
    AttnParams p = params(q, k, v, kv_lens);
    check_input(o, q, "o");
    check_input(dout, q, "dout");
    TORCH_CHECK(o.sizes() == q.sizes() && dout.sizes() == q.sizes(),
                "attention_cuda: o and dout must be shaped like q");
    TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.is_contiguous() &&
                    lse.numel() == p.batch * p.heads * p.len_q,
                "attention_cuda: lse must be the forward's (B, H, Lq) fp32 output");
    auto dq = torch::empty_like(q, at::MemoryFormat::Contiguous);
    auto dk = torch::empty_like(k, at::MemoryFormat::Contiguous);
    auto dv = torch::empty_like(v, at::MemoryFormat::Contiguous);
    auto f32 = q.options().dtype(torch::kFloat32);
    auto delta = torch::empty({p.batch, p.heads, p.len_q}, f32);
    p.o = view(o);
    p.dout = view(dout);
    p.dq = view(dq);
    p.dk = view(dk);
    p.dv = view(dv);
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    void* s = reinterpret_cast<void*>(stream);
    int err = hopper ? attn_hopper_backward(p, s) : ATTN_NO_TENSOR_MAP;
    last_backward = err == ATTN_NO_TENSOR_MAP ? "1.2" : "2.1 ws";
    if (err == ATTN_NO_TENSOR_MAP) err = attn_portable_backward(p, s);
    TORCH_CHECK(err == 0, "attention_cuda backward: ", attn_error_string(err));
    return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "attention forward: (o, lse)");
    m.def("forward_sparse", &forward_sparse, "sliding-tile attention forward, version 2.1: (o, lse)");
    m.def("backward", &backward, "attention backward: (dq, dk, dv)");
    m.def("last_kernels",
          [] { return std::make_pair(std::string(last_forward), std::string(last_backward)); },
          "the kernel versions the last forward and backward launched");
}
