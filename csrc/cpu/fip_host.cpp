// fip_host: the per-tensor host work of one FIP.step() in C++ — read every gradient, compare its address with the
// last step's, check that no parameter or state tensor moved since the step plan was made, bump the parameters'
// version counters — so that a steady-state step costs the same few
// microseconds for 300 tensors as for 3.  A CPython extension module (no pybind11) built on first use against the
// installed torch's headers by fip_fast/backends/host.py, which also holds the pure-Python versions of these
// functions (same results; used until this module is built, or when it cannot be).
//
// Only plain tensors are handled here (exact torch.Tensor / torch.nn.Parameter, as registered by init()); any
// other object in a list makes a function return NotImplemented, and the caller takes the Python version.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

PyObject* g_tensor_type = nullptr;     // torch.Tensor
PyObject* g_parameter_type = nullptr;  // torch.nn.Parameter

constexpr int kAbiVersion = 2;

inline bool plain(PyObject* obj) {
    PyObject* t = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    return t == g_tensor_type || t == g_parameter_type;
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// init(torch.Tensor, torch.nn.Parameter) -> abi version
PyObject* init(PyObject*, PyObject* args) {
    PyObject *tensor_type, *parameter_type;
    if (!PyArg_ParseTuple(args, "OO", &tensor_type, &parameter_type)) return nullptr;
    Py_XDECREF(g_tensor_type);
    Py_XDECREF(g_parameter_type);
    Py_INCREF(tensor_type);
    Py_INCREF(parameter_type);
    g_tensor_type = tensor_type;
    g_parameter_type = parameter_type;
    return PyLong_FromLong(kAbiVersion);
}

// read_grads(params: list, prev: tuple | None) -> (grads: list, ptrs: tuple, has_none: bool) | NotImplemented
//
// grads[i] = params[i].grad; ptrs[i] = its data_ptr() (None for a missing or sparse gradient); has_none: some
// ptrs[i] is None.  When every pointer equals prev's, ``ptrs`` *is* ``prev`` (the caller's cache keys then match
// by identity, item by item).  Holds no reference to any gradient after it returns.
PyObject* read_grads(PyObject*, PyObject* args) {
    PyObject *params, *prev;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &params, &prev)) return nullptr;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    const bool have_prev = PyTuple_Check(prev) && PyTuple_GET_SIZE(prev) == n;
    for (Py_ssize_t i = 0; i < n; ++i)
        if (!plain(PyList_GET_ITEM(params, i))) return not_implemented();
    PyObject* grads = PyList_New(n);
    if (!grads) return nullptr;
    std::vector<void*> addr(static_cast<size_t>(n));
    std::vector<char> none(static_cast<size_t>(n));    // a missing or sparse gradient (an empty one has address 0)
    bool has_none = false, same = have_prev;
    try {
        for (Py_ssize_t i = 0; i < n; ++i) {
            const at::Tensor& g = THPVariable_Unpack(PyList_GET_ITEM(params, i)).grad();
            PyObject* gobj;
            if (!g.defined()) {
                addr[i] = nullptr;
                gobj = Py_None;
                Py_INCREF(gobj);
            } else {
                gobj = THPVariable_Wrap(g);
                if (!gobj) { Py_DECREF(grads); return nullptr; }
                if (!plain(gobj)) { Py_DECREF(gobj); Py_DECREF(grads); return not_implemented(); }
                addr[i] = g.is_sparse() ? nullptr : g.data_ptr();   // a sparse tensor has no single address
            }
            PyList_SET_ITEM(grads, i, gobj);
            none[i] = gobj == Py_None || g.is_sparse();
            has_none = has_none || none[i];
            if (same) {
                PyObject* old = PyTuple_GET_ITEM(prev, i);
                same = none[i] ? old == Py_None
                               : (old != Py_None && PyLong_Check(old) && PyLong_AsVoidPtr(old) == addr[i]);
            }
        }
    } catch (const std::exception& e) {
        Py_DECREF(grads);
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }
    PyObject* ptrs;
    if (same) {
        ptrs = prev;
        Py_INCREF(ptrs);
    } else {
        ptrs = PyTuple_New(n);
        if (!ptrs) { Py_DECREF(grads); return nullptr; }
        for (Py_ssize_t i = 0; i < n; ++i) {
            PyObject* v = none[i] ? (Py_INCREF(Py_None), Py_None) : PyLong_FromVoidPtr(addr[i]);
            if (!v) { Py_DECREF(ptrs); Py_DECREF(grads); return nullptr; }
            PyTuple_SET_ITEM(ptrs, i, v);
        }
    }
    return Py_BuildValue("(NNO)", grads, ptrs, has_none ? Py_True : Py_False);
}

