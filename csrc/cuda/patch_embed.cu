// CUDA implementation of vitfast::patch_embed and vitfast::patch_embed_backward.
//
// Forward, three launches on the current stream:
//   1. prefill: the token buffer out [B, T, D] gets cls + pos[0] in each class row and
//      bias + pos in each patch row (skipped when there is neither bias nor pos);
//   2. patchify: the image is read once (16-byte loads where the layout allows, NCHW or
//      channels_last or any strides), normalised on load (x * scale[c] + shift[c], i.e.
//      (x/255 - mean)/std for uint8) and written as the patch matrix X [B*T, K] in the
//      weight's dtype, K = C*p*p in (c, i, j) order, with a zero row at each class position.
//      NCHW images in 16-byte chunks (p % (16 / element size) == 0, e.g. p 16 or 32) go
//      straight to global memory with 16-byte stores (patchify_rows_kernel), channels_last
//      3- and 4-channel images too, de-interleaved in registers (patchify_hwc_kernel); other
//      layouts stage tiles of the matrix in shared memory (patchify_tile_kernel);
//   3. GEMM: out.view(B*T, D) += X @ W^T, one cuBLAS call (at::addmm_, beta = 1, tensor
//      cores, fp32 accumulation) writing the finished tokens in place. The zero rows make
//      the class rows pass through unchanged (0 * W + cls), so the GEMM writes the whole
//      contiguous buffer and no transpose, cat or add pass follows.
//
// Why cuBLAS and not a hand-written mma/WMMA implicit GEMM reading the image in its
// prologue: on sm_90 cuBLAS runs wgmma/TMA kernels near the tensor-core peak, which an
// mma.sync kernel cannot reach, and a ViT patch embedding is a large, well-shaped GEMM
// (ViT-B/16, B 256: M = 50k, N = K = 768). The price is the patch matrix round trip
// (2 * B*T*K elements) and the prefill read back by the GEMM (B*T*D elements); both are
// plain streaming passes. (The strided-batched variant, writing C with a per-image stride
// so no zero rows are needed, would need at::cuda::blas::bgemm, which libtorch_cuda does
// not export, or linking cuBLAS ourselves; the zero rows cost 1/T of the GEMM.)
//
// Backward (same patch matrix, G = grad_out [B*T, D]): grad_weight = G^T X (the zero rows
// drop the class rows out of the sum), grad_images = unpatchify(G W) * scale[c],
// grad_bias / grad_cls / grad_pos = sums of grad_out over the batch (float32 accumulation).
//
// vitfast::patch_embed_patches is step 2 alone; a `patches` argument (its result) replaces step
// 2 in the forward and the weight gradient's patchify in the backward. The Python autograd path
// passes it on the CPU only: on CUDA re-making X is a cheap streaming pass and keeping it would
// cost B*T*K elements of activation memory.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../patch_embed.h"
#include "patchify_hwc.h"

namespace vitfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileBytes = 24 * 1024;     // patch-matrix rows staged per block
constexpr int64_t kMaxSmemBytes = 46 * 1024;  // under the 48 KiB a block gets without opt-in

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// 16 bytes of T, for one vector load or store.
template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// N contiguous values of T at dst/src (aligned to min(16, N * sizeof(T)) bytes, which the
// callers' host checks guarantee): 16-byte accesses when the run is at least that long, one
// narrower access otherwise. The values travel as raw bits (uint4, uint2, ...) so that the
// compiler emits one vector instruction per access instead of one per (class-typed) element.
// Raw bits of `bytes` bytes at p: one vector access for 16 (v4.b32) and 8 (v2.b32) bytes.
// The stores are written in PTX: built from packed registers, nvcc otherwise splits them into
// 32-bit stores even at 16-byte alignment (seen in the sm_90 SASS).
template <int Bytes>
__device__ __forceinline__ void store_bits(void* p, const void* x) {
  if constexpr (Bytes == 16) {
    unsigned w[4];
    memcpy(w, x, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "r"(w[0]),
                 "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else if constexpr (Bytes == 8) {
    unsigned w[2];
    memcpy(w, x, 8);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(__cvta_generic_to_global(p)), "r"(w[0]), "r"(w[1])
                 : "memory");
  } else if constexpr (Bytes == 4) {
    unsigned w;
    memcpy(&w, x, 4);
    *reinterpret_cast<unsigned*>(p) = w;
  } else if constexpr (Bytes == 2) {
    unsigned short w;
    memcpy(&w, x, 2);
    *reinterpret_cast<unsigned short*>(p) = w;
  } else {
    *reinterpret_cast<unsigned char*>(p) = *reinterpret_cast<const unsigned char*>(x);
  }
}

