// Functions shared by the CPU and the device: KVTP_HOST_DEVICE marks them for nvcc, nothing for
// the host compiler.
#pragma once

#ifdef __CUDACC__
#define KVTP_HOST_DEVICE __host__ __device__
#else
#define KVTP_HOST_DEVICE
#endif
