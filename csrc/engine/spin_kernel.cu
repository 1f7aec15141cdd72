// A device kernel that busy-waits for a given number of clock cycles: the synthetic "compute" that the
// overlap tests and benchmarks run against copies.
#include <cuda_runtime.h>

#include "engine/spin_kernel.h"

namespace offload_kernels {

__global__ void spin_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

cudaError_t launch_spin_kernel(long long cycles, cudaStream_t stream) {
  spin_kernel<<<1, 1, 0, stream>>>(cycles);
  return cudaGetLastError();
}

}  // namespace offload_kernels
