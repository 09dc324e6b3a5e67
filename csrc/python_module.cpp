// The extension's Python module (pfa_kernels._C as imported): the functions of python_functions.h. seeded_uniform_
// releases the GIL while it draws (it holds the generator's own lock); the eager twin keeps it (autograd records).
#include <torch/extension.h>

#include "python_functions.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("eager_projected_linear", &pfa_kernels::eager_projected_linear,
        "pfa_kernels::linear's eager twin for a projected layer with M, 2-D x (see csrc/eager_linear.cpp)");
  m.def("seeded_uniform_", &pfa_kernels::seeded_uniform_, py::arg("out"), py::arg("low"), py::arg("high"),
        py::arg("generator"), py::arg("variant"), py::call_guard<py::gil_scoped_release>(),
        "out.uniform_(low, high, generator) as torch's CPU kernel draws it (see csrc/seeded_uniform.cpp)");
  m.def("seeded_uniform_variants", &pfa_kernels::seeded_uniform_variants,
        "the variants of seeded_uniform_ this CPU runs, in order of preference");
}
