// Python entry point of paradis_fast._C. Importing it loads this library, whose static initialisers
// register the paradis ops with the dispatcher (torch.ops.paradis); its one function reports what
// the CPU sliced convolution decided per layer shape (paradis_fast.ops.explain).
#include <Python.h>

#include "cpu/sliced_conv2d.h"

#include <exception>
#include <string>
#include <vector>

namespace {

PyObject* sliced_conv2d_decisions(PyObject*, PyObject*) {
  std::vector<std::string> lines;
  try {
    lines = paradis::sliced_conv2d_decisions();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(lines.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < lines.size(); ++i) {
    PyObject* line = PyUnicode_FromStringAndSize(lines[i].data(), static_cast<Py_ssize_t>(lines[i].size()));
    if (!line) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), line);
  }
  return list;
}

PyMethodDef methods[] = {{"sliced_conv2d_decisions", sliced_conv2d_decisions, METH_NOARGS,
                          "The CPU sliced_conv2d's path per layer shape seen, the most recently run first."},
                         {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
