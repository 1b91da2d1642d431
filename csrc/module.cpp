// The one PYBIND11_MODULE of fastdense._C: add a register_* call here for each new C++ source.
#include "fastdense.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastdense C++ extension (CPU): SCRL box sampler";
    fastdense::register_scrl_boxes(m);
}