template <int Bytes>
__device__ __forceinline__ void load_bits(void* x, const void* p) {
  if constexpr (Bytes == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
    memcpy(x, w, 16);
  } else if constexpr (Bytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const unsigned w[2] = {v.x, v.y};
    memcpy(x, w, 8);
  } else if constexpr (Bytes == 4) {
    const unsigned w = *reinterpret_cast<const unsigned*>(p);
    memcpy(x, &w, 4);
  } else if constexpr (Bytes == 2) {
    const unsigned short w = *reinterpret_cast<const unsigned short*>(p);
    memcpy(x, &w, 2);
  } else {
    *reinterpret_cast<unsigned char*>(x) = *reinterpret_cast<const unsigned char*>(p);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_run(T* __restrict__ dst, const T (&x)[N]) {
  constexpr int bytes = N * sizeof(T) < 16 ? N * sizeof(T) : 16, per = bytes / sizeof(T);
#pragma unroll
  for (int s = 0; s < N / per; ++s) store_bits<bytes>(dst + s * per, &x[s * per]);
}

template <typename T, int N>
__device__ __forceinline__ void load_run(const T* __restrict__ src, T (&x)[N]) {
  constexpr int bytes = N * sizeof(T) < 16 ? N * sizeof(T) : 16, per = bytes / sizeof(T);
#pragma unroll
  for (int s = 0; s < N / per; ++s) load_bits<bytes>(&x[s * per], src + s * per);
}

enum Layout : int {
  kAnyStrides = 0,  // any strides: scalar accesses
  kRowsW = 1,       // stride(W) == 1 (NCHW): each (c, row) segment is contiguous
  kRowsCW = 2,      // stride(C) == 1, stride(W) == C (channels_last): each row segment is contiguous over (w, c)
};

// One block handles a tile: image rows hp*p .. hp*p+p-1, patches wp0 .. wp0+nw-1, i.e. nw
// consecutive rows of the patch matrix, staged in shared memory in the matrix's layout.
struct Tile {
  int64_t B, Hp, Wp;
  int C, p, K;             // K = C*p*p (checked to fit an int on the host)
  int64_t R, off;          // patch-matrix rows per image (T) and the row of patch 0 (1 with a class token)
  int64_t sB, sC, sH, sW;  // image strides in elements
  int nw, tiles_w;         // patches per tile, tiles per row of patches
  int layout;
  bool vec_img, vec_mat;  // 16-byte accesses to the image / the patch matrix are aligned
  int stats_offset;       // byte offset of scale/shift in shared memory
};

template <typename acc_t>
__device__ __forceinline__ void load_channel_affine(const Tile& g, const double* __restrict__ mean,
                                                    const double* __restrict__ stdv, double base, acc_t* scale,
                                                    acc_t* shift) {
  for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
    scale[c] = static_cast<acc_t>(stdv != nullptr ? base / stdv[c] : base);
    shift[c] = static_cast<acc_t>(mean != nullptr ? -mean[c] / stdv[c] : 0.0);
  }
}

// Position in the tile (rows of K) of pixel (c, i, w) of the tile's image rows, w < nw*p.
__device__ __forceinline__ int tile_index(const Tile& g, int c, int i, int w) {
  return (w / g.p) * g.K + c * g.p * g.p + i * g.p + (w % g.p);
}

// The common case, NCHW images (stride(W) == 1) whose rows split into 16-byte chunks that
// never straddle a patch (p % V == 0, strides and pointer aligned; host): no shared-memory
// staging at all. Each thread reads V pixels of one image row with one 16-byte load; they are
// one patch's row segment, i.e. V contiguous elements of the patch matrix, which the thread
// writes with 16-byte stores (uint8 -> bf16: 16 pixels in, 32 contiguous bytes out). Reads
// are fully coalesced; each write fills whole 32-byte sectors. The channel's scale/shift sit in
// registers for the thread's V outputs. Per-image indices are 32-bit (host: C*H*W/V fits an
// int); the batch runs over blockIdx.y. Class rows (the first g.off rows of each image) get zeros.
template <typename in_t, typename mat_t>
__global__ void __launch_bounds__(kThreads)
    patchify_rows_kernel(const in_t* __restrict__ img, mat_t* __restrict__ mat, const Tile g, const int H,
                         const double* __restrict__ mean, const double* __restrict__ stdv, const double base) {
  using acc_t = typename Acc<mat_t>::type;
  constexpr int V = vec16<in_t>();
  extern __shared__ __align__(16) unsigned char vitfast_smem[];
  acc_t* scale = reinterpret_cast<acc_t*>(vitfast_smem);
  acc_t* shift = scale + g.C;
  load_channel_affine(g, mean, stdv, base, scale, shift);
  __syncthreads();

  const int p = g.p, K = g.K, Wp = static_cast<int>(g.Wp);
  const int chunks = Wp * p / V;  // 16-byte chunks per image row
  const int per_image = g.C * H * chunks;
  const int zero_elems = static_cast<int>(g.off) * K / vec16<mat_t>();  // class rows, in 16-byte units
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    const in_t* src_b = img + b * g.sB;
    mat_t* mat_b = mat + b * g.R * K;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < per_image; e += gridDim.x * blockDim.x) {
      const int ch = e % chunks, row = e / chunks, h = row % H, c = row / H;
      const int w = ch * V, hp = h / p, i = h - hp * p, wp = w / p, j = w - wp * p;
      const Vec16<in_t> v = *reinterpret_cast<const Vec16<in_t>*>(src_b + c * g.sC + h * g.sH + w);
      const acc_t sc = scale[c], sh = shift[c];
      mat_t x[V];
#pragma unroll
      for (int k = 0; k < V; ++k) x[k] = static_cast<mat_t>(static_cast<acc_t>(v.v[k]) * sc + sh);
      store_run<mat_t, V>(mat_b + static_cast<int64_t>(g.off + hp * Wp + wp) * K + (c * p + i) * p + j, x);
    }
    if (blockIdx.x == 0) {
      Vec16<mat_t> z;
#pragma unroll
      for (int k = 0; k < vec16<mat_t>(); ++k) z.v[k] = static_cast<mat_t>(acc_t(0));
      for (int e = threadIdx.x; e < zero_elems; e += blockDim.x) reinterpret_cast<Vec16<mat_t>*>(mat_b)[e] = z;
    }
  }
}

// The backward of patchify_rows_kernel, same conditions on grad_images: each thread reads V
// contiguous patch-matrix elements (one patch row segment; vector loads) and writes V pixels of
// one image row with one 16-byte store. No shared-memory staging.
template <typename mat_t, typename img_t>
__global__ void __launch_bounds__(kThreads)
    unpatchify_rows_kernel(const mat_t* __restrict__ dmat, img_t* __restrict__ gimg, const Tile g, const int H,
                           const double* __restrict__ stdv, const double base) {
  using acc_t = typename Acc<mat_t>::type;
  constexpr int V = vec16<img_t>();
  extern __shared__ __align__(16) unsigned char vitfast_smem[];
  acc_t* scale = reinterpret_cast<acc_t*>(vitfast_smem);
  acc_t* shift = scale + g.C;
  load_channel_affine(g, nullptr, stdv, base, scale, shift);
  __syncthreads();

  const int p = g.p, K = g.K, Wp = static_cast<int>(g.Wp);
  const int chunks = Wp * p / V;
  const int per_image = g.C * H * chunks;
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    const mat_t* mat_b = dmat + b * g.R * K;
    img_t* dst_b = gimg + b * g.sB;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < per_image; e += gridDim.x * blockDim.x) {
      const int ch = e % chunks, row = e / chunks, h = row % H, c = row / H;
      const int w = ch * V, hp = h / p, i = h - hp * p, wp = w / p, j = w - wp * p;
      mat_t x[V];
      load_run<mat_t, V>(mat_b + static_cast<int64_t>(g.off + hp * Wp + wp) * K + (c * p + i) * p + j, x);
      const acc_t sc = scale[c];
      img_t y[V];
#pragma unroll
      for (int k = 0; k < V; ++k) y[k] = static_cast<img_t>(static_cast<acc_t>(x[k]) * sc);
      store_run<img_t, V>(dst_b + c * g.sC + h * g.sH + w, y);
    }
  }
}

