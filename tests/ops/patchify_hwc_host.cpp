// Runs the per-thread work of the channels_last patchify/unpatchify CUDA kernels on the CPU
// (csrc/cuda/patchify_hwc.h, shared with csrc/cuda/patch_embed.cu) over every item of small
// images, as the kernels' grid does, and compares with the patch matrix (and the image gradient)
// built directly from the definition. Also checks what the kernels rely on for their wide
// accesses: each item's image run starts at a multiple of its access width and each matrix run at
// a multiple of G elements, and every element is written exactly once.
//
// Built and run by tests/ops/test_patchify_hwc.py: g++ -std=c++17 -I csrc/cuda this file.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "patchify_hwc.h"

using vitfast::hwc::access_bytes;
using vitfast::hwc::Item;

static int failures = 0;
static int cases = 0;

#define EXPECT(cond, ...)                     \
  do {                                        \
    if (!(cond)) {                            \
      if (failures++ < 20) {                  \
        std::printf("FAIL %s: ", #cond);      \
        std::printf(__VA_ARGS__);             \
        std::printf("\n");                    \
      }                                       \
      return;                                 \
    }                                         \
  } while (0)

template <typename in_t, typename mat_t, int G, int C>
void run_case(int B, int Hp, int Wp, int p, int off, int pad, std::mt19937& rng) {
  ++cases;
  using acc_t = float;
  const int H = Hp * p, W = Wp * p, K = C * p * p, T = Hp * Wp + off;
  const int lb = access_bytes(G * C * static_cast<int>(sizeof(in_t)));
  // channels_last with a padded row (stride(H) > W * C) and a padded image, both kept multiples
  // of the access width, as the host check in patch_embed.cu requires
  const int64_t sH = static_cast<int64_t>(W) * C + pad * (lb / static_cast<int>(sizeof(in_t)));
  const int64_t sB = H * sH + (lb / static_cast<int>(sizeof(in_t)));
  std::vector<in_t> img(B * sB);
  std::uniform_int_distribution<int> pix(0, 255);
  for (auto& x : img) x = static_cast<in_t>(pix(rng));
  acc_t scale[C], shift[C];
  for (int c = 0; c < C; ++c) scale[c] = 0.25f * (c + 1), shift[c] = -1.0f + 0.5f * c;

  // forward: the kernel's items
  const float sentinel = -12345.0f;
  std::vector<mat_t> mat(static_cast<size_t>(B) * T * K, static_cast<mat_t>(sentinel));
  std::vector<int> writes(mat.size(), 0);
  const int chunks = W / G, per_image = H * chunks;
  for (int b = 0; b < B; ++b) {
    for (int e = 0; e < per_image; ++e) {
      const Item it = vitfast::hwc::item(e, chunks, G, C, p, Wp, K, off, sH);
      EXPECT((it.src * static_cast<int64_t>(sizeof(in_t))) % lb == 0, "item %d src %lld lb %d", e, (long long)it.src, lb);
      in_t x[G * C];
      for (int s = 0; s < G * C; s += lb / static_cast<int>(sizeof(in_t)))  // the kernel's chunked loads
        std::memcpy(&x[s], &img[b * sB + it.src + s], lb);
      mat_t y[C][G];
      vitfast::hwc::deinterleave<acc_t, in_t, mat_t, G, C>(x, scale, shift, y);
      for (int c = 0; c < C; ++c) {
        const int64_t d = static_cast<int64_t>(b) * T * K + it.dst + static_cast<int64_t>(c) * p * p;
        EXPECT(d % G == 0, "item %d channel %d: matrix offset %lld not a multiple of G %d", e, c, (long long)d, G);
        for (int k = 0; k < G; ++k) mat[d + k] = y[c][k], writes[d + k]++;
      }
    }
  }
  // the definition: row off + hp * Wp + wp, column (c, i, j) <- pixel (hp * p + i, wp * p + j, c)
  for (int b = 0; b < B; ++b)
    for (int hp = 0; hp < Hp; ++hp)
      for (int wp = 0; wp < Wp; ++wp)
        for (int c = 0; c < C; ++c)
          for (int i = 0; i < p; ++i)
            for (int j = 0; j < p; ++j) {
              const size_t at = (static_cast<size_t>(b) * T + off + hp * Wp + wp) * K + (c * p + i) * p + j;
              const in_t px = img[b * sB + (hp * p + i) * sH + static_cast<int64_t>(wp * p + j) * C + c];
              const mat_t want = static_cast<mat_t>(static_cast<acc_t>(px) * scale[c] + shift[c]);
              EXPECT(writes[at] == 1, "b %d patch (%d, %d) c %d i %d j %d written %d times", b, hp, wp, c, i, j,
                     writes[at]);
              EXPECT(mat[at] == want, "b %d patch (%d, %d) c %d i %d j %d: %g != %g", b, hp, wp, c, i, j,
                     static_cast<double>(mat[at]), static_cast<double>(want));
            }
  for (int b = 0; b < B; ++b)  // class rows: never written by the items (the kernel zeroes them apart)
    for (int k = 0; k < off * K; ++k) EXPECT(writes[static_cast<size_t>(b) * T * K + k] == 0, "class row written");

  // backward: the matrix gradient back into a channels_last image gradient
  std::vector<mat_t> dmat(mat.size());
  for (auto& x : dmat) x = static_cast<mat_t>(pix(rng));  // non-negative: unsigned image types too
  std::vector<in_t> gimg(img.size(), static_cast<in_t>(0));
  std::vector<int> gwrites(img.size(), 0);
  for (int b = 0; b < B; ++b) {
    for (int e = 0; e < per_image; ++e) {
      const Item it = vitfast::hwc::item(e, chunks, G, C, p, Wp, K, off, sH);
      mat_t y[C][G];
      for (int c = 0; c < C; ++c)
        std::memcpy(y[c], &dmat[static_cast<int64_t>(b) * T * K + it.dst + static_cast<int64_t>(c) * p * p],
                    sizeof(y[c]));
      in_t x[G * C];
      vitfast::hwc::interleave<acc_t, mat_t, in_t, G, C>(y, scale, x);
      for (int k = 0; k < G * C; ++k) gimg[b * sB + it.src + k] = x[k], gwrites[b * sB + it.src + k]++;
    }
  }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int w = 0; w < W; ++w)
        for (int c = 0; c < C; ++c) {
          const int64_t at = b * sB + h * sH + static_cast<int64_t>(w) * C + c;
          const int hp = h / p, i = h % p, wp = w / p, j = w % p;
          const mat_t g = dmat[(static_cast<size_t>(b) * T + off + hp * Wp + wp) * K + (c * p + i) * p + j];
          const in_t want = static_cast<in_t>(static_cast<acc_t>(g) * scale[c]);
          EXPECT(gwrites[at] == 1, "grad pixel (%d, %d, %d, %d) written %d times", b, h, w, c, gwrites[at]);
          EXPECT(gimg[at] == want, "grad pixel (%d, %d, %d, %d): %g != %g", b, h, w, c, static_cast<double>(gimg[at]),
                 static_cast<double>(want));
        }
}

