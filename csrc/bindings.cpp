// pybind11 module fastclip_kernels._C: a torch-free native library (bitsandbytes' model).
//
// Functions take raw pointers, sizes, row strides (in elements), a dtype code (common.h) and, for
// CUDA, a cudaStream_t as Python ints; fastclip_kernels/_native.py wraps them as torch ops.
// Invalid arguments raise ValueError; CUDA launch failures raise RuntimeError.
#include <pybind11/pybind11.h>

#include "common.h"
#include "cpu/multi_tensor.h"
#ifdef FASTCLIP_WITH_CUDA
#include "cuda/multi_tensor.h"
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

// Multi-tensor optimizer ops (csrc/optim_math.h: the metadata table and the math). Table-driven
// ops take (table_ptr, num_tensors, num_chunks, chunk_size, dtype_code) first; _cuda variants add
// `stream` last. Built on fastclip_kernels/optim/native.py, which builds and caches the table.
void def_multi_tensor(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  const auto sq_norm_doc =
      "out[i] = sum(grads[i]^2) for every tensor of the table (fp32 [num_tensors], overwritten); grads of "
      "dtype_code 0 (float32), 2 (float16) or 3 (bfloat16).";
  const auto global_norm_doc =
      "*norm = sqrt(sum(sq[:num_tensors])); if coef_ptr != 0 also *coef = min(1, max_norm / (*norm + 1e-6)). "
      "fp32 scalars.";
  const auto clip_doc = "*out = min(1, max_norm / (*total_norm + 1e-6)), fp32 scalars (torch's clip_grad_norm_ rule).";
  const auto adamw_doc =
      "One AdamW step (decoupled weight decay, torch.optim.AdamW order) over every tensor of the table. lr is "
      "read from lr_ptr (0-d fp32) when lr_ptr != 0; gradients are multiplied by *grad_scale_ptr when != 0. "
      "Updates the fp32 master when the table has one and writes the param rounded to its dtype.";
  const auto lamb_doc =
      "One LAMB step (apex FusedLAMB, adam_w_mode) over every tensor of the table: moments, per-tensor "
      "||w||, ||u|| (into norms_ptr, fp32 [2 * num_tensors], when use_trust_ratio), w -= lr * ratio * u.";
#define FASTCLIP_TABLE_ARGS "table_ptr"_a, "num_tensors"_a, "num_chunks"_a, "chunk_size"_a, "dtype_code"_a
#define FASTCLIP_ADAM_ARGS "lr"_a, "lr_ptr"_a, "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a
#define FASTCLIP_LAMB_ARGS                                                                            \
  FASTCLIP_ADAM_ARGS, "bias_correction"_a, "grad_averaging"_a, "use_trust_ratio"_a, "grad_scale_ptr"_a, \
      "norms_ptr"_a
  m.def("multi_tensor_sq_norm_cpu", &fastclip::multi_tensor_sq_norm_cpu, sq_norm_doc, FASTCLIP_TABLE_ARGS,
        "out_ptr"_a, nogil);
  m.def("global_norm_cpu", &fastclip::global_norm_cpu, global_norm_doc, "sq_ptr"_a, "num_tensors"_a, "norm_ptr"_a,
        "max_norm"_a, "coef_ptr"_a, nogil);
  m.def("clip_coefficient_cpu", &fastclip::clip_coefficient_cpu, clip_doc, "total_norm_ptr"_a, "max_norm"_a,
        "out_ptr"_a, nogil);
  m.def("multi_tensor_adamw_cpu", &fastclip::multi_tensor_adamw_cpu, adamw_doc, FASTCLIP_TABLE_ARGS,
        FASTCLIP_ADAM_ARGS, "grad_scale_ptr"_a, nogil);
  m.def("multi_tensor_lamb_cpu", &fastclip::multi_tensor_lamb_cpu, lamb_doc, FASTCLIP_TABLE_ARGS,
        FASTCLIP_LAMB_ARGS, nogil);
#ifdef FASTCLIP_WITH_CUDA
  m.def("multi_tensor_sq_norm_cuda", &fastclip::multi_tensor_sq_norm_cuda, sq_norm_doc, FASTCLIP_TABLE_ARGS,
        "out_ptr"_a, "stream"_a, nogil);
  m.def("global_norm_cuda", &fastclip::global_norm_cuda, global_norm_doc, "sq_ptr"_a, "num_tensors"_a,
        "norm_ptr"_a, "max_norm"_a, "coef_ptr"_a, "stream"_a, nogil);
  m.def("clip_coefficient_cuda", &fastclip::clip_coefficient_cuda, clip_doc, "total_norm_ptr"_a, "max_norm"_a,
        "out_ptr"_a, "stream"_a, nogil);
  m.def("multi_tensor_adamw_cuda", &fastclip::multi_tensor_adamw_cuda, adamw_doc, FASTCLIP_TABLE_ARGS,
        FASTCLIP_ADAM_ARGS, "grad_scale_ptr"_a, "stream"_a, nogil);
  m.def("multi_tensor_lamb_cuda", &fastclip::multi_tensor_lamb_cuda, lamb_doc, FASTCLIP_TABLE_ARGS,
        FASTCLIP_LAMB_ARGS, "stream"_a, nogil);
#endif
#undef FASTCLIP_TABLE_ARGS
#undef FASTCLIP_ADAM_ARGS
#undef FASTCLIP_LAMB_ARGS
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip_kernels native library: raw-pointer kernels, no torch dependency";
  m.def("build_info", &build_info,
        "dict: cuda (compiled with CUDA), cuda_version (CUDART_VERSION as 'major.minor' or None), "
        "archs (the FASTCLIP_CUDA_ARCHS list the kernels were built for)");

  def_multi_tensor(m);
}
