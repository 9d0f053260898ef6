// CPU implementation of vitfast::patch_embed and vitfast::patch_embed_backward.
//
// The GEMM runs one of two ways (cpu_strategy below), both in float32 (float64 for float64
// weights), rounded once to the weight's dtype:
//
// "gemm" (forward): one pass over the image (any layout, uint8 or float) builds the patch
// matrix [B*T, K] with the normalisation applied on load (zero rows where class tokens sit),
// one pass fills the token buffer with bias + positional embedding (class token + pos[0] in
// the class rows), and one GEMM (addmm with beta = 1: MKL's sgemm) adds the patch tokens onto
// it. A given `patches` (patch_embed_patches, which the autograd path keeps for the backward,
// as a Linear keeps its input) replaces the first pass.
// "conv" (forward): one pass writes the normalised image in channels_last (none for float32
// images without mean/std), oneDNN's convolution (stride p) gives the patch tokens already
// as [B, N, D] rows, and one pass writes the tokens: patch row + bias + pos, class rows.
//
// Backward: with G = grad_out [B*T, D] and X the normalised patch matrix with a zero row
// where each class token sits, grad_weight = G^T X ("gemm"; oneDNN's convolution backward
// over the normalised image for "conv", G's patch rows transposed to NCHW by one tiled pass that
// also sums grad_out over the batch), grad_images = unpatchify(G W) * scale, grad_bias/cls/pos
// are sums of grad_out over the batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "patch_embed.h"

namespace vitfast {

namespace {

// The x86 vendor string ("GenuineIntel", "AuthenticAMD", ...), empty elsewhere.
std::string cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return "";
  char v[13];
  std::memcpy(v, &ebx, 4);
  std::memcpy(v + 4, &edx, 4);
  std::memcpy(v + 8, &ecx, 4);
  v[12] = '\0';
  return v;
#else
  return "";
#endif
}

}  // namespace

// Which GEMM the float32 CPU path uses. VITFAST_CPU_PATCH_EMBED=gemm|conv forces one (read at
// every call); auto (the default) takes oneDNN's convolution on x86 CPUs that are not Intel's,
// MKL's sgemm elsewhere. Measured (benchmarks/results/2026-12-01_cpu_patch_embed*.json, ViT-S/B/L,
// float32, 2 threads): on an Intel Xeon the patch-matrix GEMM beat every conv2d chain by 1.2-1.4x;
// on an AMD EPYC (Zen 4, AVX-512) MKL's sgemm ran these shapes at ~60% of oneDNN's convolution
// (MKL takes its generic code paths on CPUs that are not Intel's), so there the conv chains won
// by 1.4-1.7x. Other architectures keep the GEMM until something is measured there.
const char* cpu_strategy() {
  const char* env = std::getenv("VITFAST_CPU_PATCH_EMBED");
  if (env != nullptr && std::strcmp(env, "gemm") == 0) return "gemm";
  if (env != nullptr && std::strcmp(env, "conv") == 0) return "conv";
  static const bool conv = [] {
    const std::string v = cpu_vendor();
    return !v.empty() && v != "GenuineIntel" && at::hasMKLDNN();
  }();
  return conv && at::globalContext().userEnabledMkldnn() ? "conv" : "gemm";
}

