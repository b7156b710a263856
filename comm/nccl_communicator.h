// The Communicator on GPUs: NCCL collectives over device memory (every pointer passed in is a
// device pointer), bootstrapped through another communicator (MPI) as nccl-tests do — rank 0
// makes the NCCL unique id, the bootstrap broadcasts it, every rank joins. Collectives are
// stream-ordered, not blocking: each is queued on the legacy default stream behind the kernels
// that produce its input, and the host sees the result after any synchronising copy
// (cudaMemcpy to the host) or barrier(), which waits.
// Built only with the CUDA backend; NVLink multicast stays off (NCCL_NVLS_ENABLE=0 on the lent
// multi-GPU machines, where it can take shared GPUs out of service).
#pragma once
#include <memory>

#include "comm/communicator.h"

namespace kvtp::comm {

// Joins the ranks of `bootstrap` into an NCCL communicator on CUDA device `device`.
std::unique_ptr<Communicator> makeNccl(Communicator& bootstrap, int device);

}  // namespace kvtp::comm
