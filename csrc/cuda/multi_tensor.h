// Multi-tensor AdamW, LAMB and gradient norms on a CUDA GPU: see multi_tensor.cu and ../optim_math.h.
// Same arguments as ../cpu/multi_tensor.h (all pointers are device addresses) plus `stream`, a
// cudaStream_t as an integer. Host-side declarations only, so bindings.cpp needs no CUDA headers.
#pragma once

#include <cstdint>

namespace fastclip {

int cuda_runtime_version();  // CUDART_VERSION the library was compiled against, e.g. 13000

void multi_tensor_sq_norm_cuda(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                               int64_t chunk_size, int dtype_code, std::uintptr_t out_ptr,
                               std::uintptr_t stream);

void global_norm_cuda(std::uintptr_t sq_ptr, int64_t num_tensors, std::uintptr_t norm_ptr, double max_norm,
                      std::uintptr_t coef_ptr, std::uintptr_t stream);

void clip_coefficient_cuda(std::uintptr_t total_norm_ptr, double max_norm, std::uintptr_t out_ptr,
                           std::uintptr_t stream);

void multi_tensor_adamw_cuda(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                             int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                             double beta2, double eps, double weight_decay, std::uintptr_t grad_scale_ptr,
                             std::uintptr_t stream);

void multi_tensor_lamb_cuda(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                            int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                            double beta2, double eps, double weight_decay, bool bias_correction,
                            bool grad_averaging, bool use_trust_ratio, std::uintptr_t grad_scale_ptr,
                            std::uintptr_t norms_ptr, std::uintptr_t stream);

}  // namespace fastclip
