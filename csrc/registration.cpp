// The one place where every tp_numa op is declared (schema) and bound to its CPU kernel.
// Fake (meta) implementations live next to the Python wrappers (tp_numa/ops.py,
// tp_numa/distributed/shm.py) so torch.compile can trace the ops.
#include <torch/library.h>

#include "attention/attention_ops.h"
#include "comm/shm_ops.h"
#include "decode/decode_plan.h"
#include "fused/fused_ops.h"
#include "memory/weight_memory.h"
#include "moe/moe_ops.h"
#include "quant/quant_ops.h"

TORCH_LIBRARY(tp_numa, m) {
    // ---- quantized linear (csrc/quant) ----
    m.def("quant_matmul(Tensor x, Tensor w, int qtype) -> Tensor");
    m.def("quant_matmul_exact(Tensor x, Tensor w, int qtype, bool to_float32=False) -> Tensor");
    m.def("dequantize(Tensor w, int qtype) -> Tensor");
    m.def("quantize_q8_0(Tensor x) -> Tensor");
    m.def("pack_x4(Tensor w, int qtype) -> Tensor");
    m.def("unpack_x4(Tensor wp, int qtype, int n) -> Tensor");
    m.def("quant_matmul_x4(Tensor x, Tensor wp, int qtype, int n) -> Tensor");
    m.def("quant_matmul_x4_exact(Tensor x, Tensor wp, int qtype, int n, bool to_float32=False) -> Tensor");
    // no tensor arguments: bound here as catch-all kernels
    m.def("kernel_isa() -> str", &tp_numa::kernel_isa);
    m.def("set_kernel_isa(str isa) -> ()", &tp_numa::set_kernel_isa);
    m.def("read_bandwidth_probe(Tensor buf, int repeats, int streams=8, int prefetch_bytes=0) -> float");

    // ---- weight storage (csrc/memory) ----
    m.def("empty_weight(int[] size) -> Tensor", &tp_numa::empty_weight);

    // ---- shared-memory collectives (csrc/comm) ----
    // group lifetime (no tensor arguments: catch-all kernels); handle = small integer
    m.def("shm_create(str prefix, int local_rank, int[] ranks, int slot_bytes, float timeout_s) -> int",
          &tp_numa::shm_create);
    m.def("shm_attach(int handle) -> ()", &tp_numa::shm_attach);
    m.def("shm_unlink(int handle) -> ()", &tp_numa::shm_unlink);
    m.def("shm_destroy(int handle) -> ()", &tp_numa::shm_destroy);
    m.def("shm_signal_abort(int handle, int rank) -> bool", &tp_numa::shm_signal_abort);
    m.def("shm_all_reduce(Tensor(a!) t, int handle) -> ()");
    m.def("shm_all_gather(Tensor t, Tensor(a!) out, int handle, int[] sizes, int root) -> ()");
    m.def("shm_broadcast(Tensor(a!) t, int handle, int src) -> ()");
    m.def("shm_fast_path_table() -> int", &tp_numa::shm_fast_path_table);

    // ---- attention (csrc/attention) ----
    m.def("attn_decode(Tensor q, Tensor k_cache, Tensor v_cache, int n_keys, float scale) -> Tensor");
    m.def("attn_decode_update(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, int slot, "
          "int n_keys, float scale) -> Tensor");
    m.def("attn_prefill(Tensor q, Tensor k, Tensor v, int n_keys, int q_offset, float scale, int window) -> Tensor");

    // ---- fused small row ops (csrc/fused) ----
    m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
    m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor w, float eps, Tensor? x_weight=None) -> Tensor");
    m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, bool neox) -> ()");
    m.def("act_mul(Tensor gu, bool gelu) -> Tensor");

    // ---- mixture of experts (csrc/moe) ----
    m.def("moe_route(Tensor logits, Tensor? bias, int k, int gating, bool norm, float scale, int n_groups, "
          "int groups_used) -> (Tensor, Tensor)");
    m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor[] mats, Tensor offsets, Tensor ff, int[] qtypes, "
          "int[] layouts, bool gelu) -> Tensor");

    // ---- native decode step over a rank's decoder layers (csrc/decode) ----
    // torch.classes.tp_numa.DecodePlan: built once from the loaded modules, one call per decode step (M sequences)
    m.class_<tp_numa::DecodePlan>("DecodePlan")
        .def(torch::init<int64_t, double, int64_t>())
        .def("add_layer", &tp_numa::DecodePlan::add_layer)
        .def("set_linear", &tp_numa::DecodePlan::set_linear)
        .def("set_moe", &tp_numa::DecodePlan::set_moe)
        .def("forward", &tp_numa::DecodePlan::forward)
        .def("n_layers", &tp_numa::DecodePlan::n_layers)
        .def("n_seqs", &tp_numa::DecodePlan::n_seqs);
}

TORCH_LIBRARY_IMPL(tp_numa, CPU, m) {
    m.impl("quant_matmul", &tp_numa::quant_matmul);
    m.impl("quant_matmul_exact", &tp_numa::quant_matmul_exact);
    m.impl("dequantize", &tp_numa::dequantize);
    m.impl("quantize_q8_0", &tp_numa::quantize_q8_0);
    m.impl("pack_x4", &tp_numa::pack_x4);
    m.impl("unpack_x4", &tp_numa::unpack_x4);
    m.impl("quant_matmul_x4", &tp_numa::quant_matmul_x4);
    m.impl("quant_matmul_x4_exact", &tp_numa::quant_matmul_x4_exact);
    m.impl("read_bandwidth_probe", &tp_numa::read_bandwidth_probe);
    // shared-memory collectives
    m.impl("shm_all_reduce", &tp_numa::shm_all_reduce);
    m.impl("shm_all_gather", &tp_numa::shm_all_gather);
    m.impl("shm_broadcast", &tp_numa::shm_broadcast);
    // attention
    m.impl("attn_decode", &tp_numa::attn_decode);
    m.impl("attn_decode_update", &tp_numa::attn_decode_update);
    m.impl("attn_prefill", &tp_numa::attn_prefill);
    // fused small row ops
    m.impl("rms_norm", &tp_numa::rms_norm);
    m.impl("add_rms_norm_", &tp_numa::add_rms_norm_);
    m.impl("rope_", &tp_numa::rope_);
    m.impl("act_mul", &tp_numa::act_mul);
    // mixture of experts
    m.impl("moe_route", &tp_numa::moe_route);
    m.impl("moe_experts", &tp_numa::moe_experts);
}

// The extension module tp_numa._C: importing it runs the registrations above.
#include <Python.h>
static struct PyModuleDef tp_numa_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tp_numa_module); }
