// The library definition, the debugging switches and the Python module stub that loads the registrations.
#include <Python.h>

#include <atomic>
#include <limits>

#include <torch/library.h>

#include "common/native.h"

namespace vosops {

namespace {
std::atomic<bool> g_poison{false};
}

bool poison_outputs() { return g_poison.load(std::memory_order_relaxed); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-7777);
    }
  }
  return out;
}

static void set_poison_outputs(bool enable) { g_poison.store(enable); }

// For the harness's own test: an output allocated exactly as the kernels allocate theirs.
static at::Tensor new_output_for_test(at::IntArrayRef sizes, at::ScalarType dtype) {
  return new_output(sizes, at::TensorOptions().dtype(dtype));
}

static bool built_with_cuda() {
#ifdef VOSOPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace vosops

TORCH_LIBRARY(vosops, m) {
  m.def("_set_poison_outputs(bool enable) -> ()", &vosops::set_poison_outputs);
  m.def("_built_with_cuda() -> bool", &vosops::built_with_cuda);
  m.def("_new_output(int[] size, ScalarType dtype) -> Tensor", &vosops::new_output_for_test);
}

// `import vosops._C` only needs to load the shared object: the static TORCH_LIBRARY blocks register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
