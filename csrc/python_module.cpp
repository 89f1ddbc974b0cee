// Python entry point of paradis_fast._C. The module has no functions: importing it loads this
// library, whose static initialisers register the paradis ops with the dispatcher (torch.ops.paradis).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