// N values of T at src/dst in accesses of Bytes bytes each (Bytes >= sizeof(T); the host checks
// keep the run Bytes-aligned): the channels_last runs, G pixels x C channels, are 24 or 48 bytes.
template <int Bytes, typename T, int N>
__device__ __forceinline__ void load_chunks(const T* __restrict__ src, T (&x)[N]) {
  constexpr int per = Bytes / sizeof(T);
#pragma unroll
  for (int s = 0; s < N / per; ++s) load_bits<Bytes>(&x[s * per], src + s * per);
}

template <int Bytes, typename T, int N>
__device__ __forceinline__ void store_chunks(T* __restrict__ dst, const T (&x)[N]) {
  constexpr int per = Bytes / sizeof(T);
#pragma unroll
  for (int s = 0; s < N / per; ++s) store_bits<Bytes>(dst + s * per, &x[s * per]);
}

// channels_last images with C = 3 or 4 (patchify_hwc.h): each thread de-interleaves G pixels
// (G * C contiguous elements, wide loads) into C runs of G matrix elements (one 16-byte store
// each), in registers; scale/shift are read from shared memory into registers once. Grid and
// batch loop as patchify_rows_kernel; class rows get zeros.
template <typename in_t, typename mat_t, int C>
__global__ void __launch_bounds__(kThreads)
    patchify_hwc_kernel(const in_t* __restrict__ img, mat_t* __restrict__ mat, const Tile g, const int H,
                        const double* __restrict__ mean, const double* __restrict__ stdv, const double base) {
  using acc_t = typename Acc<mat_t>::type;
  constexpr int G = vec16<mat_t>();
  constexpr int LB = hwc::access_bytes(G * C * sizeof(in_t));
  extern __shared__ __align__(16) unsigned char vitfast_smem[];
  acc_t* scale = reinterpret_cast<acc_t*>(vitfast_smem);
  acc_t* shift = scale + C;
  load_channel_affine(g, mean, stdv, base, scale, shift);
  __syncthreads();
  acc_t sc[C], sh[C];
#pragma unroll
  for (int c = 0; c < C; ++c) sc[c] = scale[c], sh[c] = shift[c];

  const int p = g.p, K = g.K, Wp = static_cast<int>(g.Wp);
  const int chunks = Wp * p / G, per_image = H * chunks;
  const int zero_elems = static_cast<int>(g.off) * K / vec16<mat_t>();
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    const in_t* src_b = img + b * g.sB;
    mat_t* mat_b = mat + b * g.R * K;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < per_image; e += gridDim.x * blockDim.x) {
      const hwc::Item it = hwc::item(e, chunks, G, C, p, Wp, K, g.off, g.sH);
      in_t x[G * C];
      load_chunks<LB>(src_b + it.src, x);
      mat_t y[C][G];
      hwc::deinterleave<acc_t, in_t, mat_t, G, C>(x, sc, sh, y);
#pragma unroll
      for (int c = 0; c < C; ++c) store_run<mat_t, G>(mat_b + it.dst + c * p * p, y[c]);
    }
    if (blockIdx.x == 0) {
      Vec16<mat_t> z;
#pragma unroll
      for (int k = 0; k < vec16<mat_t>(); ++k) z.v[k] = static_cast<mat_t>(acc_t(0));
      for (int e = threadIdx.x; e < zero_elems; e += blockDim.x) reinterpret_cast<Vec16<mat_t>*>(mat_b)[e] = z;
    }
  }
}

// The backward of patchify_hwc_kernel: C 16-byte loads of the matrix, scaled and interleaved
// in registers, G * C contiguous gradient elements stored with wide stores.
template <typename mat_t, typename img_t, int C>
__global__ void __launch_bounds__(kThreads)
    unpatchify_hwc_kernel(const mat_t* __restrict__ dmat, img_t* __restrict__ gimg, const Tile g, const int H,
                          const double* __restrict__ stdv, const double base) {
  using acc_t = typename Acc<mat_t>::type;
  constexpr int G = vec16<mat_t>();
  constexpr int LB = hwc::access_bytes(G * C * sizeof(img_t));
  extern __shared__ __align__(16) unsigned char vitfast_smem[];
  acc_t* scale = reinterpret_cast<acc_t*>(vitfast_smem);
  acc_t* shift = scale + C;
  load_channel_affine(g, nullptr, stdv, base, scale, shift);
  __syncthreads();
  acc_t sc[C];
#pragma unroll
  for (int c = 0; c < C; ++c) sc[c] = scale[c];

  const int p = g.p, K = g.K, Wp = static_cast<int>(g.Wp);
  const int chunks = Wp * p / G, per_image = H * chunks;
  for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y) {
    const mat_t* mat_b = dmat + b * g.R * K;
    img_t* dst_b = gimg + b * g.sB;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < per_image; e += gridDim.x * blockDim.x) {
      const hwc::Item it = hwc::item(e, chunks, G, C, p, Wp, K, g.off, g.sH);
      mat_t y[C][G];
#pragma unroll
      for (int c = 0; c < C; ++c) load_run<mat_t, G>(mat_b + it.dst + c * p * p, y[c]);
      img_t x[G * C];
      hwc::interleave<acc_t, mat_t, img_t, G, C>(y, sc, x);
      store_chunks<LB>(dst_b + it.src, x);
    }
  }
}

