#include "patch_embed.h"

#include <c10/util/irange.h>

namespace vitfast {

namespace {
std::string shape_str(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}
}  // namespace

PatchEmbedShape check_patch_embed_args(
    const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  TORCH_CHECK_VALUE(images.dim() == 4, "vitfast.patch_embed: images must be [B, C, H, W], got shape ", shape_str(images));
  TORCH_CHECK_VALUE(weight.dim() == 4, "vitfast.patch_embed: weight must be [D, C, p, p], got shape ", shape_str(weight));
  auto it = images.scalar_type();
  TORCH_CHECK_TYPE(it == at::kByte || it == at::kFloat || it == at::kDouble || it == at::kHalf || it == at::kBFloat16,
              "vitfast.patch_embed: images must be uint8 or floating point, got ", it);
  auto wt = weight.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kFloat || wt == at::kDouble || wt == at::kHalf || wt == at::kBFloat16,
              "vitfast.patch_embed: weight must be floating point, got ", wt);
  PatchEmbedShape s;
  s.B = images.size(0);
  s.C = images.size(1);
  s.H = images.size(2);
  s.W = images.size(3);
  s.D = weight.size(0);
  s.p = weight.size(3);
  TORCH_CHECK_VALUE(weight.size(2) == weight.size(3), "vitfast.patch_embed: weight must have a square kernel [D, C, p, p], got ",
              shape_str(weight));
  TORCH_CHECK_VALUE(s.p >= 1, "vitfast.patch_embed: patch size must be >= 1");
  TORCH_CHECK_VALUE(weight.size(1) == s.C, "vitfast.patch_embed: images have ", s.C, " channels but weight expects ",
              weight.size(1), " (weight shape ", shape_str(weight), ")");
  TORCH_CHECK_VALUE(s.H % s.p == 0 && s.W % s.p == 0, "vitfast.patch_embed: image size ", s.H, "x", s.W,
              " is not divisible by the patch size ", s.p);
  s.Hp = s.H / s.p;
  s.Wp = s.W / s.p;
  s.N = s.Hp * s.Wp;
  s.has_cls = cls_token.has_value();
  s.T = s.N + (s.has_cls ? 1 : 0);
  auto dev = images.device();
  TORCH_CHECK_VALUE(weight.device() == dev, "vitfast.patch_embed: weight is on ", weight.device(), " but images are on ", dev);
  auto check_param = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    TORCH_CHECK_VALUE(t->device() == dev, "vitfast.patch_embed: ", name, " is on ", t->device(), " but images are on ", dev);
    TORCH_CHECK_TYPE(t->is_floating_point(), "vitfast.patch_embed: ", name, " must be floating point, got ", t->scalar_type());
  };
  check_param(bias, "bias");
  check_param(cls_token, "cls_token");
  check_param(pos_embed, "pos_embed");
  check_param(mean, "mean");
  check_param(std, "std");
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.D, "vitfast.patch_embed: bias must be [", s.D, "], got ",
                shape_str(*bias));
  }
  if (cls_token) {
    TORCH_CHECK_VALUE(cls_token->numel() == s.D && cls_token->size(-1) == s.D, "vitfast.patch_embed: cls_token must be [1, 1, ",
                s.D, "], got ", shape_str(*cls_token));
  }
  if (pos_embed) {
    const auto& pe = *pos_embed;
    bool ok = pe.dim() == 3 && pe.size(0) == 1 && pe.size(2) == s.D && (pe.size(1) == s.T || pe.size(1) == s.N);
    TORCH_CHECK_VALUE(ok, "vitfast.patch_embed: pos_embed must be [1, ", s.T, ", ", s.D, "]",
                (s.has_cls ? std::string(" (or [1, ") + std::to_string(s.N) + ", " + std::to_string(s.D) +
                                 "] for patches only)"
                           : std::string("")),
                " for ", s.Hp, "x", s.Wp, " patches, got ", shape_str(pe));
  }
  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(), "vitfast.patch_embed: mean and std must be given together (got ",
              mean ? "mean" : "std", " only)");
  if (mean) {
    TORCH_CHECK_VALUE(mean->numel() == s.C, "vitfast.patch_embed: mean must have one value per channel (", s.C, "), got ",
                shape_str(*mean));
    TORCH_CHECK_VALUE(std->numel() == s.C, "vitfast.patch_embed: std must have one value per channel (", s.C, "), got ",
                shape_str(*std));
  }
  return s;
}

std::pair<at::Tensor, at::Tensor> channel_affine(
    int64_t C, bool is_uint8, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
    const at::Device& device) {
  auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor scale = at::full({C}, is_uint8 ? 1.0 / 255.0 : 1.0, opts);
  at::Tensor shift = at::zeros({C}, opts);
  if (mean) {
    auto m = mean->reshape({C}).to(at::kDouble);
    auto sd = std->reshape({C}).to(at::kDouble);
    scale = scale / sd;
    shift = -m / sd;
  }
  return {scale, shift};
}

void apply_cls_pos(at::Tensor& out, const PatchEmbedShape& s, const std::optional<at::Tensor>& cls_token,
                   const std::optional<at::Tensor>& pos_embed) {
  const int64_t off = s.has_cls ? 1 : 0;
  if (s.has_cls) {
    out.select(1, 0).copy_(cls_token->reshape({1, s.D}).expand({s.B, s.D}));
  }
  if (pos_embed) {
    auto pe = pos_embed->to(out.scalar_type());
    if (pe.size(1) == s.T) {
      out.add_(pe);
    } else {  // patches only (timm's no_embed_class)
      out.narrow(1, off, s.N).add_(pe);
    }
  }
}

}  // namespace vitfast
