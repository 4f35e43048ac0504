// pybind11 bindings of the projection argument types, shared by _core and _cuda (module-local per module).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "attrprims/projection.h"

namespace attrprims {

/// Expose the pointer field `field` of C as a read-write integer property `name` (pointers cross as integers).
template <typename C, typename T>
void def_pointer(pybind11::class_<C>& cls, const char* name, T* C::*field) {
  cls.def_property(
      name, [field](const C& c) { return reinterpret_cast<std::uintptr_t>(c.*field); },
      [field](C& c, std::uintptr_t p) { c.*field = reinterpret_cast<T*>(p); });
}

/// Register DType, Kind, ProjectionSpec, ProjectArgs and MaterializeArgs on `m`; pointers are integers.
inline void bind_projection_types(pybind11::module_& m) {
  namespace py = pybind11;
  py::enum_<DType>(m, "DType", py::module_local()).value("f32", DType::f32).value("f16", DType::f16).value("bf16", DType::bf16)
      .value("f64", DType::f64);
  py::enum_<Kind>(m, "Kind", py::module_local())
      .value("rademacher", Kind::rademacher)
      .value("gaussian", Kind::gaussian)
      .value("sjlt", Kind::sjlt);

  py::class_<ProjectionSpec>(m, "ProjectionSpec", py::module_local())
      .def(py::init<>())
      .def_readwrite("seed", &ProjectionSpec::seed)
      .def_readwrite("kind", &ProjectionSpec::kind)
      .def_readwrite("k", &ProjectionSpec::k)
      .def_readwrite("s", &ProjectionSpec::s);

  py::class_<ProjectArgs> project(m, "ProjectArgs", py::module_local());
  project.def(py::init<>())
      .def_readwrite("spec", &ProjectArgs::spec)
      .def_readwrite("n", &ProjectArgs::n)
      .def_readwrite("c", &ProjectArgs::c)
      .def_readwrite("offset", &ProjectArgs::offset)
      .def_readwrite("in_dtype", &ProjectArgs::in_dtype)
      .def_readwrite("in_row_stride", &ProjectArgs::in_row_stride)
      .def_readwrite("out_row_stride", &ProjectArgs::out_row_stride)
      .def_readwrite("accumulate", &ProjectArgs::accumulate)
      .def_readwrite("num_threads", &ProjectArgs::num_threads);
  def_pointer(project, "in_ptr", &ProjectArgs::in);
  def_pointer(project, "out_ptr", &ProjectArgs::out);

  py::class_<MaterializeArgs> materialize(m, "MaterializeArgs", py::module_local());
  materialize.def(py::init<>())
      .def_readwrite("spec", &MaterializeArgs::spec)
      .def_readwrite("offset", &MaterializeArgs::offset)
      .def_readwrite("c", &MaterializeArgs::c)
      .def_readwrite("out_row_stride", &MaterializeArgs::out_row_stride)
      .def_readwrite("num_threads", &MaterializeArgs::num_threads);
  def_pointer(materialize, "out_ptr", &MaterializeArgs::out);
}

}  // namespace attrprims
