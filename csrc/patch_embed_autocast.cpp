// Autocast kernels for vitfast::patch_embed (CPU and CUDA).
//
// Without them, an op called under torch.autocast reaches the backend kernel with autocast
// still on, so the ATen ops inside the kernel get autocast and mix dtypes. As the eager chain
// under autocast (a conv, then cat and add): the GEMM runs in the autocast dtype (weight and bias
// are cast to it), while the class token and positions keep their dtype and the tokens come out
// in the type promotion of the autocast dtype with theirs (float32 parameters: float32 tokens, the
// residual stream timm's ViTs carry under autocast). Then the op is redispatched below autocast.
// Images are left as they are (the kernels read any float dtype or uint8 and convert on load),
// and mean/std keep their precision. An explicit out_dtype is kept.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace vitfast {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <c10::DeviceType device_type>
at::Tensor patch_embed_autocast(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                                const OptTensor& cls_token, const OptTensor& pos_embed, const OptTensor& mean,
                                const OptTensor& std, const OptTensor& patches,
                                std::optional<at::ScalarType> out_dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  auto cast = [dtype](const at::Tensor& t) { return t.is_floating_point() ? t.to(dtype) : t; };
  auto cast_opt = [&cast](const OptTensor& t) -> OptTensor { return t ? OptTensor(cast(*t)) : t; };
  if (!out_dtype.has_value()) {
    at::ScalarType ot = dtype;
    for (const OptTensor* t : {&cls_token, &pos_embed}) {
      if (*t && (*t)->is_floating_point()) ot = c10::promoteTypes(ot, (*t)->scalar_type());
    }
    out_dtype = ot;
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vitfast::patch_embed", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                         std::optional<at::ScalarType>)>();
  // patches: the op's compute dtype for the cast weight (patch_embed_patches under the same autocast)
  return op.call(images, cast(weight), cast_opt(bias), cls_token, pos_embed, mean, std, patches, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, AutocastCPU, m) { m.impl("patch_embed", &patch_embed_autocast<c10::DeviceType::CPU>); }
TORCH_LIBRARY_IMPL(vitfast, AutocastCUDA, m) { m.impl("patch_embed", &patch_embed_autocast<c10::DeviceType::CUDA>); }

}  // namespace vitfast
