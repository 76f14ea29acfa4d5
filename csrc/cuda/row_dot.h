// Row-wise dot product on a CUDA GPU (float32, float16, bfloat16): see row_dot.cu.
// Host-side declarations only, so bindings.cpp compiles without CUDA headers; `stream` is a
// cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream).
#pragma once

#include <cstdint>

namespace fastclip {

int cuda_runtime_version();  // CUDART_VERSION the library was compiled against, e.g. 13000

void row_dot_cuda(std::uintptr_t a_ptr, std::uintptr_t c_ptr, std::uintptr_t out_ptr, int64_t rows,
                  int64_t dim, int64_t stride_a, int64_t stride_c, int dtype_code, std::uintptr_t stream);

void row_dot_bwd_cuda(std::uintptr_t grad_out_ptr, std::uintptr_t a_ptr, std::uintptr_t c_ptr,
                      std::uintptr_t grad_a_ptr, std::uintptr_t grad_c_ptr, int64_t rows, int64_t dim,
                      int64_t stride_a, int64_t stride_c, int dtype_code, std::uintptr_t stream);

}  // namespace fastclip