// The word addresses() records per tensor: its data_ptr() — what Tensor.data_ptr() returns, 0 for an empty tensor
// or one without storage (as host.py's _py_addresses records) — read from the TensorImpl's fields: a third of the
// time of at::Tensor::data_ptr() with its checks (has_storage() alone doubles it), and this is the per-tensor cost
// of every planned step.  unsafe_storage() is what storage() returns without the throwing check for tensors
// without storage (sparse), whose Storage is null.
inline uint64_t address_word(PyObject* obj) {
    const c10::TensorImpl* impl = THPVariable_Unpack(obj).unsafeGetTensorImpl();
    const c10::Storage& st = impl->unsafe_storage();
    if (!st || impl->numel() == 0) return 0;
    const char* base = static_cast<const char*>(st.data());
    return base ? reinterpret_cast<uintptr_t>(base + impl->storage_offset() * impl->itemsize()) : 0;
}

// addresses(tensors: list) -> bytes | NotImplemented: the address word of every tensor (8 bytes each, native
// order), what a step plan records when it is made and same_addresses() compares against.
PyObject* addresses(PyObject*, PyObject* arg) {
    if (!PyList_Check(arg)) return not_implemented();
    const Py_ssize_t n = PyList_GET_SIZE(arg);
    for (Py_ssize_t i = 0; i < n; ++i)
        if (!plain(PyList_GET_ITEM(arg, i))) return not_implemented();
    PyObject* out = PyBytes_FromStringAndSize(nullptr, n * 8);
    if (!out) return nullptr;
    char* dst = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; ++i) {
        const uint64_t w = address_word(PyList_GET_ITEM(arg, i));
        std::memcpy(dst + 8 * i, &w, 8);
    }
    return out;
}

// same_addresses(tensors: list, recorded: bytes) -> bool | NotImplemented: addresses(tensors) == recorded, without
// building the bytes (the check every planned step makes; it stops at the first tensor that moved).
PyObject* same_addresses(PyObject*, PyObject* args) {
    PyObject *tensors, *recorded;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &tensors, &PyBytes_Type, &recorded)) return nullptr;
    const Py_ssize_t n = PyList_GET_SIZE(tensors);
    if (PyBytes_GET_SIZE(recorded) != n * 8) Py_RETURN_FALSE;
    const char* rec = PyBytes_AS_STRING(recorded);
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* obj = PyList_GET_ITEM(tensors, i);
        if (!plain(obj)) return not_implemented();
        const uint64_t w = address_word(obj);
        if (std::memcmp(rec + 8 * i, &w, 8) != 0) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

// same_items(a: list, b: list) -> bool: equal length and a[i] is b[i] for every i
PyObject* same_items(PyObject*, PyObject* args) {
    PyObject *a, *b;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &a, &PyList_Type, &b)) return nullptr;
    const Py_ssize_t n = PyList_GET_SIZE(a);
    bool same = n == PyList_GET_SIZE(b);
    for (Py_ssize_t i = 0; same && i < n; ++i) same = PyList_GET_ITEM(a, i) == PyList_GET_ITEM(b, i);
    return PyBool_FromLong(same);
}

// bump_versions(tensors: list) -> None | NotImplemented: what torch.autograd.graph.increment_version(list) does
// for plain tensors (inference tensors, which have no version counter, are skipped as there).
PyObject* bump_versions(PyObject*, PyObject* arg) {
    if (!PyList_Check(arg)) return not_implemented();
    const Py_ssize_t n = PyList_GET_SIZE(arg);
    for (Py_ssize_t i = 0; i < n; ++i)
        if (!plain(PyList_GET_ITEM(arg, i))) return not_implemented();
    try {
        for (Py_ssize_t i = 0; i < n; ++i) {
            c10::TensorImpl* impl = THPVariable_Unpack(PyList_GET_ITEM(arg, i)).unsafeGetTensorImpl();
            if (!impl->is_inference()) impl->bump_version();    // inference tensors have no counter: skipped
        }
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"init", init, METH_VARARGS, "init(torch.Tensor, torch.nn.Parameter) -> ABI version"},
    {"read_grads", read_grads, METH_VARARGS, "(grads, ptrs, missing) of a list of parameters"},
    {"addresses", addresses, METH_O, "the address and layout words of every tensor of a list (bytes)"},
    {"same_addresses", same_addresses, METH_VARARGS, "addresses(tensors) == recorded"},
    {"same_items", same_items, METH_VARARGS, "a[i] is b[i] for all i (and equal lengths)"},
    {"bump_versions", bump_versions, METH_O, "advance the version counter of every tensor of a list"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "fip_host", "fip_fast's per-step host work in C++", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit_fip_host(void) { return PyModule_Create(&kModule); }
