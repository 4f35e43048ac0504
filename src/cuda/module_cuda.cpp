// attrprims._cuda: pybind11 bindings of the CUDA kernels (pointers and streams cross as integers).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda_api.h"
#include "factored_projection_bindings.h"
#include "gram_bindings.h"
#include "score_topk_bindings.h"
#include "projection_bindings.h"

namespace py = pybind11;
using namespace attrprims;

namespace {

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "attrprims CUDA kernels over raw device pointers, enqueued on the caller's stream";

  bind_projection_types(m);
  bind_factored_projection_types(m);
  bind_gram_types(m);
  bind_score_topk_types(m);

  auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("project_workspace_bytes_cuda", &project_workspace_bytes_cuda, py::arg("args"));
  m.def(
      "project_cuda",
      [](const ProjectArgs& a, std::uintptr_t workspace, int64_t workspace_bytes, int device, std::uintptr_t stream) {
        project_cuda(a, reinterpret_cast<void*>(workspace), workspace_bytes, device, as_stream(stream));
      },
      py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"), no_gil);
  m.def(
      "project_transpose_cuda",
      [](const ProjectArgs& a, int device, std::uintptr_t stream) { project_transpose_cuda(a, device, as_stream(stream)); },
      py::arg("args"), py::arg("device"), py::arg("stream"), no_gil);
  m.def(
      "materialize_cuda",
      [](const MaterializeArgs& a, int device, std::uintptr_t stream) { materialize_cuda(a, device, as_stream(stream)); },
      py::arg("args"), py::arg("device"), py::arg("stream"), no_gil);
  m.def(
      "factored_project_cuda",
      [](const FactoredProjectArgs& a, int device, std::uintptr_t stream) {
        factored_project_cuda(a, device, as_stream(stream));
      },
      py::arg("args"), py::arg("device"), py::arg("stream"), no_gil);
  m.def(
      "gram_update_cuda",
      [](const GramUpdateArgs& a, int device, std::uintptr_t stream) {
        gram_update_cuda(a, device, as_stream(stream));
      },
      py::arg("args"), py::arg("device"), py::arg("stream"), no_gil);
  m.def("score_topk_workspace_bytes_cuda", &score_topk_workspace_bytes_cuda, py::arg("args"));
  m.def(
      "score_topk_cuda",
      [](const ScoreTopkArgs& a, std::uintptr_t workspace, int64_t workspace_bytes, int device, std::uintptr_t stream) {
        score_topk_cuda(a, reinterpret_cast<void*>(workspace), workspace_bytes, device, as_stream(stream));
      },
      py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"), no_gil);
  m.def(
      "device_count",
      []() {
        const CudaRuntimeInfo info = cuda_runtime_info();
        return py::make_tuple(info.device_count, info.error);
      },
      "(number of usable devices, runtime error text when 0)");

  const CudaRuntimeInfo info = cuda_runtime_info();
  py::dict build;
  build["compiler"] = ATTRPRIMS_CUDA_COMPILER;
  build["archs"] = ATTRPRIMS_CUDA_ARCHS;
  build["runtime_version"] = info.runtime_version;
  build["driver_version"] = info.driver_version;
  m.attr("build_info") = build;
}
