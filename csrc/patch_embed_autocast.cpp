// Autocast kernels for vitfast::patch_embed (CPU and CUDA).
//
// Without them, an op called under torch.autocast reaches the backend kernel with autocast
// still on, so the ATen ops inside the kernel get autocast and mix dtypes. As the eager chain
// under autocast (a conv, then cat and add): the GEMM runs in the autocast dtype (weight and bias
// are cast to it), while the class token and positions keep their dtype and the tokens come out
// in the type promotion of the GEMM's dtype with theirs (float32 parameters: float32 tokens, the
// residual stream timm's ViTs carry under autocast). Then the op is redispatched below autocast.
// As ATen's autocast (cached_cast), float64 tensors are never cast: a float64 weight keeps its
// GEMM in float64 and gives float64 tokens, as the eager chain's float64 conv does.
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
  // floating tensors other than float64 to the autocast dtype (float64 is left, as cached_cast leaves it)
  auto cast = [dtype](const at::Tensor& t) {
    return t.is_floating_point() && t.scalar_type() != at::kDouble ? t.to(dtype) : t;
  };
  auto cast_opt = [&cast](const OptTensor& t) -> OptTensor { return t ? OptTensor(cast(*t)) : t; };
  const at::Tensor w = cast(weight);
  if (!out_dtype.has_value() && w.is_floating_point()) {
    // the conv's dtype (the cast weight's: the autocast dtype, or float64), promoted by cat and add
    at::ScalarType ot = w.scalar_type();
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
  // patches are passed on unchanged. The Python wrapper gives them only for CPU images, made by
  // vitfast::patch_embed_patches (which has no autocast kernel) from the weight before this cast,
  // in the CPU kernels' compute dtype: float32, float64 for a float64 weight. The cast keeps that
  // dtype (a float64 weight is not cast; any other float weight computes in float32 on the CPU),
  // so they are what the op expects for the cast weight. On CUDA the patch matrix is in the
  // weight's own dtype, which the cast changes (but for float64): the wrapper never passes one
  // there, and a direct call with one made from the uncast weight is refused by the op's check
  // naming `patches`.
  return op.call(images, w, cast_opt(bias), cls_token, pos_embed, mean, std, patches, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, AutocastCPU, m) { m.impl("patch_embed", &patch_embed_autocast<c10::DeviceType::CPU>); }
TORCH_LIBRARY_IMPL(vitfast, AutocastCUDA, m) { m.impl("patch_embed", &patch_embed_autocast<c10::DeviceType::CUDA>); }

}  // namespace vitfast
