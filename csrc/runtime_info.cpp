#include "runtime_info.h"

#if OK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace offload_kernels {

RuntimeInfo query_runtime_info() {
  RuntimeInfo info;
#if OK_WITH_CUDA
  info.built_with_cuda = true;
  info.cuda_runtime_version = CUDART_VERSION;
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess) info.cuda_driver_version = driver;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info.device_error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return info;
  }
  info.device_count = count;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    DeviceInfo d;
    d.index = i;
    d.name = prop.name;
    d.total_memory = prop.totalGlobalMem;
    d.major = prop.major;
    d.minor = prop.minor;
    d.multiprocessors = prop.multiProcessorCount;
    info.devices.push_back(d);
  }
  if (count == 0) info.device_error = "no CUDA device found";
#else
  info.device_error = "extension built without CUDA (host-only build)";
#endif
  return info;
}

}  // namespace offload_kernels
