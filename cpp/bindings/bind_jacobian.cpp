#include "pybind.hpp"

namespace gradchain::bindings {

void bind_jacobian(py::module_& m) { (void)m; }

}  // namespace gradchain::bindings
