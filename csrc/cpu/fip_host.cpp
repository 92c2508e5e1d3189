// fip_host: the per-tensor host work of one FIP.step() in C++ — read every gradient, compare its address with the
// last step's, bump the parameters' version counters — so that a steady-state step costs the same few
// microseconds for 300 tensors as for 3.  A CPython extension module (no pybind11) built on first use against the
// installed torch's headers by fip_fast/backends/host.py, which also holds the pure-Python versions of these
// functions (same results; used until this module is built, or when it cannot be).
//
// Only plain tensors are handled here (exact torch.Tensor / torch.nn.Parameter, as registered by init()); any
// other object in a list makes a function return NotImplemented, and the caller takes the Python version.
#include <Python.h>

#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

PyObject* g_tensor_type = nullptr;     // torch.Tensor
PyObject* g_parameter_type = nullptr;  // torch.nn.Parameter

constexpr int kAbiVersion = 1;

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
    {"same_items", same_items, METH_VARARGS, "a[i] is b[i] for all i (and equal lengths)"},
    {"bump_versions", bump_versions, METH_O, "advance the version counter of every tensor of a list"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "fip_host", "fip_fast's per-step host work in C++", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit_fip_host(void) { return PyModule_Create(&kModule); }