// Any other layout (channels_last, strides that are not 16-byte multiples, patches that are
// not whole 16-byte chunks): the tile of patch-matrix rows is staged in shared memory.
template <typename in_t, typename mat_t>
__global__ void __launch_bounds__(kThreads)
    patchify_tile_kernel(const in_t* __restrict__ img, mat_t* __restrict__ mat, const Tile g,
                         const double* __restrict__ mean, const double* __restrict__ stdv, const double base) {
  using acc_t = typename Acc<mat_t>::type;
  extern __shared__ __align__(16) unsigned char vitfast_smem[];
  mat_t* tile = reinterpret_cast<mat_t*>(vitfast_smem);
  acc_t* scale = reinterpret_cast<acc_t*>(vitfast_smem + g.stats_offset);
  acc_t* shift = scale + g.C;
  load_channel_affine(g, mean, stdv, base, scale, shift);
  __syncthreads();

  const int p = g.p, C = g.C, K = g.K;
  const int64_t tasks = g.B * g.Hp * g.tiles_w;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int tw = static_cast<int>(task % g.tiles_w);
    const int64_t bh = task / g.tiles_w, hp = bh % g.Hp, b = bh / g.Hp;
    const int wp0 = tw * g.nw;
    const int nw = min(g.nw, static_cast<int>(g.Wp - wp0));
    const int L = nw * p;  // pixels per image row in this tile
    const in_t* src = img + b * g.sB + hp * p * g.sH + static_cast<int64_t>(wp0) * p * g.sW;

    if (g.layout == kRowsW) {
      if (g.vec_img) {
        constexpr int V = vec16<in_t>();
        const int chunks = L / V;  // p % V == 0 (host), so a chunk stays inside one patch
        for (int e = threadIdx.x; e < C * p * chunks; e += blockDim.x) {
          const int ch = e % chunks, ci = e / chunks, i = ci % p, c = ci / p, w = ch * V;
          const Vec16<in_t> v = *reinterpret_cast<const Vec16<in_t>*>(src + c * g.sC + i * g.sH + w);
          mat_t* t = tile + tile_index(g, c, i, w);
          const acc_t sc = scale[c], sh = shift[c];  // registers, not re-read after each store
#pragma unroll
          for (int k = 0; k < V; ++k) t[k] = static_cast<mat_t>(static_cast<acc_t>(v.v[k]) * sc + sh);
        }
      } else {
        for (int e = threadIdx.x; e < C * p * L; e += blockDim.x) {
          const int w = e % L, ci = e / L, i = ci % p, c = ci / p;
          const acc_t x = static_cast<acc_t>(src[c * g.sC + i * g.sH + w]);
          tile[tile_index(g, c, i, w)] = static_cast<mat_t>(x * scale[c] + shift[c]);
        }
      }
    } else if (g.layout == kRowsCW) {
      const int LC = L * C;
      if (g.vec_img) {
        constexpr int V = vec16<in_t>();
        const int chunks = LC / V;  // (p*C) % V == 0 (host)
        for (int e = threadIdx.x; e < p * chunks; e += blockDim.x) {
          const int ch = e % chunks, i = e / chunks, q0 = ch * V;
          const Vec16<in_t> v = *reinterpret_cast<const Vec16<in_t>*>(src + i * g.sH + q0);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const int q = q0 + k, w = q / C, c = q % C;
            tile[tile_index(g, c, i, w)] = static_cast<mat_t>(static_cast<acc_t>(v.v[k]) * scale[c] + shift[c]);
          }
        }
      } else {
        for (int e = threadIdx.x; e < p * LC; e += blockDim.x) {
          const int q = e % LC, i = e / LC, w = q / C, c = q % C;
          const acc_t x = static_cast<acc_t>(src[i * g.sH + q]);
          tile[tile_index(g, c, i, w)] = static_cast<mat_t>(x * scale[c] + shift[c]);
        }
      }
    } else {
      for (int e = threadIdx.x; e < C * p * L; e += blockDim.x) {
        const int w = e % L, ci = e / L, i = ci % p, c = ci / p;
        const acc_t x = static_cast<acc_t>(src[c * g.sC + i * g.sH + w * g.sW]);
        tile[tile_index(g, c, i, w)] = static_cast<mat_t>(x * scale[c] + shift[c]);
      }
    }
    __syncthreads();

    // The tile is nw consecutive, contiguous rows of the patch matrix.
    mat_t* dst = mat + (b * g.R + g.off + hp * g.Wp + wp0) * K;
    const int n = nw * K;
    if (g.vec_mat) {  // K % V == 0 and mat 16-byte aligned (host)
      constexpr int V = vec16<mat_t>();
      for (int e = threadIdx.x; e < n / V; e += blockDim.x) {
        reinterpret_cast<Vec16<mat_t>*>(dst)[e] = reinterpret_cast<const Vec16<mat_t>*>(tile)[e];
      }
    } else {
      for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = tile[e];
    }
    if (g.off > 0 && hp == 0 && tw == 0) {  // this image's class row: zero
      mat_t* zrow = mat + b * g.R * K;
      for (int e = threadIdx.x; e < K; e += blockDim.x) zrow[e] = static_cast<mat_t>(acc_t(0));
    }
    __syncthreads();  // the tile is reused by the next task
  }
}