namespace {

bool uses_conv(at::ScalarType compute) { return compute == at::kFloat && std::strcmp(cpu_strategy(), "conv") == 0; }

// The rows of the patch matrix one (b, hp, c, i) image-row segment maps to.
struct PatchGeom {
  int64_t C, p, Hp, Wp, K;
  int64_t R, off;  // rows per image in the patch matrix and the row of patch 0
};

struct ImageStrides {
  int64_t b, c, h, w;
};

ImageStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename acc_t>
void scale_shift(const double* mean, const double* std, double base, int64_t c, acc_t& scale, acc_t& shift) {
  if (mean != nullptr) {
    scale = static_cast<acc_t>(base / std[c]);
    shift = static_cast<acc_t>(-mean[c] / std[c]);
  } else {
    scale = static_cast<acc_t>(base);
    shift = acc_t(0);
  }
}

// patches[b*R + off + hp*Wp + wp, c*p*p + i*p + j] = images[b, c, hp*p + i, wp*p + j] * scale[c] + shift[c]
template <typename in_t, typename acc_t>
void patchify_cpu(const in_t* img, ImageStrides st, int64_t B, const PatchGeom& g, const double* mean,
                  const double* std, double base, acc_t* patches) {
  const int64_t p = g.p, pp = p * p, Wp = g.Wp;
  const int64_t segments = B * g.Hp * g.C * p;  // one (b, hp, c, i) image row segment each
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Wp * p));
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = s % p, c = (s / p) % g.C, hp = (s / (p * g.C)) % g.Hp, b = s / (p * g.C * g.Hp);
      acc_t scale, shift;
      scale_shift(mean, std, base, c, scale, shift);
      const in_t* src = img + b * st.b + c * st.c + (hp * p + i) * st.h;
      acc_t* dst = patches + (b * g.R + g.off + hp * Wp) * g.K + c * pp + i * p;
      for (int64_t wp = 0; wp < Wp; ++wp) {
        const in_t* srow = src + wp * p * st.w;
        acc_t* drow = dst + wp * g.K;
        if (st.w == 1) {
          for (int64_t j = 0; j < p; ++j) drow[j] = static_cast<acc_t>(srow[j]) * scale + shift;
        } else {
          for (int64_t j = 0; j < p; ++j) drow[j] = static_cast<acc_t>(srow[j * st.w]) * scale + shift;
        }
      }
    }
  });
  if (g.off > 0) {  // the class-token rows: zero, so that G^T X skips them
    for (int64_t b = 0; b < B; ++b) std::fill_n(patches + b * g.R * g.K, g.K, acc_t(0));
  }
}

// grad_images[b, c, h, w] = dpatches[b*R + off + patch(h, w), col(c, h, w)] * scale[c]
template <typename out_t, typename acc_t>
void unpatchify_cpu(const acc_t* dpatches, int64_t B, const PatchGeom& g, const double* std, double base,
                    out_t* gimg, ImageStrides st) {
  const int64_t p = g.p, pp = p * p, Wp = g.Wp;
  const int64_t segments = B * g.Hp * g.C * p;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Wp * p));
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = s % p, c = (s / p) % g.C, hp = (s / (p * g.C)) % g.Hp, b = s / (p * g.C * g.Hp);
      const acc_t scale = static_cast<acc_t>(std != nullptr ? base / std[c] : base);
      out_t* dst = gimg + b * st.b + c * st.c + (hp * p + i) * st.h;
      const acc_t* src = dpatches + (b * g.R + g.off + hp * Wp) * g.K + c * pp + i * p;
      for (int64_t wp = 0; wp < Wp; ++wp) {
        out_t* drow = dst + wp * p * st.w;
        const acc_t* srow = src + wp * g.K;
        for (int64_t j = 0; j < p; ++j) drow[j * st.w] = static_cast<out_t>(srow[j] * scale);
      }
    }
  });
}

// out[b, t, :] = (t is the class token) ? cls + pos[0] : tok[b, t - off] + bias + pos[t - pos_off],
// any term absent counting as zero (a row of zeros, so the inner loop has no branch). Without
// `tok` ("gemm"): the buffer the GEMM then adds the patch tokens to (beta = 1), so that it writes
// finished tokens in one pass. With `tok` ("conv": the convolution's [B, N, D] rows): the finished
// tokens, in out_t.
template <typename acc_t, typename out_t>
void tokens_cpu(const acc_t* tok, const acc_t* bias, const acc_t* cls, const acc_t* pos, int64_t pos_off,
                const PatchEmbedShape& s, out_t* out) {
  const int64_t D = s.D, off = s.off();
  const std::vector<acc_t> zeros(D, acc_t(0));
  const acc_t* zero = zeros.data();
  at::parallel_for(0, s.B * s.T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % s.T;
      out_t* o = out + r * D;
      const acc_t* pe = (pos != nullptr && t >= pos_off) ? pos + (t - pos_off) * D : zero;
      const acc_t* first = t < off ? cls : bias;
      first = first != nullptr ? first : zero;
      const acc_t* x = (tok != nullptr && t >= off) ? tok + ((r / s.T) * s.N + t - off) * D : zero;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(x[d] + first[d] + pe[d]);
    }
  });
}