template <typename in_t, typename mat_t, int G, int C>
void sweep(std::mt19937& rng) {
  for (int p : {4, 8, 14, 16, 32}) {
    if (p % G) continue;  // the kernels' condition (host: p % G == 0)
    for (int off : {0, 1})
      for (int pad : {0, 1})
        for (auto [Hp, Wp] : {std::pair{1, 1}, std::pair{2, 3}, std::pair{3, 2}}) run_case<in_t, mat_t, G, C>(2, Hp, Wp, p, off, pad, rng);
  }
}

int main() {
  std::mt19937 rng(1234);
  // G = 16 / sizeof(matrix element): 8 for bf16/fp16, 4 for fp32 (here float stands in for the
  // 16-bit types: the index math depends on G, C and the image element size only)
  sweep<uint8_t, float, 8, 3>(rng);
  sweep<uint8_t, float, 8, 4>(rng);
  sweep<uint8_t, float, 4, 3>(rng);
  sweep<uint8_t, float, 4, 4>(rng);
  sweep<float, float, 8, 3>(rng);
  sweep<float, float, 4, 3>(rng);
  sweep<float, float, 4, 4>(rng);
  sweep<uint16_t, float, 8, 3>(rng);  // a 2-byte image element (bf16/fp16 images)
  sweep<uint16_t, float, 8, 4>(rng);
  if (failures) {
    std::printf("%d failures in %d cases\n", failures, cases);
    return 1;
  }
  std::printf("ok %d cases\n", cases);
  return 0;
}
