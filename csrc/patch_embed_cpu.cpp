// CPU implementation of vitfast::patch_embed.
//
// Normalisation is folded into the weights and bias (conv is linear in its input), the
// image is read once into the patch matrix, one GEMM (with the folded bias) produces the
// patch tokens, and class token / positional embedding are written into the token buffer.
#include <torch/library.h>

#include "patch_embed.h"

namespace vitfast {
namespace {

at::Tensor patch_embed_cpu(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                           const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  const PatchEmbedShape s = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std);
  const auto wt = weight.scalar_type();
  // half/bfloat16 compute in float32 on the CPU; float32 and float64 in their own precision
  const auto ct = (wt == at::kDouble) ? at::kDouble : at::kFloat;
  const int64_t K = s.C * s.p * s.p;
  const bool is_uint8 = images.scalar_type() == at::kByte;
  const bool affine = is_uint8 || mean.has_value();

  // Fold x * scale[c] + shift[c] into the GEMM: W' = W * scale, b' = b + sum(W * shift).
  at::Tensor w = weight.to(ct);
  at::Tensor b = bias ? bias->to(ct) : at::zeros({s.D}, weight.options().dtype(ct));
  if (affine) {
    auto [scale, shift] = channel_affine(s.C, is_uint8, mean, std, images.device());
    auto w64 = weight.to(at::kDouble);
    b = (b.to(at::kDouble) + (w64 * shift.view({1, s.C, 1, 1})).sum({1, 2, 3})).to(ct);
    w = (w64 * scale.view({1, s.C, 1, 1})).to(ct);
  }
  // Patch matrix [B*N, K], rows in (b, hp, wp) order, columns in (c, i, j) order, read once
  // from the image in whatever layout it has (NCHW or channels_last) and dtype.
  at::Tensor patches = at::empty({s.B, s.Hp, s.Wp, s.C, s.p, s.p}, images.options().dtype(ct));
  patches.copy_(images.view({s.B, s.C, s.Hp, s.p, s.Wp, s.p}).permute({0, 2, 4, 1, 3, 5}));

  at::Tensor out = at::empty({s.B, s.T, s.D}, weight.options().dtype(ct));
  const int64_t off = s.has_cls ? 1 : 0;
  at::Tensor tokens = at::addmm(b, patches.view({s.B * s.N, K}), w.view({s.D, K}).t());
  out.narrow(1, off, s.N).copy_(tokens.view({s.B, s.N, s.D}));
  apply_cls_pos(out, s, cls_token, pos_embed);
  return out.to(wt);
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) { m.impl("patch_embed", &patch_embed_cpu); }

}  // namespace vitfast
