// ATen entry points of the shared-memory collectives (csrc/comm/shm_ops.cpp). A group is
// named by an integer handle returned by shm_create.
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace tp_numa {

int64_t shm_create(const std::string& prefix, int64_t local_rank, c10::IntArrayRef ranks,
                   int64_t slot_bytes, double timeout_s);
void shm_attach(int64_t handle);
void shm_unlink(int64_t handle);
void shm_destroy(int64_t handle);
bool shm_signal_abort(int64_t handle, int64_t rank);

// t <- sum over the group's ranks (in place); float32, bfloat16 or float16, contiguous.
void shm_all_reduce(const at::Tensor& t, int64_t handle);
// out <- concat along dim 0 of every rank's t (sizes[p] rows from rank p), on `root`
// (root < 0: on every rank). t contiguous with sizes[local rank] rows.
void shm_all_gather(const at::Tensor& t, const at::Tensor& out, int64_t handle, c10::IntArrayRef sizes,
                    int64_t root);
// t <- t of local rank src (in place), contiguous.
void shm_broadcast(const at::Tensor& t, int64_t handle, int64_t src);

// Address of the PyMethodDef table of the fast Python entry points (shm_python.cpp).
int64_t shm_fast_path_table();

}  // namespace tp_numa
