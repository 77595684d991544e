// Storage for weights that are streamed once per token: 2 MiB-aligned, on transparent huge
// pages where the kernel allows it (csrc/memory/weight_memory.cpp).
#pragma once

#include <ATen/ATen.h>

namespace tp_numa {

// An uninitialised uint8 tensor of `sizes` for a weight. From 2 MiB on, its storage is a
// private anonymous mapping whose whole 2 MiB pages are madvise(MADV_HUGEPAGE)d before
// anything touches them, so the first touch (by the rank bound to its NUMA node) places
// node-local huge pages: one TLB entry per 2 MiB of a streamed weight instead of 512.
// Smaller tensors, TP_NUMA_HUGEPAGES=0, or a kernel without THP give ordinary memory.
at::Tensor empty_weight(at::IntArrayRef sizes);

}  // namespace tp_numa
