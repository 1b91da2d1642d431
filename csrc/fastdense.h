// Registration hooks of the C++ parts of fastdense._C; module.cpp calls each one once.
// Sources here use pybind11 only (no torch headers), which keeps the build to seconds; Python
// passes tensors as NumPy views (tensor.numpy(), zero-copy) and wraps results with torch.from_numpy.
#pragma once

#include <pybind11/pybind11.h>

namespace fastdense {

void register_scrl_boxes(pybind11::module_& m);

}  // namespace fastdense