template <typename mat_t, typename img_t>
__global__ void __launch_bounds__(kThreads)
    unpatchify_tile_kernel(const mat_t* __restrict__ dmat, img_t* __restrict__ gimg, const Tile g,
                           const double* __restrict__ stdv, const double base) {
  using acc_t = typename Acc<mat_t>::type;
  extern __shared__ __align__(16) unsigned char vitfast_smem[];
  mat_t* tile = reinterpret_cast<mat_t*>(vitfast_smem);
  acc_t* scale = reinterpret_cast<acc_t*>(vitfast_smem + g.stats_offset);
  acc_t* shift = scale + g.C;
  load_channel_affine(g, nullptr, stdv, base, scale, shift);
  __syncthreads();

  const int p = g.p, C = g.C, K = g.K;
  const int64_t tasks = g.B * g.Hp * g.tiles_w;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int tw = static_cast<int>(task % g.tiles_w);
    const int64_t bh = task / g.tiles_w, hp = bh % g.Hp, b = bh / g.Hp;
    const int wp0 = tw * g.nw;
    const int nw = min(g.nw, static_cast<int>(g.Wp - wp0));
    const int L = nw * p;

    const mat_t* srcm = dmat + (b * g.R + g.off + hp * g.Wp + wp0) * K;
    const int n = nw * K;
    if (g.vec_mat) {
      constexpr int V = vec16<mat_t>();
      for (int e = threadIdx.x; e < n / V; e += blockDim.x) {
        reinterpret_cast<Vec16<mat_t>*>(tile)[e] = reinterpret_cast<const Vec16<mat_t>*>(srcm)[e];
      }
    } else {
      for (int e = threadIdx.x; e < n; e += blockDim.x) tile[e] = srcm[e];
    }
    __syncthreads();

    img_t* dst = gimg + b * g.sB + hp * p * g.sH + static_cast<int64_t>(wp0) * p * g.sW;
    if (g.layout == kRowsW) {
      if (g.vec_img) {
        constexpr int V = vec16<img_t>();
        const int chunks = L / V;
        for (int e = threadIdx.x; e < C * p * chunks; e += blockDim.x) {
          const int ch = e % chunks, ci = e / chunks, i = ci % p, c = ci / p, w = ch * V;
          const mat_t* t = tile + tile_index(g, c, i, w);
          Vec16<img_t> v;
#pragma unroll
          for (int k = 0; k < V; ++k) v.v[k] = static_cast<img_t>(static_cast<acc_t>(t[k]) * scale[c]);
          *reinterpret_cast<Vec16<img_t>*>(dst + c * g.sC + i * g.sH + w) = v;
        }
      } else {
        for (int e = threadIdx.x; e < C * p * L; e += blockDim.x) {
          const int w = e % L, ci = e / L, i = ci % p, c = ci / p;
          dst[c * g.sC + i * g.sH + w] = static_cast<img_t>(static_cast<acc_t>(tile[tile_index(g, c, i, w)]) * scale[c]);
        }
      }
    } else if (g.layout == kRowsCW) {
      const int LC = L * C;
      if (g.vec_img) {
        constexpr int V = vec16<img_t>();
        const int chunks = LC / V;
        for (int e = threadIdx.x; e < p * chunks; e += blockDim.x) {
          const int ch = e % chunks, i = e / chunks, q0 = ch * V;
          Vec16<img_t> v;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const int q = q0 + k, w = q / C, c = q % C;
            v.v[k] = static_cast<img_t>(static_cast<acc_t>(tile[tile_index(g, c, i, w)]) * scale[c]);
          }
          *reinterpret_cast<Vec16<img_t>*>(dst + i * g.sH + q0) = v;
        }
      } else {
        for (int e = threadIdx.x; e < p * LC; e += blockDim.x) {
          const int q = e % LC, i = e / LC, w = q / C, c = q % C;
          dst[i * g.sH + q] = static_cast<img_t>(static_cast<acc_t>(tile[tile_index(g, c, i, w)]) * scale[c]);
        }
      }
    } else {
      for (int e = threadIdx.x; e < C * p * L; e += blockDim.x) {
        const int w = e % L, ci = e / L, i = ci % p, c = ci / p;
        dst[c * g.sC + i * g.sH + w * g.sW] =
            static_cast<img_t>(static_cast<acc_t>(tile[tile_index(g, c, i, w)]) * scale[c]);
      }
    }
    __syncthreads();
  }
}

// Fallbacks for patches too large to stage in shared memory: one thread per element.
template <typename in_t, typename mat_t>
__global__ void patchify_elementwise_kernel(const in_t* __restrict__ img, mat_t* __restrict__ mat, const Tile g,
                                            const double* __restrict__ mean, const double* __restrict__ stdv,
                                            const double base) {
  using acc_t = typename Acc<mat_t>::type;
  const int64_t K = g.K, p = g.p, total = g.B * g.R * K;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = idx % K, row = idx / K, b = row / g.R, r = row % g.R;
    if (r < g.off) {
      mat[idx] = static_cast<mat_t>(acc_t(0));
      continue;
    }
    const int64_t n = r - g.off, hp = n / g.Wp, wp = n % g.Wp;
    const int64_t c = col / (p * p), i = (col / p) % p, j = col % p;
    const double x = static_cast<double>(img[b * g.sB + c * g.sC + (hp * p + i) * g.sH + (wp * p + j) * g.sW]);
    const double y = stdv != nullptr ? (x * base - mean[c]) / stdv[c] : x * base;
    mat[idx] = static_cast<mat_t>(static_cast<acc_t>(y));
  }
}

template <typename mat_t, typename img_t>
__global__ void unpatchify_elementwise_kernel(const mat_t* __restrict__ dmat, img_t* __restrict__ gimg, const Tile g,
                                              int64_t H, int64_t W, const double* __restrict__ stdv,
                                              const double base) {
  using acc_t = typename Acc<mat_t>::type;
  const int64_t K = g.K, p = g.p, C = g.C, total = g.B * C * H * W;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = idx % W, h = (idx / W) % H, c = (idx / (W * H)) % C, b = idx / (W * H * C);
    const int64_t row = b * g.R + g.off + (h / p) * g.Wp + w / p, col = c * p * p + (h % p) * p + (w % p);
    const acc_t scale = static_cast<acc_t>(stdv != nullptr ? base / stdv[c] : base);
    gimg[b * g.sB + c * g.sC + h * g.sH + w * g.sW] = static_cast<img_t>(static_cast<acc_t>(dmat[row * K + col]) * scale);
  }
}

// out[b, t, :] for t < rows: cls + pos[0] in the class row, bias + pos[t - pos_off] in patch rows.
// VEC (host: D % V == 0, every pointer 16-byte aligned): each thread reads bias/cls/pos with
// 16-byte loads and writes 16 bytes. index_t is int when the whole buffer fits one (the usual
// case), so the divisions are 32-bit.
template <typename out_t, typename index_t, bool VEC>
__global__ void prefill_kernel(out_t* __restrict__ out, const out_t* __restrict__ bias, const out_t* __restrict__ cls,
                               const out_t* __restrict__ pos, index_t pos_off, index_t B, index_t T, index_t D,
                               index_t off, index_t rows) {
  using acc_t = typename Acc<out_t>::type;
  constexpr int V = VEC ? vec16<out_t>() : 1;
  const index_t dv = D / V, total = B * rows * dv;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = e / dv, d0 = (e - r * dv) * V, b = r / rows, t = r - b * rows;
    const out_t* first = t < off ? cls + d0 : (bias != nullptr ? bias + d0 : nullptr);
    const out_t* pe = (pos != nullptr && t >= pos_off) ? pos + (t - pos_off) * D + d0 : nullptr;
    acc_t x[V];
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = acc_t(0);
    if (first != nullptr) {
      out_t f[V];
      load_run<out_t, V>(first, f);
#pragma unroll
      for (int k = 0; k < V; ++k) x[k] += static_cast<acc_t>(f[k]);
    }
    if (pe != nullptr) {
      out_t q[V];
      load_run<out_t, V>(pe, q);
#pragma unroll
      for (int k = 0; k < V; ++k) x[k] += static_cast<acc_t>(q[k]);
    }
    out_t y[V];
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = static_cast<out_t>(x[k]);
    store_run<out_t, V>(out + (b * T + t) * D + d0, y);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

int64_t grid_for(int64_t work_items, int64_t per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(work_items, sms * per_sm));
}

