#pragma once
// Shared argument checks and normalisation folding for the patch-embedding op.
#include <ATen/ATen.h>

#include <optional>

namespace vitfast {

struct PatchEmbedShape {
  int64_t B, C, H, W, D, p, Hp, Wp, N, T;  // T = tokens out (N, or N + 1 with a class token)
  bool has_cls;
};

// Validates every argument (TORCH_CHECK with the argument's name) and returns the sizes.
PatchEmbedShape check_patch_embed_args(
    const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std);

// Per-channel affine map x_norm = x * scale[c] + shift[c] that turns raw pixels into the
// normalised input: scale = 1/(255 std) and shift = -mean/std for uint8, 1/std and -mean/std
// for float with mean/std, 1 and 0 otherwise. Returned as float64 [C] tensors on `device`.
std::pair<at::Tensor, at::Tensor> channel_affine(
    int64_t C, bool is_uint8, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
    const at::Device& device);

// Writes class token and positional embedding rows of `out` [B, T, D] and adds pos to the
// patch rows (out's patch rows must already hold conv + bias).
void apply_cls_pos(at::Tensor& out, const PatchEmbedShape& s, const std::optional<at::Tensor>& cls_token,
                   const std::optional<at::Tensor>& pos_embed);

}  // namespace vitfast
