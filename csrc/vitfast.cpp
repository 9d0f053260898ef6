// The vitfast operator library: every op's schema is declared here, once.
// CPU kernels register in csrc/*.cpp, CUDA kernels in csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

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
// `import vitfast._C` loads this shared object, which runs the TORCH_LIBRARY
// registrations below. The module itself only carries build facts.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "vitfast's compiled operators (registered in torch.ops.vitfast)", -1, nullptr};
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
  m.def(
      "patch_embed(Tensor images, Tensor weight, Tensor? bias=None, Tensor? cls_token=None, "
      "Tensor? pos_embed=None, Tensor? mean=None, Tensor? std=None) -> Tensor");
}
