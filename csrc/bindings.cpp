// pybind11 module fastclip_kernels._C: a torch-free native library (bitsandbytes' model).
//
// Functions take raw pointers, sizes, row strides (in elements), a dtype code (common.h) and, for
// CUDA, a cudaStream_t as Python ints; fastclip_kernels/_native.py wraps them as torch ops.
// Invalid arguments raise ValueError; CUDA launch failures raise RuntimeError.
#include <pybind11/pybind11.h>

#include "common.h"
#include "cpu/row_dot.h"
#ifdef FASTCLIP_WITH_CUDA
#include "cuda/row_dot.h"
#endif

#ifndef FASTCLIP_CUDA_ARCHS
#define FASTCLIP_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using namespace py::literals;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef FASTCLIP_WITH_CUDA
  const int v = fastclip::cuda_runtime_version();
  info["cuda"] = true;
  info["cuda_version"] = fastclip::concat(v / 1000, ".", (v % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
#endif
  info["archs"] = FASTCLIP_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip_kernels native library: raw-pointer kernels, no torch dependency";
  m.def("build_info", &build_info,
        "dict: cuda (compiled with CUDA), cuda_version (CUDART_VERSION as 'major.minor' or None), "
        "archs (the FASTCLIP_CUDA_ARCHS list the kernels were built for)");

  const auto fwd_doc =
      "out[i] = sum_d a[i, d] * c[i, d] for a, c [rows, dim] with unit stride along dim; out [rows] "
      "contiguous, fp64 for fp64 inputs, else fp32.";
  const auto bwd_doc =
      "grad_a[i, d] = grad_out[i] * c[i, d], grad_c[i, d] = grad_out[i] * a[i, d]; grad_out [rows] "
      "contiguous (fp64 for fp64 inputs, else fp32); grad_a, grad_c written contiguous [rows, dim] "
      "in the input dtype.";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("row_dot_cpu", &fastclip::row_dot_cpu, fwd_doc, "a_ptr"_a, "c_ptr"_a, "out_ptr"_a, "rows"_a,
        "dim"_a, "stride_a"_a, "stride_c"_a, "dtype_code"_a, nogil);
  m.def("row_dot_bwd_cpu", &fastclip::row_dot_bwd_cpu, bwd_doc, "grad_out_ptr"_a, "a_ptr"_a, "c_ptr"_a,
        "grad_a_ptr"_a, "grad_c_ptr"_a, "rows"_a, "dim"_a, "stride_a"_a, "stride_c"_a, "dtype_code"_a, nogil);
#ifdef FASTCLIP_WITH_CUDA
  m.def("row_dot_cuda", &fastclip::row_dot_cuda, fwd_doc, "a_ptr"_a, "c_ptr"_a, "out_ptr"_a, "rows"_a,
        "dim"_a, "stride_a"_a, "stride_c"_a, "dtype_code"_a, "stream"_a, nogil);
  m.def("row_dot_bwd_cuda", &fastclip::row_dot_bwd_cuda, bwd_doc, "grad_out_ptr"_a, "a_ptr"_a, "c_ptr"_a,
        "grad_a_ptr"_a, "grad_c_ptr"_a, "rows"_a, "dim"_a, "stride_a"_a, "stride_c"_a, "dtype_code"_a,
        "stream"_a, nogil);
#endif
}
