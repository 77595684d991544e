// The one place where every tp_numa op is declared (schema) and bound to its CPU kernel.
// Fake (meta) implementations live next to the Python wrappers (tp_numa/ops.py,
// tp_numa/distributed/shm.py) so torch.compile can trace the ops.
#include <torch/library.h>

#include "quant/quant_ops.h"

TORCH_LIBRARY(tp_numa, m) {
    // ---- quantized linear (csrc/quant) ----
    m.def("quant_matmul(Tensor x, Tensor w, int qtype) -> Tensor");
    // no tensor arguments: bound here as catch-all kernels
    m.def("kernel_isa() -> str", &tp_numa::kernel_isa);
    m.def("set_kernel_isa(str isa) -> ()", &tp_numa::set_kernel_isa);

    // ---- shared-memory collectives (csrc/comm) ----

    // ---- attention (csrc/attention) ----
}

TORCH_LIBRARY_IMPL(tp_numa, CPU, m) {
    m.impl("quant_matmul", &tp_numa::quant_matmul);
}

// The extension module tp_numa._C: importing it runs the registrations above.
#include <Python.h>
static struct PyModuleDef tp_numa_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tp_numa_module); }
