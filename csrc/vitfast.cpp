// The vitfast operator library: every op's schema is declared here, once.
// CPU kernels register in csrc/*.cpp, CUDA kernels in csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

#include "patch_embed.h"  // cpu_strategy

#ifndef VITFAST_TORCH_VERSION
#define VITFAST_TORCH_VERSION "unknown"
#endif
#ifndef VITFAST_WITH_CUDA
#define VITFAST_WITH_CUDA 0
#endif
#ifndef VITFAST_CUDA_VERSION
#define VITFAST_CUDA_VERSION ""
#endif

extern "C" {
static PyObject* vitfast_cpu_patch_embed_strategy(PyObject*, PyObject*) {
  return PyUnicode_FromString(vitfast::cpu_strategy());
}

static PyMethodDef vitfast_methods[] = {
    {"cpu_patch_embed_strategy", vitfast_cpu_patch_embed_strategy, METH_NOARGS,
     "The GEMM of the float32 CPU patch embedding now: 'gemm' (MKL, patch matrix) or 'conv' (oneDNN)."},
    {nullptr, nullptr, 0, nullptr}};

// `import vitfast._C` loads this shared object, which runs the TORCH_LIBRARY
// registrations below. The module itself only carries build facts.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "vitfast's compiled operators (registered in torch.ops.vitfast)", -1, vitfast_methods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", VITFAST_TORCH_VERSION);
  PyModule_AddIntConstant(m, "with_cuda", VITFAST_WITH_CUDA);
  PyModule_AddStringConstant(m, "cuda_version", VITFAST_CUDA_VERSION);
  return m;
}
}

TORCH_LIBRARY(vitfast, m) {
  // images [B, C, H, W] (float or uint8) -> tokens [B, (1+)N, D]; see vitfast/ops/patch_embed.py
  // patches: optional, the patch matrix of these images (patch_embed_patches), to skip making it.
  // out_dtype: the tokens' dtype (default: the weight's). The GEMM runs in the weight's dtype and
  // accumulates in float32; bias, class token and positions are added in float32 and the sum is
  // rounded once to out_dtype. The autocast kernels pass the dtype the eager chain gives under
  // autocast (a float32 class token and positions make float32 tokens, as timm's cat and add do).
  m.def(
      "patch_embed(Tensor images, Tensor weight, Tensor? bias=None, Tensor? cls_token=None, "
      "Tensor? pos_embed=None, Tensor? mean=None, Tensor? std=None, Tensor? patches=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  // Gradients of patch_embed for (images, weight, bias, cls_token, pos_embed), each computed
  // when its output_mask entry is set (None otherwise). has_cls: a class token was given;
  // pos_tokens: pos_embed.shape[1] (T or N), 0 without pos_embed. mean/std get no gradient.
  // grad_images/grad_weight come in the images'/weight's dtype, grad_bias [D], grad_cls [D]
  // and grad_pos [1, pos_tokens, D] in float32 (float64 for float64 weights).
  // patches: optional, as for patch_embed (the weight gradient then reads it instead of
  // re-making it from the images).
  m.def(
      "patch_embed_backward(Tensor grad_out, Tensor images, Tensor weight, Tensor? mean, Tensor? std, "
      "bool has_cls, int pos_tokens, bool[5] output_mask, Tensor? patches=None) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // The normalised patch matrix [B*T, C*p*p] of the images for this weight (p, C): row
  // b*T + off + patch, zero rows where class tokens sit (has_cls). In the op's compute dtype:
  // float32 on the CPU (float64 for float64 weights), the weight's dtype on CUDA. The CPU
  // autograd path keeps it for the weight gradient, as a Linear keeps its input.
  m.def("patch_embed_patches(Tensor images, Tensor weight, bool has_cls, Tensor? mean=None, Tensor? std=None) -> Tensor");
}