// The normalised image for oneDNN's convolution, float32 in memory format `fmt`:
// x[b, c, h, w] = images[b, c, h, w] * scale[c] + shift[c]. Float32 images without mean/std are
// only made `fmt`-contiguous (no copy when they are already).
#if defined(__SSE__)
template <typename in_t>
inline __m128 load4(const in_t* p) {
  if constexpr (std::is_same_v<in_t, float>) {
    return _mm_loadu_ps(p);
  } else {
    return _mm_setr_ps(static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
                       static_cast<float>(p[3]));
  }
}
#endif

// One image row of three channels (each contiguous along w) to channels_last: out[w * 3 + c] =
// src_c[w] * scale[c] + shift[c]. Four pixels at a time, the channels interleaved in registers
// (the strided scalar stores of the general loop made this pass slower than torch.compile's
// normalisation at 384 x 384).
template <typename in_t>
void normalize_row_rgb_cl(const in_t* r, const in_t* g, const in_t* b, int64_t W, const float* scale,
                          const float* shift, float* out) {
  int64_t w = 0;
#if defined(__SSE__)
  const __m128 sr = _mm_set1_ps(scale[0]), sg = _mm_set1_ps(scale[1]), sb = _mm_set1_ps(scale[2]);
  const __m128 hr = _mm_set1_ps(shift[0]), hg = _mm_set1_ps(shift[1]), hb = _mm_set1_ps(shift[2]);
  for (; w + 4 <= W; w += 4) {
    const __m128 vr = _mm_add_ps(_mm_mul_ps(load4(r + w), sr), hr);
    const __m128 vg = _mm_add_ps(_mm_mul_ps(load4(g + w), sg), hg);
    const __m128 vb = _mm_add_ps(_mm_mul_ps(load4(b + w), sb), hb);
    const __m128 rg_lo = _mm_unpacklo_ps(vr, vg);  // r0 g0 r1 g1
    const __m128 rg_hi = _mm_unpackhi_ps(vr, vg);  // r2 g2 r3 g3
    const __m128 b0r1 = _mm_shuffle_ps(vb, rg_lo, _MM_SHUFFLE(2, 2, 0, 0));  // b0 b0 r1 r1
    const __m128 g1b1 = _mm_shuffle_ps(rg_lo, vb, _MM_SHUFFLE(1, 1, 3, 3));  // g1 g1 b1 b1
    const __m128 b2r3 = _mm_shuffle_ps(vb, rg_hi, _MM_SHUFFLE(2, 2, 2, 2));  // b2 b2 r3 r3
    const __m128 g3b3 = _mm_shuffle_ps(rg_hi, vb, _MM_SHUFFLE(3, 3, 3, 3));  // g3 g3 b3 b3
    float* o = out + w * 3;
    _mm_storeu_ps(o, _mm_shuffle_ps(rg_lo, b0r1, _MM_SHUFFLE(2, 0, 1, 0)));     // r0 g0 b0 r1
    _mm_storeu_ps(o + 4, _mm_shuffle_ps(g1b1, rg_hi, _MM_SHUFFLE(1, 0, 2, 0)));  // g1 b1 r2 g2
    _mm_storeu_ps(o + 8, _mm_shuffle_ps(b2r3, g3b3, _MM_SHUFFLE(2, 0, 2, 0)));   // b2 r3 g3 b3
  }
#endif
  for (; w < W; ++w) {
    out[w * 3 + 0] = static_cast<float>(r[w]) * scale[0] + shift[0];
    out[w * 3 + 1] = static_cast<float>(g[w]) * scale[1] + shift[1];
    out[w * 3 + 2] = static_cast<float>(b[w]) * scale[2] + shift[2];
  }
}

