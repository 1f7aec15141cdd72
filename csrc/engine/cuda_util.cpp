#include "engine/cuda_util.h"

#if OK_WITH_CUDA
#include <stdexcept>
#include <string>

namespace offload_kernels {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                           ") in `" + expr + "` at " + file + ":" + std::to_string(line));
}

DeviceGuard::DeviceGuard(int device) {
  OK_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) {
    OK_CUDA_CHECK(cudaSetDevice(device));
    switched_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (switched_) (void)cudaSetDevice(previous_);  // a destructor must not throw; restoring is best effort
}

}  // namespace offload_kernels
#endif  // OK_WITH_CUDA
