#include <sstream>

#include "patch_embed.h"

namespace vitfast {

namespace {
std::string shape_str(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

PatchEmbedShape check_images_weight(const at::Tensor& images, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                                    bool has_cls, const char* op) {
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": images must be [B, C, H, W], got shape ", shape_str(images));
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be [D, C, p, p], got shape ", shape_str(weight));
  const auto it = images.scalar_type();
  TORCH_CHECK_TYPE(it == at::kByte || is_float(it), op, ": images must be uint8 or floating point, got ", it);
  TORCH_CHECK_TYPE(is_float(weight.scalar_type()), op, ": weight must be floating point, got ", weight.scalar_type());
  PatchEmbedShape s;
  s.B = images.size(0);
  s.C = images.size(1);
  s.H = images.size(2);
  s.W = images.size(3);
  s.D = weight.size(0);
  s.p = weight.size(3);
  TORCH_CHECK_VALUE(weight.size(2) == weight.size(3), op, ": weight must have a square kernel [D, C, p, p], got ",
                    shape_str(weight));
  TORCH_CHECK_VALUE(s.p >= 1, op, ": patch size (weight.shape[-1]) must be >= 1, got weight ", shape_str(weight));
  TORCH_CHECK_VALUE(s.C >= 1, op, ": images must have at least one channel, got ", shape_str(images));
  TORCH_CHECK_VALUE(weight.size(1) == s.C, op, ": images have ", s.C, " channels but weight expects ",
                    weight.size(1), " (weight shape ", shape_str(weight), ")");
  TORCH_CHECK_VALUE(s.H % s.p == 0 && s.W % s.p == 0, op, ": image size ", s.H, "x", s.W,
                    " is not divisible by the patch size ", s.p);
  s.Hp = s.H / s.p;
  s.Wp = s.W / s.p;
  s.N = s.Hp * s.Wp;
  s.K = s.C * s.p * s.p;
  s.has_cls = has_cls;
  s.T = s.N + (has_cls ? 1 : 0);
  const auto dev = images.device();
  TORCH_CHECK_VALUE(weight.device() == dev, op, ": weight is on ", weight.device(), " but images are on ", dev);
  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(), op, ": mean and std must be given together (",
                    mean ? "std" : "mean", " is missing)");
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&std, "std"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK_VALUE(v.device() == dev, op, ": ", name, " is on ", v.device(), " but images are on ", dev);
    TORCH_CHECK_TYPE(v.is_floating_point(), op, ": ", name, " must be floating point, got ", v.scalar_type());
    TORCH_CHECK_VALUE(v.numel() == s.C, op, ": ", name, " must have one value per channel (", s.C, "), got shape ",
                      shape_str(v));
  }
  return s;
}

PatchEmbedShape check_patch_embed_args(
    const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  const char* op = "vitfast.patch_embed";
  const PatchEmbedShape s = check_images_weight(images, weight, mean, std, cls_token.has_value(), op);
  const auto dev = images.device();
  for (const auto& [t, name] : {std::pair{&bias, "bias"}, std::pair{&cls_token, "cls_token"},
                                std::pair{&pos_embed, "pos_embed"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK_VALUE(v.device() == dev, op, ": ", name, " is on ", v.device(), " but images are on ", dev);
    TORCH_CHECK_TYPE(is_float(v.scalar_type()), op, ": ", name, " must be floating point, got ", v.scalar_type());
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.D, op, ": bias must be [", s.D, "], got ",
                      shape_str(*bias));
  }
  if (cls_token) {
    TORCH_CHECK_VALUE(cls_token->numel() == s.D && cls_token->dim() >= 1 && cls_token->size(-1) == s.D, op,
                      ": cls_token must be [1, 1, ", s.D, "], got ", shape_str(*cls_token));
  }
  if (pos_embed) {
    const auto& pe = *pos_embed;
    const bool ok = pe.dim() == 3 && pe.size(0) == 1 && pe.size(2) == s.D && (pe.size(1) == s.T || pe.size(1) == s.N);
    TORCH_CHECK_VALUE(ok, op, ": pos_embed must be [1, ", s.T, ", ", s.D, "]",
                      (s.has_cls ? " (or [1, " + std::to_string(s.N) + ", " + std::to_string(s.D) +
                                       "] for patches only)"
                                 : std::string("")),
                      " for ", s.Hp, "x", s.Wp, " patches, got ", shape_str(pe));
  }
  return s;
}

PatchEmbedShape check_patch_embed_backward_args(const at::Tensor& grad_out, const at::Tensor& images,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& mean,
                                                const std::optional<at::Tensor>& std, bool has_cls,
                                                int64_t pos_tokens, std::array<bool, 5> output_mask) {
  const char* op = "vitfast.patch_embed_backward";
  const PatchEmbedShape s = check_images_weight(images, weight, mean, std, has_cls, op);
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == s.B && grad_out.size(1) == s.T &&
                        grad_out.size(2) == s.D,
                    op, ": grad_out must be [", s.B, ", ", s.T, ", ", s.D, "], got ", shape_str(grad_out));
  TORCH_CHECK_VALUE(grad_out.device() == images.device(), op, ": grad_out is on ", grad_out.device(),
                    " but images are on ", images.device());
  TORCH_CHECK_TYPE(is_float(grad_out.scalar_type()), op, ": grad_out must be floating point, got ",
                   grad_out.scalar_type());
  TORCH_CHECK_VALUE(pos_tokens == 0 || pos_tokens == s.T || pos_tokens == s.N, op, ": pos_tokens must be 0, ", s.N,
                    " or ", s.T, ", got ", pos_tokens);
  TORCH_CHECK_VALUE(!output_mask[0] || images.is_floating_point(), op,
                    ": no gradient for uint8 images (output_mask[0] must be false)");
  TORCH_CHECK_VALUE(!output_mask[3] || has_cls, op, ": output_mask[3] (cls_token) needs has_cls");
  TORCH_CHECK_VALUE(!output_mask[4] || pos_tokens > 0, op, ": output_mask[4] (pos_embed) needs pos_tokens > 0");
  return s;
}

void check_patches(const std::optional<at::Tensor>& patches, const PatchEmbedShape& s, at::ScalarType dtype,
                   const at::Device& device, const char* op) {
  if (!patches.has_value()) return;
  const at::Tensor& P = *patches;
  TORCH_CHECK_VALUE(P.dim() == 2 && P.size(0) == s.B * s.T && P.size(1) == s.K, op, ": patches must be [",
                    s.B * s.T, ", ", s.K, "] (patch_embed_patches of these images), got ", shape_str(P));
  TORCH_CHECK_VALUE(P.device() == device, op, ": patches is on ", P.device(), " but images are on ", device);
  TORCH_CHECK_TYPE(P.scalar_type() == dtype, op, ": patches must be ", dtype, " (patch_embed_patches of these "
                   "images and weight), got ", P.scalar_type());
  TORCH_CHECK_VALUE(P.is_contiguous(), op, ": patches must be contiguous");
}

at::ScalarType tokens_dtype(const at::Tensor& weight, std::optional<at::ScalarType> out_dtype, const char* op) {
  if (!out_dtype.has_value()) return weight.scalar_type();
  TORCH_CHECK_TYPE(is_float(*out_dtype), op, ": out_dtype must be a floating point dtype, got ", *out_dtype);
  return *out_dtype;
}

at::Tensor channel_stat(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return t->reshape({-1}).to(at::kDouble).contiguous();
}

}  // namespace vitfast