template <typename in_t>
void normalize_image(const in_t* img, ImageStrides st, const PatchEmbedShape& s, const float* scale,
                     const float* shift, float* out, ImageStrides os) {
  const int64_t C = s.C, H = s.H, W = s.W;
  at::parallel_for(0, s.B * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * C)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % H, b = r / H;
      if (C == 3 && st.w == 1 && os.c == 1 && os.w == 3) {  // RGB rows to channels_last
        const in_t* src = img + b * st.b + h * st.h;
        normalize_row_rgb_cl(src, src + st.c, src + 2 * st.c, W, scale, shift, out + b * os.b + h * os.h);
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const in_t* src = img + b * st.b + c * st.c + h * st.h;
        float* o = out + b * os.b + c * os.c + h * os.h;
        const float sc = scale[c], sh = shift[c];
        if (st.w == 1 && os.w == 1) {  // NCHW to NCHW: a loop the compiler vectorises
          for (int64_t w = 0; w < W; ++w) o[w] = static_cast<float>(src[w]) * sc + sh;
        } else {
          for (int64_t w = 0; w < W; ++w) o[w * os.w] = static_cast<float>(src[w * st.w]) * sc + sh;
        }
      }
    }
  });
}

// channels_last for the forward (oneDNN then writes the tokens as [B, N, D] rows, which the
// tokens pass reads in order); NCHW for the backward: oneDNN's weight gradient from NCHW images
// and an NCHW grad took 4.7-5.7 ms at ViT-S/B/L shapes on the AMD EPYC measured, from
// channels_last 4.8-6.7 ms (slower at ViT-B/16 and L/14, as fast at S/16 384).
at::Tensor normalized_image(const at::Tensor& images, const PatchEmbedShape& s, const at::Tensor& mean,
                            const at::Tensor& std, at::MemoryFormat fmt) {
  if (images.scalar_type() == at::kFloat && !mean.defined() && !std.defined()) {
    return images.contiguous(fmt);
  }
  at::Tensor x = at::empty({s.B, s.C, s.H, s.W}, images.options().dtype(at::kFloat).memory_format(fmt));
  if (x.numel() == 0) return x;
  const double base = image_base_scale(images.scalar_type() == at::kByte);
  const double* m = mean.defined() ? mean.const_data_ptr<double>() : nullptr;
  const double* sd = std.defined() ? std.const_data_ptr<double>() : nullptr;
  std::vector<float> scale(s.C), shift(s.C);
  for (int64_t c = 0; c < s.C; ++c) scale_shift(m, sd, base, c, scale[c], shift[c]);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "vitfast_normalize_image", [&] {
    normalize_image<scalar_t>(images.const_data_ptr<scalar_t>(), strides_of(images), s, scale.data(), shift.data(),
                              x.mutable_data_ptr<float>(), strides_of(x));
  });
  return x;
}

// The patch tokens [B, N, D] (as [B, D, Hp, Wp] in channels_last) by oneDNN's convolution.
at::Tensor conv_patch_tokens(const at::Tensor& xn, const at::Tensor& w4, const PatchEmbedShape& s) {
  at::Tensor y = at::conv2d(xn, w4, {}, {s.p, s.p});
  return y.contiguous(at::MemoryFormat::ChannelsLast);  // what oneDNN gives for channels_last input: no copy
}

// One pass over grad_out [B, T, D] for the conv strategy's weight gradient: the patch rows
// transposed into gy [B, D, Hp, Wp] (contiguous NCHW, what oneDNN's convolution backward takes
// with NCHW images: handed the permuted view instead, it makes that copy itself with ATen's
// strided copy, 1.1-1.3 ms for 4 MB at ViT-L/14 B 4 on the AMD EPYC measured; this pass alone,
// sums included, 0.35 ms on one thread with grad_out in cache),
// and, where `sum` is given, the batch sum S[t, d] = sum_b grad_out[b, t, d] of the patch rows
// t >= off that grad_bias/pos are made of (no second pass over grad_out). One task per tile of kTile tokens x kTile
// channels; the batch loops inside it, one image's rows at a time (rows of several images at
// once alias in L1 when D * 4 bytes is a multiple of 4 KB), its sums kept in a local tile and
// added in batch order.
constexpr int64_t kTile = 32;

