/* _scan.c: the server stream's header walk (BackendStream.feed's loop) in C.
 *
 * Optional: setup.py builds it when a C compiler is there, and stream.py falls back
 * to scan_backend_py, its line-for-line Python twin, when it is not. Both take and
 * return the same things; tests/unit/test_protocol_scan.py runs every case through
 * both. Pure like the rest of proxy/protocol: bytes in, positions and decisions out.
 *
 * Why C: a COPY or a large result is one small message per row (10 million messages
 * per GB at ~100 bytes a row), and walking their headers in Python was most of the
 * pooler's CPU per byte relayed.
 *
 * The client side's walk stays in Python: tried in C, the call with its state in and
 * out cost as much as the loop for the one message of a simple Query (relay_cpu:
 * simple 4.8 -> 5.0 us, extended 6.6 -> 6.4), and clients send bulk COPY data in
 * 8-32 KB messages, so there is no per-row kernel on that side.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* How a scan stopped; the caller keeps the state (see stream.py). */
#define STOP_HOLD 0       /* at pos: a partial header, or an interesting message not yet whole */
#define STOP_SKIP 1       /* an uninteresting message runs past the chunk by `extra` bytes */
#define STOP_BAD_LENGTH 2 /* the message at pos declares length `extra`: out of range */

static PyObject *
scan_backend(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "scan_backend(data, pos, interesting, max_length) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long long max_length = PyLong_AsUnsignedLongLong(args[3]);
    if (max_length == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer data, table;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &table, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *events = NULL;
    PyObject *result = NULL;
    if (table.len != 256) {
        PyErr_SetString(PyExc_ValueError, "interesting must be a 256-entry table");
        goto done;
    }
    if (pos < 0 || pos > data.len) {
        PyErr_SetString(PyExc_ValueError, "pos is outside data");
        goto done;
    }
    const unsigned char *buf = (const unsigned char *)data.buf;
    const unsigned char *want = (const unsigned char *)table.buf;
    Py_ssize_t n = data.len;
    int stop;
    long long extra = 0;
    for (;;) {
        if (n - pos < 5) {
            stop = STOP_HOLD;
            break;
        }
        unsigned char typ = buf[pos];
        uint32_t length = ((uint32_t)buf[pos + 1] << 24) | ((uint32_t)buf[pos + 2] << 16) |
                          ((uint32_t)buf[pos + 3] << 8) | (uint32_t)buf[pos + 4];
        if (length < 4 || (unsigned long long)length > max_length) {
            stop = STOP_BAD_LENGTH;
            extra = length;
            break;
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (want[typ]) {
            if (end > n) {
                stop = STOP_HOLD;
                break;
            }
            PyObject *event = Py_BuildValue("(Bnn)", typ, pos, end);
            if (event == NULL) {
                goto done;
            }
            if (events == NULL) {
                events = PyList_New(0);
                if (events == NULL) {
                    Py_DECREF(event);
                    goto done;
                }
            }
            int failed = PyList_Append(events, event);
            Py_DECREF(event);
            if (failed) {
                goto done;
            }
        }
        else if (end > n) {
            stop = STOP_SKIP;
            extra = end - n;
            break;
        }
        pos = end;
    }
    result = Py_BuildValue("(nOiL)", pos, events ? events : Py_None, stop, extra);
done:
    Py_XDECREF(events);
    PyBuffer_Release(&table);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef scan_methods[] = {
    {"scan_backend", (PyCFunction)(void (*)(void))scan_backend, METH_FASTCALL,
     "scan_backend(data, pos, interesting, max_length) -> (pos, events, stop, extra)\n\n"
     "Walk whole message headers from pos; see stream.scan_backend_py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_scan",
    .m_doc = "BackendStream's header walk in C (optional).",
    .m_size = 0,
    .m_methods = scan_methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&scan_module);
}
