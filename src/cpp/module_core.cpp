// attrprims._core: pybind11 bindings of the CPU kernels (pointers cross as integers; no torch here).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <thread>

#include "attrprims/factored_projection_cpu.h"
#include "attrprims/gram_cpu.h"
#include "attrprims/non_finite_cpu.h"
#include "attrprims/score_topk_cpu.h"
#include "attrprims/projection_cpu.h"
#include "factored_projection_bindings.h"
#include "gram_bindings.h"
#include "cpu_isa.h"
#include "parallel_cpu.h"
#include "score_topk_bindings.h"
#include "projection_bindings.h"

namespace py = pybind11;
using namespace attrprims;

namespace {

/// Philox-4x32-10 on each row of counters [N, 4] with one key: the RNG under test, bit for bit.
py::array_t<uint32_t> philox(py::array_t<uint32_t, py::array::c_style | py::array::forcecast> counters,
                             uint64_t key) {
  AP_CHECK(counters.ndim() == 2 && counters.shape(1) == 4, "counters",
           "expected shape [N, 4] of uint32");
  const auto n = counters.shape(0);
  py::array_t<uint32_t> out({n, py::ssize_t{4}});
  const uint32_t* src = counters.data();
  uint32_t* dst = out.mutable_data();
  for (py::ssize_t i = 0; i < n; ++i) {
    const U32x4 r = philox4x32_10(U32x4{{src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]}}, key);
    for (int j = 0; j < 4; ++j) dst[4 * i + j] = r.v[j];
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "attrprims CPU kernels over raw pointers";

  bind_projection_types(m);
  bind_factored_projection_types(m);
  bind_gram_types(m);
  bind_score_topk_types(m);

  auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("project_cpu", &project_cpu, py::arg("args"), no_gil, "out [n, k] = in [n, c] @ P[offset:offset+c]");
  m.def("project_transpose_cpu", &project_transpose_cpu, py::arg("args"), no_gil,
        "out [n, c] = in [n, k] @ P[offset:offset+c]^T");
  m.def("materialize_cpu", &materialize_cpu, py::arg("args"), no_gil, "out [c, k] = P[offset:offset+c]");
  m.def("factored_project_cpu", &factored_project_cpu, py::arg("args"), no_gil,
        "out [n, k_out*k_in] = (delta_i @ P_out)^T (a_i @ P_in) per example, flattened row-major");
  m.def("gram_update_cpu", &gram_update_cpu, py::arg("args"), no_gil,
        "lower triangle of G [k, k] += X^T X for X [b, k], fp64 sums (Kahan-compensated when G is float32)");
  m.def("score_topk_cpu", &score_topk_cpu, py::arg("args"), no_gil,
        "merge the scores (a @ b^T) * w of each test row into its running top/bottom lists");
  m.def(
      "find_non_finite_cpu",
      [](std::uintptr_t x, DType dtype, int64_t rows, int64_t cols, int64_t row_stride) {
        return find_non_finite_cpu(reinterpret_cast<const void*>(x), dtype, rows, cols, row_stride);
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), no_gil,
      "flat index of the first NaN/Inf of x [rows, cols] (columns contiguous), or -1");
  m.def("philox4x32_10", &philox, py::arg("counters"), py::arg("key"),
        "Philox-4x32-10 of each counter row [N, 4] under a 64-bit key");
  m.def(
      "cpu_kernels", [] { return cpu_isa_name(cpu_isa_active()); },
      "the instruction set the CPU kernels run with now: generic, avx2 or avx512");
  m.def(
      "cpu_kernels_supported",
      [] {
        py::list names;
        for (int level = 0; level <= static_cast<int>(cpu_isa_supported()); ++level)
          names.append(cpu_isa_name(static_cast<CpuIsa>(level)));
        return names;
      },
      "the instruction sets this build can run on this CPU, lowest first");
  m.def(
      "set_cpu_kernels",
      [](const std::string& name) {
        const char* previous = cpu_isa_name(cpu_isa_active());
        std::string names;
        for (int level = 0; level <= static_cast<int>(cpu_isa_supported()); ++level) {
          const char* level_name = cpu_isa_name(static_cast<CpuIsa>(level));
          if (name == level_name) {
            set_cpu_isa(static_cast<CpuIsa>(level));
            return previous;
          }
          names += (level ? ", " : "") + std::string(level_name);
        }
        throw py::value_error("isa: expected one of " + names + " (what this build runs on this CPU), got '" + name +
                              "'");
      },
      py::arg("isa"), "run the CPU kernels with `isa` from now on; returns the one used before");
  m.def(
      "cpu_threads", [] { return openmp_team() != nullptr ? "openmp team" : "std::thread"; },
      "where the CPU kernels run in parallel: the process's OpenMP team (torch's) when one is loaded");

  py::dict info;
  info["version"] = ATTRPRIMS_VERSION;
  info["cxx_compiler"] = ATTRPRIMS_CXX_COMPILER;
  info["build_type"] = ATTRPRIMS_BUILD_TYPE;
  info["hardware_threads"] = std::thread::hardware_concurrency();
  m.attr("build_info") = info;
}
