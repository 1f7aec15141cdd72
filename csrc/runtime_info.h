// Build and runtime facts about the native extension: was it built with CUDA, which devices it sees.
#pragma once

#include <string>
#include <vector>

namespace offload_kernels {

struct DeviceInfo {
  int index = 0;
  std::string name;
  size_t total_memory = 0;
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
};

struct RuntimeInfo {
  bool built_with_cuda = false;
  int cuda_runtime_version = 0;   // as CUDART_VERSION (e.g. 13000), 0 when built host-only
  int cuda_driver_version = 0;    // 0 when no driver is installed
  int device_count = 0;
  std::string device_error;       // why no device is usable, empty when devices were found
  std::vector<DeviceInfo> devices;
};

// Never throws: a machine without a driver or GPU reports device_count = 0 and the reason.
RuntimeInfo query_runtime_info();

}  // namespace offload_kernels
