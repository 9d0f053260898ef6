#pragma once
// The per-thread work of the channels_last patchify / unpatchify kernels (patch_embed.cu),
// free of CUDA and ATen so that a host program can run it too (tests/ops/test_patchify_hwc.py
// compiles tests/ops/patchify_hwc_host.cpp with g++ against this header: the index math and the
// (de)interleaving are checked on the CPU, where no CUDA kernel runs).
//
// channels_last images (stride(C) == 1, stride(W) == C): an image row is contiguous over (w, c),
// while a patch-matrix row is (c, i, j)-ordered, so the channels must be de-interleaved. One item
// is G consecutive pixels of one image row (G = 16 / sizeof(mat_t): one 16-byte run of the matrix
// per channel), i.e. G * C contiguous image elements read with wide loads, and C runs of G
// contiguous matrix elements (one per channel, p * p elements apart) written with 16-byte stores.
// Registers only: no shared-memory staging, hence no bank conflicts (the tile kernel's de-
// interleaving stores into shared memory conflicted). Needs p % G == 0, so a run never straddles
// a patch.
#include <cstdint>

#if defined(__CUDACC__)
#define VITFAST_HD __host__ __device__ __forceinline__
#else
#define VITFAST_HD inline
#endif

namespace vitfast {
namespace hwc {

// Where item e (of one image) lives: src = its first element in the image (relative to the
// image, channels_last), dst = its channel-0 run in the patch matrix (relative to the image's
// first matrix row); channel c's run is at dst + c * p * p. `chunks` = W / G items per row.
struct Item {
  int64_t src, dst;
};

VITFAST_HD Item item(int e, int chunks, int G, int C, int p, int Wp, int K, int64_t off, int64_t sH) {
  const int h = e / chunks, w0 = (e - h * chunks) * G;
  const int hp = h / p, i = h - hp * p, wp = w0 / p, j = w0 - wp * p;
  return {static_cast<int64_t>(h) * sH + static_cast<int64_t>(w0) * C,
          (off + static_cast<int64_t>(hp) * Wp + wp) * K + static_cast<int64_t>(i) * p + j};
}

// Largest power of two, at most 16, dividing n: the width of the accesses to a run of n bytes
// that starts at a multiple of n (host checks keep the base pointer and strides aligned to it).
constexpr int access_bytes(int n) { return n % 16 == 0 ? 16 : n % 8 == 0 ? 8 : n % 4 == 0 ? 4 : n % 2 == 0 ? 2 : 1; }

// x: G pixels x C channels as read (interleaved); y[c]: the channel's G normalised values.
template <typename acc_t, typename in_t, typename out_t, int G, int C>
VITFAST_HD void deinterleave(const in_t (&x)[G * C], const acc_t (&scale)[C], const acc_t (&shift)[C],
                             out_t (&y)[C][G]) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int k = 0; k < G; ++k) y[c][k] = static_cast<out_t>(static_cast<acc_t>(x[k * C + c]) * scale[c] + shift[c]);
  }
}

// The backward: y[c] (the channel's G gradient values, as read) scaled and interleaved again.
template <typename acc_t, typename in_t, typename out_t, int G, int C>
VITFAST_HD void interleave(const in_t (&y)[C][G], const acc_t (&scale)[C], out_t (&x)[G * C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int k = 0; k < G; ++k) x[k * C + c] = static_cast<out_t>(static_cast<acc_t>(y[c][k]) * scale[c]);
  }
}

}  // namespace hwc
}  // namespace vitfast
