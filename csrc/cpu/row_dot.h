// Row-wise dot product on the CPU (float32 and float64): see row_dot.cpp.
#pragma once

#include <cstdint>

namespace fastclip {

void row_dot_cpu(std::uintptr_t a_ptr, std::uintptr_t c_ptr, std::uintptr_t out_ptr, int64_t rows,
                 int64_t dim, int64_t stride_a, int64_t stride_c, int dtype_code);

void row_dot_bwd_cpu(std::uintptr_t grad_out_ptr, std::uintptr_t a_ptr, std::uintptr_t c_ptr,
                     std::uintptr_t grad_a_ptr, std::uintptr_t grad_c_ptr, int64_t rows, int64_t dim,
                     int64_t stride_a, int64_t stride_c, int dtype_code);

}  // namespace fastclip