// Tiling and vectorisation for an image (or its gradient) `img` and the patch matrix `mat`.
// Returns false when one patch-matrix row does not fit in shared memory (use the fallback).
bool make_tile(const PatchEmbedShape& s, const at::Tensor& img, const at::Tensor& mat, Tile& g, int64_t& smem) {
  g.B = s.B;
  g.Hp = s.Hp;
  g.Wp = s.Wp;
  g.C = static_cast<int>(s.C);
  g.p = static_cast<int>(s.p);
  g.K = static_cast<int>(s.K);
  g.R = s.T;
  g.off = s.off();
  g.sB = img.stride(0);
  g.sC = img.stride(1);
  g.sH = img.stride(2);
  g.sW = img.stride(3);
  g.layout = g.sW == 1 ? kRowsW : (g.sC == 1 && g.sW == s.C ? kRowsCW : kAnyStrides);
  const int64_t vi = 16 / img.element_size(), vm = 16 / mat.element_size();
  const bool strides_ok = g.sB % vi == 0 && g.sH % vi == 0 && aligned16(img.const_data_ptr());
  g.vec_img = (g.layout == kRowsW && strides_ok && g.sC % vi == 0 && s.p % vi == 0) ||
              (g.layout == kRowsCW && strides_ok && (s.p * s.C) % vi == 0);
  g.vec_mat = s.K % vm == 0 && aligned16(mat.const_data_ptr());
  const int64_t row_bytes = s.K * mat.element_size();
  const int64_t acc_bytes = mat.scalar_type() == at::kDouble ? 8 : 4;
  if (s.N == 0 || row_bytes + 16 + 2 * s.C * acc_bytes > kMaxSmemBytes) return false;
  const int64_t nw_max = std::max<int64_t>(1, std::min<int64_t>(s.Wp, kTileBytes / row_bytes));
  g.tiles_w = static_cast<int>((s.Wp + nw_max - 1) / nw_max);
  g.nw = static_cast<int>((s.Wp + g.tiles_w - 1) / g.tiles_w);  // balanced tiles
  g.stats_offset = static_cast<int>((g.nw * row_bytes + 15) / 16 * 16);
  smem = g.stats_offset + 2 * s.C * acc_bytes;
  return smem <= kMaxSmemBytes;
}

// Whether the direct (unstaged) kernels serve this image and matrix: NCHW rows in 16-byte
// chunks that stay inside a patch, a 16-byte-aligned matrix, and 32-bit per-image indices.
// Sets the launch grid (x over one image's chunks, y over the batch) and shared memory.
bool rows_launch(const PatchEmbedShape& s, const Tile& g, int64_t img_elem, int64_t acc_bytes, dim3& grid,
                 int64_t& smem) {
  if (s.N == 0 || g.layout != kRowsW || !g.vec_img || !g.vec_mat) return false;
  const int64_t per_image = s.C * s.H * (s.W / (16 / img_elem));
  const int64_t gx = (per_image + kThreads - 1) / kThreads;
  smem = 2 * s.C * acc_bytes;
  if (smem > kMaxSmemBytes || per_image + gx * kThreads >= INT_MAX) return false;
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(s.B, 65535)));
  return true;
}

// The channels_last kernels (patchify_hwc.h) take these element types (fp64 goes to the tile kernels).
template <typename img_t, typename mat_t>
constexpr bool hwc_types() {
  return !std::is_same_v<img_t, double> && !std::is_same_v<mat_t, double>;
}

// The channels_last kernels for C = 3 or 4 (g.C; hwc_launch checked it). Templates, so that
// `if constexpr` drops the fp64 instantiations (the dispatch lambdas are not templates).
template <typename in_t, typename mat_t>
void launch_hwc(dim3 grid, int64_t smem, cudaStream_t stream, const in_t* src, mat_t* dst, const Tile& g, int H,
                const double* mean, const double* stdv, double base) {
  if constexpr (hwc_types<in_t, mat_t>()) {
    const auto kernel = g.C == 3 ? patchify_hwc_kernel<in_t, mat_t, 3> : patchify_hwc_kernel<in_t, mat_t, 4>;
    kernel<<<grid, kThreads, smem, stream>>>(src, dst, g, H, mean, stdv, base);
  }
}

template <typename mat_t, typename img_t>
void launch_hwc_backward(dim3 grid, int64_t smem, cudaStream_t stream, const mat_t* src, img_t* dst, const Tile& g,
                         int H, const double* stdv, double base) {
  if constexpr (hwc_types<img_t, mat_t>()) {
    const auto kernel = g.C == 3 ? unpatchify_hwc_kernel<mat_t, img_t, 3> : unpatchify_hwc_kernel<mat_t, img_t, 4>;
    kernel<<<grid, kThreads, smem, stream>>>(src, dst, g, H, stdv, base);
  }
}

