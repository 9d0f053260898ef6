#pragma once
// Shared pieces of the patch-embedding op (CPU and CUDA): argument checks and the
// per-channel normalisation that every kernel applies to the pixels as it loads them.
//
// Semantics (both devices): x = images * scale[c] + shift[c] (the normalised image, see
// channel_scale_shift), tokens = patches(x) @ weight^T + bias, then the class token row and
// the positional embedding. Gradients follow from that: mean/std are constants.
#include <ATen/ATen.h>

#include <array>
#include <optional>

namespace vitfast {

struct PatchEmbedShape {
  int64_t B, C, H, W, D, p, Hp, Wp, N, T, K;  // T = tokens out (N, or N + 1 with a class token), K = C*p*p
  bool has_cls;
  int64_t off() const { return has_cls ? 1 : 0; }
};

// Validates images, weight, mean and std (TORCH_CHECK_VALUE/TYPE naming the argument) and
// returns the sizes. The Python wrapper raises the same errors first; these are a second line.
PatchEmbedShape check_images_weight(const at::Tensor& images, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                                    bool has_cls, const char* op);

// Every argument of vitfast::patch_embed.
PatchEmbedShape check_patch_embed_args(
    const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std);

// Every argument of vitfast::patch_embed_backward.
PatchEmbedShape check_patch_embed_backward_args(const at::Tensor& grad_out, const at::Tensor& images,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& mean,
                                                const std::optional<at::Tensor>& std, bool has_cls,
                                                int64_t pos_tokens, std::array<bool, 5> output_mask);

// The tokens' dtype: out_dtype (checked floating point), else the weight's.
at::ScalarType tokens_dtype(const at::Tensor& weight, std::optional<at::ScalarType> out_dtype, const char* op);

// A given patch matrix (the `patches` argument): [B*T, K], contiguous, `dtype`, on `device`.
void check_patches(const std::optional<at::Tensor>& patches, const PatchEmbedShape& s, at::ScalarType dtype,
                   const at::Device& device, const char* op);

// The GEMM of the float32 CPU path: "gemm" (MKL on the patch matrix) or "conv" (oneDNN's
// convolution on the normalised image); VITFAST_CPU_PATCH_EMBED overrides. See patch_embed_cpu.cpp.
const char* cpu_strategy();

// mean/std as contiguous float64 [C] (what the kernels read), or an undefined tensor.
at::Tensor channel_stat(const std::optional<at::Tensor>& t);

// The normalisation x = raw * scale + shift for channel c, from float64 mean/std (nullptr
// when absent): scale = base/std, shift = -mean/std with base = 1/255 for uint8 and 1 for
// float images. Used by the CPU kernels and, as a __host__ __device__ copy, by CUDA.
inline double image_base_scale(bool is_uint8) { return is_uint8 ? 1.0 / 255.0 : 1.0; }

}  // namespace vitfast
