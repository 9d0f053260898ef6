// CUDA implementation of vitfast::patch_embed (first version): a patchify kernel that reads
// the image once, normalises on load and writes the patch matrix in the weight's dtype, then
// one cuBLAS GEMM with the bias, then class token and positional embedding.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../patch_embed.h"

namespace vitfast {
namespace {

// One thread per element of the patch matrix [B*N, K]; K = C*p*p in (c, i, j) order.
template <typename in_t, typename out_t>
__global__ void patchify_kernel(const in_t* __restrict__ images, out_t* __restrict__ patches,
                                const float* __restrict__ scale, const float* __restrict__ shift, int64_t total,
                                int64_t C, int64_t p, int64_t Hp, int64_t Wp, int64_t sB, int64_t sC, int64_t sH,
                                int64_t sW) {
  const int64_t K = C * p * p;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = idx / K, col = idx % K;
    const int64_t c = col / (p * p), ij = col % (p * p), i = ij / p, j = ij % p;
    const int64_t b = row / (Hp * Wp), hw = row % (Hp * Wp), hp = hw / Wp, wp = hw % Wp;
    const float x = static_cast<float>(images[b * sB + c * sC + (hp * p + i) * sH + (wp * p + j) * sW]);
    patches[idx] = static_cast<out_t>(x * scale[c] + shift[c]);
  }
}

at::Tensor patch_embed_cuda(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                            const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  const PatchEmbedShape s = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t K = s.C * s.p * s.p;
  const bool is_uint8 = images.scalar_type() == at::kByte;
  auto [scale64, shift64] = channel_affine(s.C, is_uint8, mean, std, images.device());
  const at::Tensor scale = scale64.to(at::kFloat), shift = shift64.to(at::kFloat);

  at::Tensor patches = at::empty({s.B * s.N, K}, weight.options());
  const int64_t total = patches.numel();
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "patchify_in", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "patchify_out", [&] {
        patchify_kernel<in_t, scalar_t><<<blocks, threads, 0, stream>>>(
            images.data_ptr<in_t>(), patches.data_ptr<scalar_t>(), scale.data_ptr<float>(), shift.data_ptr<float>(),
            total, s.C, s.p, s.Hp, s.Wp, images.stride(0), images.stride(1), images.stride(2), images.stride(3));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  at::Tensor out = at::empty({s.B, s.T, s.D}, weight.options());
  const int64_t off = s.has_cls ? 1 : 0;
  at::Tensor w = weight.reshape({s.D, K});
  at::Tensor tokens = bias ? at::addmm(bias->to(weight.scalar_type()), patches, w.t()) : at::mm(patches, w.t());
  out.narrow(1, off, s.N).copy_(tokens.view({s.B, s.N, s.D}));
  apply_cls_pos(out, s, cls_token, pos_embed);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("patch_embed", &patch_embed_cuda); }

}  // namespace vitfast