// Whether the channels_last kernels serve this image (or gradient) and matrix: stride(C) == 1,
// stride(W) == C with C = 3 or 4, p a multiple of the 16-byte run G, a 16-byte-aligned matrix, the
// image's pointer and strides aligned to the width of its accesses, 32-bit per-image indices.
bool hwc_launch(const PatchEmbedShape& s, const Tile& g, const at::Tensor& img, int64_t mat_elem, int64_t acc_bytes,
                dim3& grid, int64_t& smem) {
  if (s.N == 0 || g.layout != kRowsCW || !g.vec_mat || (s.C != 3 && s.C != 4)) return false;
  const int64_t G = 16 / mat_elem, el = img.element_size();
  if (s.p % G != 0) return false;
  const int64_t lb = hwc::access_bytes(static_cast<int>(G * s.C * el));
  if (reinterpret_cast<std::uintptr_t>(img.const_data_ptr()) % lb != 0 || (g.sB * el) % lb != 0 ||
      (g.sH * el) % lb != 0)
    return false;
  const int64_t per_image = s.H * (s.W / G);
  const int64_t gx = (per_image + kThreads - 1) / kThreads;
  smem = 2 * s.C * acc_bytes;
  if (per_image + gx * kThreads >= INT_MAX) return false;
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(s.B, 65535)));
  return true;
}

