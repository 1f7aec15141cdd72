// CUDA error checking and a device guard for the engine's CUDA code. Only meaningful in a CUDA build.
#pragma once

#if OK_WITH_CUDA
#include <cuda_runtime_api.h>

namespace offload_kernels {

// Throws std::runtime_error naming the CUDA error, the failing expression and its call site.
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);

// Clears cudaErrorNotReady (a status, not a failure) from the runtime's last-error slot so that later
// cudaGetLastError() checks, such as a kernel-launch check, do not report it.
inline void clear_not_ready(cudaError_t err) {
  if (err == cudaErrorNotReady) (void)cudaGetLastError();
}

// Makes `device` current for the scope and restores the previous device afterwards. The driver's current
// context is shared with torch's own CUDA runtime, so leaving it switched would move torch's current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace offload_kernels

#define OK_CUDA_CHECK(expr)                                                     \
  do {                                                                          \
    const cudaError_t ok_cuda_err_ = (expr);                                    \
    if (ok_cuda_err_ != cudaSuccess) {                                          \
      (void)cudaGetLastError();                                                 \
      ::offload_kernels::throw_cuda_error(ok_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                           \
  } while (0)

#endif  // OK_WITH_CUDA
