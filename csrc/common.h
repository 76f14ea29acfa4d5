// Shared by the CPU and CUDA halves of fastclip_kernels._C: argument checks and dtype codes.
// Nothing here includes torch or CUDA headers.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fastclip {

// Element type of a tensor, passed from Python as an int (see fastclip_kernels/_native.py).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float64";
    case 2: return "float16";
    case 3: return "bfloat16";
    default: return "unknown";
  }
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace fastclip

// FASTCLIP_CHECK(cond, "message parts", ...): throws std::invalid_argument (Python ValueError).
#define FASTCLIP_CHECK(cond, ...)                                             \
  do {                                                                        \
    if (!(cond)) throw std::invalid_argument(::fastclip::concat(__VA_ARGS__)); \
  } while (0)

// Checks shared by every row-wise op on [rows, dim] operands with unit stride along dim.
#define FASTCLIP_CHECK_ROWS(fn, ptr, name, rows, dim, row_stride)                                   \
  do {                                                                                              \
    FASTCLIP_CHECK((rows) >= 0 && (dim) >= 0, fn, ": rows and dim must be >= 0, got rows=", (rows), \
                   ", dim=", (dim));                                                                \
    FASTCLIP_CHECK((rows) * (dim) == 0 || (ptr) != 0, fn, ": ", name, " is a null pointer");        \
    FASTCLIP_CHECK((rows) <= 1 || (row_stride) >= (dim), fn, ": ", name, " row stride ",          \
                   (row_stride), " is smaller than dim=", (dim), " (rows would overlap)");          \
  } while (0)
