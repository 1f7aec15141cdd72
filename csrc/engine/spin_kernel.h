// The busy-wait kernel in spin_kernel.cu (CUDA builds only): synthetic compute for overlap tests and
// benchmarks.
#pragma once

#if OK_WITH_CUDA
#include <cuda_runtime_api.h>

namespace offload_kernels {
// Enqueues a one-thread kernel that spins for `cycles` SM clock cycles on `stream`; returns the launch error.
cudaError_t launch_spin_kernel(long long cycles, cudaStream_t stream);
}  // namespace offload_kernels
#endif
