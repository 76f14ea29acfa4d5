// Multi-tensor AdamW, LAMB and gradient norms on the CPU: see multi_tensor.cpp and ../optim_math.h.
// table_ptr is the metadata table (optim_math.h); dtype_code (common.h) is the param and grad dtype:
// 0 float32, 2 float16 or 3 bfloat16 (the latter two with fp32 masters).
#pragma once

#include <cstdint>

namespace fastclip {

// out[i] = sum of grads[i]^2 (fp32 [num_tensors], overwritten).
void multi_tensor_sq_norm_cpu(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                              int64_t chunk_size, int dtype_code, std::uintptr_t out_ptr);

// *norm = sqrt(sum_i sq[i]); if coef_ptr != 0, *coef = min(1, max_norm / (*norm + 1e-6)). fp32.
void global_norm_cpu(std::uintptr_t sq_ptr, int64_t num_tensors, std::uintptr_t norm_ptr, double max_norm,
                     std::uintptr_t coef_ptr);

// *out = min(1, max_norm / (*total_norm + 1e-6)), fp32.
void clip_coefficient_cpu(std::uintptr_t total_norm_ptr, double max_norm, std::uintptr_t out_ptr);

void multi_tensor_adamw_cpu(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                            int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                            double beta2, double eps, double weight_decay, std::uintptr_t grad_scale_ptr);

// norms_ptr: fp32 [2 * num_tensors] scratch for the sums of w^2 and u^2 (needed if use_trust_ratio).
void multi_tensor_lamb_cpu(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                           int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                           double beta2, double eps, double weight_decay, bool bias_correction,
                           bool grad_averaging, bool use_trust_ratio, std::uintptr_t grad_scale_ptr,
                           std::uintptr_t norms_ptr);

}  // namespace fastclip
