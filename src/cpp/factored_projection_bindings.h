// pybind11 bindings of the factored-projection argument type, shared by _core and _cuda (module-local per module).
#pragma once

#include <pybind11/pybind11.h>

#include "attrprims/factored_projection.h"
#include "projection_bindings.h"

namespace attrprims {

/// Register FactoredProjectArgs on `m`, pointers as integers; call after bind_projection_types (it registers DType).
inline void bind_factored_projection_types(pybind11::module_& m) {
  namespace py = pybind11;
  using A = FactoredProjectArgs;
  py::class_<A> args(m, "FactoredProjectArgs", py::module_local());
  args.def(py::init<>())
      .def_readwrite("n", &A::n)
      .def_readwrite("t", &A::t)
      .def_readwrite("d_in", &A::d_in)
      .def_readwrite("d_out", &A::d_out)
      .def_readwrite("k_in", &A::k_in)
      .def_readwrite("k_out", &A::k_out)
      .def_readwrite("a_dtype", &A::a_dtype)
      .def_readwrite("a_stride_n", &A::a_stride_n)
      .def_readwrite("a_stride_t", &A::a_stride_t)
      .def_readwrite("delta_stride_n", &A::delta_stride_n)
      .def_readwrite("delta_stride_t", &A::delta_stride_t)
      .def_readwrite("p_in_row_stride", &A::p_in_row_stride)
      .def_readwrite("p_out_row_stride", &A::p_out_row_stride)
      .def_readwrite("out_row_stride", &A::out_row_stride)
      .def_readwrite("accumulate", &A::accumulate)
      .def_readwrite("num_threads", &A::num_threads);
  def_pointer(args, "a_ptr", &A::a);
  def_pointer(args, "delta_ptr", &A::delta);
  def_pointer(args, "p_in_ptr", &A::p_in);
  def_pointer(args, "p_out_ptr", &A::p_out);
  def_pointer(args, "out_ptr", &A::out);
}

}  // namespace attrprims