// Writes the normalised patch matrix mat [B*T, K] (zero class rows) from images.
void launch_patchify(const at::Tensor& images, at::Tensor& mat, const PatchEmbedShape& s, const at::Tensor& mean,
                     const at::Tensor& stdv) {
  if (mat.numel() == 0) return;
  Tile g{};  // value-initialised: the fallback kernels get no indeterminate fields
  int64_t smem = 0;
  const bool tiled = make_tile(s, images, mat, g, smem);
  const double base = image_base_scale(images.scalar_type() == at::kByte);
  const double* m = mean.defined() ? mean.const_data_ptr<double>() : nullptr;
  const double* sd = stdv.defined() ? stdv.const_data_ptr<double>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "vitfast_patchify_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mat.scalar_type(), "vitfast_patchify_out", [&] {
      const in_t* src = images.const_data_ptr<in_t>();
      scalar_t* dst = mat.mutable_data_ptr<scalar_t>();
      dim3 grid;
      int64_t rows_smem = 0;
      const int64_t acc_bytes = sizeof(typename Acc<scalar_t>::type);
      if (rows_launch(s, g, sizeof(in_t), acc_bytes, grid, rows_smem)) {
        patchify_rows_kernel<in_t, scalar_t>
            <<<grid, kThreads, rows_smem, stream>>>(src, dst, g, static_cast<int>(s.H), m, sd, base);
      } else if (hwc_types<in_t, scalar_t>() && hwc_launch(s, g, images, sizeof(scalar_t), acc_bytes, grid, rows_smem)) {
        launch_hwc(grid, rows_smem, stream, src, dst, g, static_cast<int>(s.H), m, sd, base);
      } else if (tiled) {
        const int64_t tasks = s.B * s.Hp * g.tiles_w;
        patchify_tile_kernel<in_t, scalar_t><<<grid_for(tasks, 8), kThreads, smem, stream>>>(src, dst, g, m, sd, base);
      } else {
        const int64_t blocks = (mat.numel() + kThreads - 1) / kThreads;
        patchify_elementwise_kernel<in_t, scalar_t>
            <<<grid_for(blocks, 32), kThreads, 0, stream>>>(src, dst, g, m, sd, base);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// grad_images = unpatchify(dmat) * scale[c], written with grad_images' own strides.
void launch_unpatchify(const at::Tensor& dmat, at::Tensor& grad_images, const PatchEmbedShape& s,
                       const at::Tensor& stdv) {
  if (grad_images.numel() == 0) return;
  Tile g{};
  int64_t smem = 0;
  const bool tiled = make_tile(s, grad_images, dmat, g, smem);
  const double* sd = stdv.defined() ? stdv.const_data_ptr<double>() : nullptr;
  const double base = image_base_scale(false);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dmat.scalar_type(), "vitfast_unpatchify_in", [&] {
    using mat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_images.scalar_type(), "vitfast_unpatchify_out", [&] {
      const mat_t* src = dmat.const_data_ptr<mat_t>();
      scalar_t* dst = grad_images.mutable_data_ptr<scalar_t>();
      dim3 grid;
      int64_t rows_smem = 0;
      const int64_t acc_bytes = sizeof(typename Acc<mat_t>::type);
      if (rows_launch(s, g, sizeof(scalar_t), acc_bytes, grid, rows_smem)) {
        unpatchify_rows_kernel<mat_t, scalar_t>
            <<<grid, kThreads, rows_smem, stream>>>(src, dst, g, static_cast<int>(s.H), sd, base);
      } else if (hwc_types<scalar_t, mat_t>() && hwc_launch(s, g, grad_images, sizeof(mat_t), acc_bytes, grid, rows_smem)) {
        launch_hwc_backward(grid, rows_smem, stream, src, dst, g, static_cast<int>(s.H), sd, base);
      } else if (tiled) {
        const int64_t tasks = s.B * s.Hp * g.tiles_w;
        unpatchify_tile_kernel<mat_t, scalar_t><<<grid_for(tasks, 8), kThreads, smem, stream>>>(src, dst, g, sd, base);
      } else {
        const int64_t blocks = (grad_images.numel() + kThreads - 1) / kThreads;
        unpatchify_elementwise_kernel<mat_t, scalar_t>
            <<<grid_for(blocks, 32), kThreads, 0, stream>>>(src, dst, g, s.H, s.W, sd, base);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Fills the first `rows` tokens of every image of out [B, T, D] (see prefill_kernel).
void launch_prefill(at::Tensor& out, const at::Tensor& bias, const at::Tensor& cls, const at::Tensor& pos,
                    const PatchEmbedShape& s, int64_t rows) {
  if (rows == 0 || out.numel() == 0) return;
  const int64_t pos_off = (pos.defined() && pos.size(1) != s.T) ? s.off() : 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "vitfast_prefill", [&] {
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const auto ok = [](const at::Tensor& t) { return !t.defined() || aligned16(t.const_data_ptr()); };
    const bool vec = s.D % vec16<scalar_t>() == 0 && ok(out) && ok(bias) && ok(cls) && ok(pos);
    const int64_t work = s.B * rows * s.D / (vec ? vec16<scalar_t>() : 1);
    const int64_t grid = grid_for((work + kThreads - 1) / kThreads, 32);
    // int32 indices when e + the grid stride cannot overflow, and every offset fits
    const bool small = s.B * s.T * s.D + grid * kThreads < INT_MAX;
    const auto launch = [&](auto index_tag, auto vec_tag) {
      using index_t = decltype(index_tag);
      prefill_kernel<scalar_t, index_t, decltype(vec_tag)::value><<<grid, kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), ptr(bias), ptr(cls), ptr(pos), static_cast<index_t>(pos_off),
          static_cast<index_t>(s.B), static_cast<index_t>(s.T), static_cast<index_t>(s.D),
          static_cast<index_t>(s.off()), static_cast<index_t>(rows));
    };
    if (small && vec) launch(int(0), std::true_type{});
    else if (small) launch(int(0), std::false_type{});
    else if (vec) launch(int64_t(0), std::true_type{});
    else launch(int64_t(0), std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_cuda_inputs(const PatchEmbedShape& s, const at::Tensor& images, const char* op) {
  TORCH_CHECK_VALUE(images.is_cuda(), op, ": images must be a CUDA tensor here, got ", images.device());
  TORCH_CHECK_VALUE(s.K <= INT_MAX / 16, op, ": patch too large (C*p*p = ", s.K, ")");
  TORCH_CHECK_VALUE(s.W <= INT_MAX / 16 && s.C * s.p <= INT_MAX / 16, op, ": image too wide (W = ", s.W, ")");
}

at::Tensor patch_embed_cuda(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token, const std::optional<at::Tensor>& pos_embed,
                            const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                            const std::optional<at::Tensor>& patches, std::optional<at::ScalarType> out_dtype) {
  const PatchEmbedShape s = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std);
  check_cuda_inputs(s, images, "vitfast.patch_embed");
  check_patches(patches, s, weight.scalar_type(), images.device(), "vitfast.patch_embed");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto wt = weight.scalar_type();
  const auto ot = tokens_dtype(weight, out_dtype, "vitfast.patch_embed");
  at::Tensor out = at::empty({s.B, s.T, s.D}, weight.options().dtype(ot));
  if (out.numel() == 0) return out;
  const auto as_out = [&](const std::optional<at::Tensor>& t) { return t ? t->to(ot).contiguous() : at::Tensor(); };
  const at::Tensor b = as_out(bias), cls = as_out(cls_token), pos = as_out(pos_embed);

  at::Tensor mat = patches ? *patches : at::empty({s.B * s.T, s.K}, weight.options());
  if (!patches) launch_patchify(images, mat, s, channel_stat(mean), channel_stat(std));
  const at::Tensor w = weight.contiguous().view({s.D, s.K});
  at::Tensor out2d = out.view({s.B * s.T, s.D});
  if (ot != wt) {
    // tokens in another dtype than the GEMM's (autocast: a bf16 GEMM, float32 class token and
    // positions): the GEMM's result (class rows zero) added onto the prefilled buffer, one more pass
    launch_prefill(out, b, cls, pos, s, s.T);
    out2d.add_(at::mm(mat, w.t()));
  } else if (b.defined() || pos.defined()) {
    launch_prefill(out, b, cls, pos, s, s.T);
    out2d.addmm_(mat, w.t());  // beta = 1: onto bias + pos, class rows pass through
  } else {
    at::mm_out(out2d, mat, w.t());
    launch_prefill(out, b, cls, pos, s, s.off());  // class rows (the GEMM wrote zeros there)
  }
  return out;
}

at::Tensor patch_embed_patches_cuda(const at::Tensor& images, const at::Tensor& weight, bool has_cls,
                                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  const PatchEmbedShape s = check_images_weight(images, weight, mean, std, has_cls, "vitfast.patch_embed_patches");
  check_cuda_inputs(s, images, "vitfast.patch_embed_patches");
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor mat = at::empty({s.B * s.T, s.K}, weight.options());
  if (mat.numel() > 0) launch_patchify(images, mat, s, channel_stat(mean), channel_stat(std));
  return mat;
}

using Grads = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                         std::optional<at::Tensor>, std::optional<at::Tensor>>;

Grads patch_embed_backward_cuda(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                                const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                                bool has_cls, int64_t pos_tokens, std::array<bool, 5> output_mask,
                                const std::optional<at::Tensor>& patches) {
  const PatchEmbedShape s =
      check_patch_embed_backward_args(grad_out, images, weight, mean, std, has_cls, pos_tokens, output_mask);
  check_cuda_inputs(s, images, "vitfast.patch_embed_backward");
  check_patches(patches, s, weight.scalar_type(), images.device(), "vitfast.patch_embed_backward");
  const c10::cuda::CUDAGuard guard(images.device());
  const auto wt = weight.scalar_type();
  const auto acc = wt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor G = grad_out.to(wt).contiguous().view({s.B * s.T, s.D});
  std::optional<at::Tensor> g_images, g_weight, g_bias, g_cls, g_pos;

  if (output_mask[1]) {
    at::Tensor X = patches ? *patches : at::empty({s.B * s.T, s.K}, weight.options());
    if (!patches) launch_patchify(images, X, s, channel_stat(mean), channel_stat(std));
    g_weight = at::mm(G.t(), X).view({s.D, s.C, s.p, s.p});
  }
  if (output_mask[0]) {
    // [B*T, K]; the kernel indexes it as row-major, so make that a guarantee rather than an
    // assumption about at::mm's output strides (a no-op when it is contiguous, as today)
    const at::Tensor dX = at::mm(G, weight.contiguous().view({s.D, s.K})).contiguous();
    at::Tensor gi = at::empty_like(images);
    launch_unpatchify(dX, gi, s, channel_stat(std));
    g_images = gi;
  }
  if (output_mask[2] || output_mask[3] || output_mask[4]) {
    const at::Tensor S = at::sum(grad_out, {0}, /*keepdim=*/false, acc);  // [T, D]
    if (output_mask[2]) g_bias = S.narrow(0, s.off(), s.N).sum(0);
    if (output_mask[3]) g_cls = S.select(0, 0).clone();
    if (output_mask[4]) g_pos = S.narrow(0, s.T - pos_tokens, pos_tokens).unsqueeze(0).clone();
  }
  return {g_images, g_weight, g_bias, g_cls, g_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("patch_embed", &patch_embed_cuda);
  m.impl("patch_embed_backward", &patch_embed_backward_cuda);
  m.impl("patch_embed_patches", &patch_embed_patches_cuda);
}

}  // namespace vitfast
