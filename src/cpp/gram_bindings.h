// pybind11 bindings of the Gram argument type, shared by _core and _cuda (module-local per module).
#pragma once

#include <pybind11/pybind11.h>

#include "attrprims/gram.h"
#include "projection_bindings.h"

namespace attrprims {

/// Register GramUpdateArgs on `m`, pointers as integers; call after bind_projection_types (it registers DType).
inline void bind_gram_types(pybind11::module_& m) {
  namespace py = pybind11;
  using A = GramUpdateArgs;
  py::class_<A> args(m, "GramUpdateArgs", py::module_local());
  args.def(py::init<>())
      .def_readwrite("b", &A::b)
      .def_readwrite("k", &A::k)
      .def_readwrite("x_dtype", &A::x_dtype)
      .def_readwrite("x_row_stride", &A::x_row_stride)
      .def_readwrite("g_row_stride", &A::g_row_stride)
      .def_readwrite("g_f32", &A::g_f32)
      .def_readwrite("num_threads", &A::num_threads);
  def_pointer(args, "x_ptr", &A::x);
  def_pointer(args, "g_ptr", &A::g);
  def_pointer(args, "comp_ptr", &A::comp);
}

}  // namespace attrprims