// dst[d * ldd + n] = src[n * lds + d] and acc[n][d] += src[n * lds + d], n < nn, d < nd.
void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t nn, int64_t nd,
                    float (*acc)[kTile]) {
  int64_t n = 0;
#if defined(__SSE__)
  const int64_t d4 = nd & ~int64_t(3);
  for (; n + 4 <= nn; n += 4) {
    for (int64_t d = 0; d < d4; d += 4) {
      __m128 r0 = _mm_loadu_ps(src + (n + 0) * lds + d);
      __m128 r1 = _mm_loadu_ps(src + (n + 1) * lds + d);
      __m128 r2 = _mm_loadu_ps(src + (n + 2) * lds + d);
      __m128 r3 = _mm_loadu_ps(src + (n + 3) * lds + d);
      if (acc != nullptr) {
        _mm_storeu_ps(&acc[n + 0][d], _mm_add_ps(_mm_loadu_ps(&acc[n + 0][d]), r0));
        _mm_storeu_ps(&acc[n + 1][d], _mm_add_ps(_mm_loadu_ps(&acc[n + 1][d]), r1));
        _mm_storeu_ps(&acc[n + 2][d], _mm_add_ps(_mm_loadu_ps(&acc[n + 2][d]), r2));
        _mm_storeu_ps(&acc[n + 3][d], _mm_add_ps(_mm_loadu_ps(&acc[n + 3][d]), r3));
      }
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(dst + (d + 0) * ldd + n, r0);
      _mm_storeu_ps(dst + (d + 1) * ldd + n, r1);
      _mm_storeu_ps(dst + (d + 2) * ldd + n, r2);
      _mm_storeu_ps(dst + (d + 3) * ldd + n, r3);
    }
    for (int64_t d = d4; d < nd; ++d) {
      for (int64_t k = n; k < n + 4; ++k) {
        const float v = src[k * lds + d];
        dst[d * ldd + k] = v;
        if (acc != nullptr) acc[k][d] += v;
      }
    }
  }
#endif
  for (; n < nn; ++n) {
    for (int64_t d = 0; d < nd; ++d) {
      const float v = src[n * lds + d];
      dst[d * ldd + n] = v;
      if (acc != nullptr) acc[n][d] += v;
    }
  }
}

void transpose_patch_grad(const float* go, const PatchEmbedShape& s, float* gy, float* sum) {
  const int64_t N = s.N, D = s.D, T = s.T, off = s.off();
  const int64_t dt = (D + kTile - 1) / kTile;
  at::parallel_for(0, ((N + kTile - 1) / kTile) * dt, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kTile][kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = (task / dt) * kTile, d0 = (task % dt) * kTile;
      const int64_t nn = std::min(kTile, N - n0), nd = std::min(kTile, D - d0);
      if (sum != nullptr) std::memset(acc, 0, sizeof(acc));
      for (int64_t b = 0; b < s.B; ++b) {
        transpose_tile(go + (b * T + off + n0) * D + d0, D, gy + (b * D + d0) * N + n0, N, nn, nd,
                       sum != nullptr ? acc : nullptr);
      }
      if (sum != nullptr) {
        for (int64_t n = 0; n < nn; ++n) std::memcpy(sum + (off + n0 + n) * D + d0, acc[n], nd * sizeof(float));
      }
    }
  });
}

at::ScalarType compute_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// Normalised patch matrix [B*R, K] in the compute type (R = N, or T with zero class rows).
at::Tensor patches_cpu(const at::Tensor& images, const PatchEmbedShape& s, at::ScalarType ct, const at::Tensor& mean,
                       const at::Tensor& std, bool class_rows) {
  const int64_t R = class_rows ? s.T : s.N;
  at::Tensor P = at::empty({s.B * R, s.K}, images.options().dtype(ct));
  if (P.numel() == 0) return P;
  const PatchGeom g{s.C, s.p, s.Hp, s.Wp, s.K, R, class_rows ? s.off() : 0};
  const double base = image_base_scale(images.scalar_type() == at::kByte);
  const double* m = mean.defined() ? mean.const_data_ptr<double>() : nullptr;
  const double* sd = std.defined() ? std.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(ct, "vitfast_patchify_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "vitfast_patchify", [&] {
      patchify_cpu<scalar_t, acc_t>(images.const_data_ptr<scalar_t>(), strides_of(images), s.B, g, m, sd, base,
                                    P.mutable_data_ptr<acc_t>());
    });
  });
  return P;
}

