// pybind11 bindings of the fused scoring argument type, shared by _core and _cuda (module-local per module).
#pragma once

#include <pybind11/pybind11.h>

#include "attrprims/score_topk.h"
#include "projection_bindings.h"

namespace attrprims {

/// Register ScoreTopkArgs on `m`, pointers as integers; call after bind_projection_types (it registers DType).
inline void bind_score_topk_types(pybind11::module_& m) {
  namespace py = pybind11;
  using A = ScoreTopkArgs;
  py::class_<A> args(m, "ScoreTopkArgs", py::module_local());
  args.def(py::init<>())
      .def_readwrite("m", &A::m)
      .def_readwrite("n", &A::n)
      .def_readwrite("k", &A::k)
      .def_readwrite("a_row_stride", &A::a_row_stride)
      .def_readwrite("b_dtype", &A::b_dtype)
      .def_readwrite("b_row_stride", &A::b_row_stride)
      .def_readwrite("index_offset", &A::index_offset)
      .def_readwrite("top", &A::top)
      .def_readwrite("top_row_stride", &A::top_row_stride)
      .def_readwrite("bottom", &A::bottom)
      .def_readwrite("bottom_row_stride", &A::bottom_row_stride)
      .def_readwrite("num_threads", &A::num_threads);
  def_pointer(args, "a_ptr", &A::a);
  def_pointer(args, "b_ptr", &A::b);
  def_pointer(args, "w_ptr", &A::w);
  def_pointer(args, "top_values_ptr", &A::top_values);
  def_pointer(args, "top_indices_ptr", &A::top_indices);
  def_pointer(args, "bottom_values_ptr", &A::bottom_values);
  def_pointer(args, "bottom_indices_ptr", &A::bottom_indices);
}

}  // namespace attrprims
