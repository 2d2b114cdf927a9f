// The Python extension module selfheal_ext._C. Importing it loads the shared
// library, whose static initialisers register the selfheal ops with the
// dispatcher; the module itself holds no functions.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "selfheal_ext compiled ops", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