at::Tensor patch_embed_patches_cpu(const at::Tensor& images, const at::Tensor& weight, bool has_cls,
                                   const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  const PatchEmbedShape s = check_images_weight(images, weight, mean, std, has_cls, "vitfast.patch_embed_patches");
  return patches_cpu(images, s, compute_type(weight), channel_stat(mean), channel_stat(std), /*class_rows=*/true);
}

// The patch matrix X [B*T, K] (zero class rows) and the GEMM onto a prefilled token buffer:
// out = prefill + X W^T, written once by the GEMM. No [B*N, D] intermediate and no epilogue
// pass over the tokens.
at::Tensor patch_embed_cpu(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                           const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                           const std::optional<at::Tensor>& patches, std::optional<at::ScalarType> out_dtype) {
  const PatchEmbedShape s = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std);
  const auto ct = compute_type(weight);
  check_patches(patches, s, ct, images.device(), "vitfast.patch_embed");
  at::Tensor out = at::empty({s.B, s.T, s.D}, weight.options().dtype(tokens_dtype(weight, out_dtype, "vitfast.patch_embed")));
  if (out.numel() == 0) return out;
  const auto as_ct = [&](const std::optional<at::Tensor>& t) {
    return t ? t->to(ct).contiguous() : at::Tensor();
  };
  const at::Tensor b = as_ct(bias), cls = as_ct(cls_token), pos = as_ct(pos_embed);
  const int64_t pos_off = (pos.defined() && pos.size(1) != s.T) ? s.off() : 0;
  if (!patches && uses_conv(ct) && s.N > 0) {
    const at::Tensor xn = normalized_image(images, s, channel_stat(mean), channel_stat(std),
                                           at::MemoryFormat::ChannelsLast);
    const at::Tensor y = conv_patch_tokens(xn, weight.to(ct).contiguous(), s);  // memory: [B, N, D]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "vitfast_patch_embed_tokens", [&] {
      tokens_cpu<float, scalar_t>(y.const_data_ptr<float>(), ptr_or_null<float>(b), ptr_or_null<float>(cls),
                                  ptr_or_null<float>(pos), pos_off, s, out.mutable_data_ptr<scalar_t>());
    });
    return out;
  }
  const at::Tensor X = patches ? *patches
                               : patches_cpu(images, s, ct, channel_stat(mean), channel_stat(std), /*class_rows=*/true);
  const at::Tensor w = weight.to(ct).contiguous().view({s.D, s.K});
  // float16/bfloat16 tokens: accumulate in float32, round once at the end
  at::Tensor acc = out.scalar_type() == ct ? out : at::empty({s.B, s.T, s.D}, weight.options().dtype(ct));
  at::Tensor acc2d = acc.view({s.B * s.T, s.D});
  if (b.defined() || cls.defined() || pos.defined()) {
    AT_DISPATCH_FLOATING_TYPES(ct, "vitfast_patch_embed_prefill", [&] {
      tokens_cpu<scalar_t, scalar_t>(nullptr, ptr_or_null<scalar_t>(b), ptr_or_null<scalar_t>(cls),
                                     ptr_or_null<scalar_t>(pos), pos_off, s, acc.mutable_data_ptr<scalar_t>());
    });
    acc2d.addmm_(X, w.t());
  } else {
    at::mm_out(acc2d, X, w.t());
  }
  if (!acc.is_same(out)) out.copy_(acc);
  return out;
}

using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>, std::optional<at::Tensor>>;

