// Fast Python entry points for the two per-layer collectives (all-reduce, broadcast).
//
// Why: calling a registered op from Python (torch.ops.tp_numa.shm_all_reduce) costs
// 2-5 us of argument boxing and dispatch, more than the whole 16 KB shared-memory
// all-reduce. Decode runs two all-reduces per layer, so eager mode calls these METH_FASTCALL
// functions instead (~0.1 us). They run the very same checks and kernels as the
// registered ops, which stay the schema'd, traceable entry points (torch.compile).
//
// The functions are not added to tp_numa._C's module table (that is shared); the op
// shm_fast_path_table() returns the address of the PyMethodDef array and
// tp_numa/distributed/shm.py turns each entry into a builtin with PyCFunction_NewEx.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>

#include "comm/shm_ops.h"

namespace tp_numa {
namespace {

bool parse(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, const char* name, const at::Tensor** t,
           int64_t* ints) {
    if (nargs != want || !THPVariable_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s(tensor, handle%s)", name, want == 3 ? ", src" : "");
        return false;
    }
    *t = &THPVariable_Unpack(args[0]);
    for (Py_ssize_t i = 1; i < nargs; ++i) {
        ints[i - 1] = PyLong_AsLongLong(args[i]);
        if (ints[i - 1] == -1 && PyErr_Occurred()) return false;
    }
    return true;
}

template <typename Fn>
PyObject* run_without_gil(Fn&& fn) {
    std::string error;
    Py_BEGIN_ALLOW_THREADS
    try {
        fn();
    } catch (const std::exception& e) {
        error = e.what();
        if (error.empty()) error = "tp_numa shm: collective failed";
    }
    Py_END_ALLOW_THREADS
    if (!error.empty()) {
        PyErr_SetString(PyExc_RuntimeError, error.c_str());
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyObject* fast_all_reduce(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    const at::Tensor* t;
    int64_t ints[1];
    if (!parse(args, nargs, 2, "shm_all_reduce", &t, ints)) return nullptr;
    return run_without_gil([&] { shm_all_reduce(*t, ints[0]); });
}

PyObject* fast_broadcast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    const at::Tensor* t;
    int64_t ints[2];
    if (!parse(args, nargs, 3, "shm_broadcast", &t, ints)) return nullptr;
    return run_without_gil([&] { shm_broadcast(*t, ints[0], ints[1]); });
}

PyMethodDef g_methods[] = {
    {"shm_all_reduce", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_all_reduce)), METH_FASTCALL,
     "shm_all_reduce(t, handle): in-place sum over the host's ranks"},
    {"shm_broadcast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_broadcast)), METH_FASTCALL,
     "shm_broadcast(t, handle, src): in place, from local rank src"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

int64_t shm_fast_path_table() { return static_cast<int64_t>(reinterpret_cast<intptr_t>(&g_methods[0])); }

}  // namespace tp_numa
