/* Locust's count of running users by class, compiled.
 *
 * Why C: a Locust worker asks Runner.user_classes_count about ten times per spawn message
 * and once per stats report, and each time walks every user greenlet. At 10,000 listeners
 * that walk in Python (loadtests/locustfile.py, counted_user_classes) was a fifth of the
 * worker's CPU during the ramp and a tenth at ramp-down (py-spy), 2.6 ms per call; here it
 * is the walk alone.
 *
 * count_first_argument_types(greenlets) -> {type: count}
 *
 *   For each greenlet of the iterable whose `args` is a non-empty tuple, the type of
 *   args[0] (Locust's user) is counted; empty args (a greenlet that died) are not, as in
 *   Locust's own count. `args` that is not a tuple raises TypeError: the caller then walks
 *   in Python. tests/test_locust_internals.py holds the result to Locust's own count.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *s_args;

/* Adds `pending` to the count of `kind` in `counts`; 0, or -1 on an error. */
static int
add_count(PyObject *counts, PyObject *kind, Py_ssize_t pending)
{
    PyObject *count, *sum;
    Py_ssize_t before = 0;
    int result;

    if (kind == NULL || pending == 0)
        return 0;
    count = PyDict_GetItemWithError(counts, kind);
    if (count == NULL && PyErr_Occurred())
        return -1;
    if (count != NULL && (before = PyLong_AsSsize_t(count)) == -1 && PyErr_Occurred())
        return -1;
    if ((sum = PyLong_FromSsize_t(before + pending)) == NULL)
        return -1;
    result = PyDict_SetItem(counts, kind, sum);
    Py_DECREF(sum);
    return result;
}

static PyObject *
count_first_argument_types(PyObject *self, PyObject *greenlets)
{
    PyObject *iterator, *item, *args, *counts, *kind = NULL;
    Py_ssize_t pending = 0;  /* greenlets of `kind` not yet added to `counts` */

    if ((counts = PyDict_New()) == NULL)
        return NULL;
    if ((iterator = PyObject_GetIter(greenlets)) == NULL)
        goto fail;
    while ((item = PyIter_Next(iterator)) != NULL) {
        args = PyObject_GetAttr(item, s_args);
        Py_DECREF(item);
        if (args == NULL)
            goto fail;
        if (!PyTuple_Check(args)) {
            Py_DECREF(args);
            PyErr_SetString(PyExc_TypeError, "a greenlet's args is not a tuple");
            goto fail;
        }
        if (PyTuple_GET_SIZE(args) > 0) {
            PyObject *type = (PyObject *)Py_TYPE(PyTuple_GET_ITEM(args, 0));
            if (type != kind) {
                /* Users of one class mostly come together: count a run, then add it. */
                if (add_count(counts, kind, pending) < 0) {
                    Py_DECREF(args);
                    goto fail;
                }
                Py_XDECREF(kind);
                Py_INCREF(type);
                kind = type;
                pending = 0;
            }
            pending++;
        }
        Py_DECREF(args);
    }
    if (PyErr_Occurred() || add_count(counts, kind, pending) < 0)
        goto fail;
    Py_DECREF(iterator);
    Py_XDECREF(kind);
    return counts;
fail:
    Py_XDECREF(iterator);
    Py_XDECREF(kind);
    Py_DECREF(counts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"count_first_argument_types", count_first_argument_types, METH_O,
     "{type of args[0]: count} over the greenlets whose args are not empty."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_usercount", "Locust's count of users by class, compiled (see loadtests/locustfile.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__usercount(void)
{
    if ((s_args = PyUnicode_InternFromString("args")) == NULL)
        return NULL;
    return PyModule_Create(&module_definition);
}