Grads patch_embed_backward_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                               bool has_cls, int64_t pos_tokens, std::array<bool, 5> output_mask,
                               const std::optional<at::Tensor>& patches) {
  const PatchEmbedShape s =
      check_patch_embed_backward_args(grad_out, images, weight, mean, std, has_cls, pos_tokens, output_mask);
  const auto ct = compute_type(weight);
  check_patches(patches, s, ct, images.device(), "vitfast.patch_embed_backward");
  const at::Tensor go = grad_out.to(ct).contiguous();  // [B, T, D]
  const at::Tensor G = go.view({s.B * s.T, s.D});
  const at::Tensor mean64 = channel_stat(mean), std64 = channel_stat(std);
  std::optional<at::Tensor> g_images, g_weight, g_bias, g_cls, g_pos;

  const bool want_sum = output_mask[2] || output_mask[3] || output_mask[4];
  at::Tensor S;  // [T, D]: grad_out summed over the batch, for grad_bias/cls/pos
  // (not for D = 0: oneDNN's convolution refuses a weight with no output channels)
  if (output_mask[1] && !patches && uses_conv(ct) && s.N > 0 && s.D > 0) {
    // the weight gradient of the convolution: G's patch rows as [B, D, Hp, Wp] (NCHW, made by
    // one pass that also sums over the batch) against the normalised image in NCHW
    const at::Tensor xn = normalized_image(images, s, mean64, std64, at::MemoryFormat::Contiguous);
    const at::Tensor gy = at::empty({s.B, s.D, s.Hp, s.Wp}, go.options());
    if (want_sum) S = at::empty({s.T, s.D}, go.options());
    transpose_patch_grad(go.const_data_ptr<float>(), s, gy.mutable_data_ptr<float>(),
                         want_sum ? S.mutable_data_ptr<float>() : nullptr);  // the conv strategy is float32
    if (want_sum && s.off() > 0) {  // the class rows
      at::Tensor class_rows = S.narrow(0, 0, s.off());
      at::sum_out(class_rows, go.narrow(1, 0, s.off()), 0);
    }
    const at::Tensor w4 = weight.to(ct).contiguous();
    const auto grads = at::convolution_backward(gy, xn, w4, std::nullopt, {s.p, s.p}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                                {false, true, false});
    g_weight = std::get<1>(grads).to(weight.scalar_type()).contiguous();
  } else if (output_mask[1]) {
    const at::Tensor X = patches ? *patches : patches_cpu(images, s, ct, mean64, std64, /*class_rows=*/true);
    g_weight = at::mm(G.t(), X).view({s.D, s.C, s.p, s.p}).to(weight.scalar_type());
  }
  if (output_mask[0]) {
    const at::Tensor w = weight.to(ct).contiguous().view({s.D, s.K});
    const at::Tensor dX = at::mm(G, w);  // [B*T, K]
    at::Tensor gi = at::empty_like(images);
    if (gi.numel() > 0) {
      const PatchGeom g{s.C, s.p, s.Hp, s.Wp, s.K, s.T, s.off()};
      const double base = image_base_scale(false);
      const double* sd = std64.defined() ? std64.const_data_ptr<double>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES(ct, "vitfast_unpatchify_acc", [&] {
        using acc_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "vitfast_unpatchify", [&] {
          unpatchify_cpu<scalar_t, acc_t>(dX.const_data_ptr<acc_t>(), s.B, g, sd, base,
                                          gi.mutable_data_ptr<scalar_t>(), strides_of(gi));
        });
      });
    }
    g_images = gi;
  }
  if (want_sum) {
    if (!S.defined()) S = go.sum(0);
    if (output_mask[2]) g_bias = S.narrow(0, s.off(), s.N).sum(0);
    if (output_mask[3]) g_cls = S.select(0, 0).clone();
    if (output_mask[4]) g_pos = S.narrow(0, s.T - pos_tokens, pos_tokens).unsqueeze(0).clone();
  }
  return {g_images, g_weight, g_bias, g_cls, g_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("patch_embed_backward", &patch_embed_backward_cpu);
  m.impl("patch_embed_patches", &patch_embed_patches_cpu);
}

}  // namespace vitfast
