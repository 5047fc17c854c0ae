/* The request-line search of prefilter.key_reader, in C.
 *
 * Every request a worker serves with --session-key on passes through that search, and most find
 * nothing. As a Python function it costs a serving worker one to three microseconds a request
 * under load, most of it the function's frame rather than its byte searches. This one answers
 * what it is sure of, exactly as the Python function would: "no marker in the request line"
 * (false, or what the header regex says of the rest), and, given the line key (keys.line_pattern),
 * the key that its regex reads from a line with a marker (every poll of an Engine.IO session),
 * calling that same regex. Everything else (a blank line first, a marker and no line key,
 * arguments out of the ordinary) is handed to the Python function itself, which stays the one
 * definition of the answer. (One difference, where no regex of line_pattern's can lead: a match
 * whose group or end lies outside the head is "parse it" here, an exception there.)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    PyObject *needles; /* tuple of bytes: the markers looked for in the request line */
    PyObject *fields;  /* the header regex's search, or None */
    PyObject *read;    /* the Python function this one answers for */
    PyObject *match;   /* the line key's regex match(data, start), or None */
    PyObject *name;    /* the line key's parameter name (bytes), or None */
    Py_ssize_t max_head; /* a head longer than this is not read by the line key */
} LineSearch;

/* No GC support: the references are a tuple of bytes, bytes, regexes' bound methods and a closure
 * over neither this object nor anything that could hold it, so no cycle can run through it. */
static void LineSearch_dealloc(LineSearch *self) {
    Py_XDECREF(self->needles);
    Py_XDECREF(self->fields);
    Py_XDECREF(self->read);
    Py_XDECREF(self->match);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int LineSearch_init(LineSearch *self, PyObject *args, PyObject *kwds) {
    static char *keywords[] = {"needles", "fields", "read", "line_key", "max_head", NULL};
    PyObject *needles, *fields, *read, *line_key = Py_None;
    Py_ssize_t max_head = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO|On:LineSearch", keywords, &PyTuple_Type, &needles,
                                     &fields, &read, &line_key, &max_head))
        return -1;
    if (self->read != NULL) {
        /* Made once: a read in progress borrows these references, which a second __init__ (run
         * by code the regex or the Python read calls) would otherwise free under it. */
        PyErr_SetString(PyExc_TypeError, "LineSearch: already initialised");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(needles); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(needles, i))) {
            PyErr_SetString(PyExc_TypeError, "LineSearch: needles must be a tuple of bytes");
            return -1;
        }
    }
    if (fields != Py_None && !PyCallable_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "LineSearch: fields must be callable or None");
        return -1;
    }
    if (!PyCallable_Check(read)) {
        PyErr_SetString(PyExc_TypeError, "LineSearch: read must be callable");
        return -1;
    }
    PyObject *match = Py_None, *name = Py_None;
    if (line_key != Py_None) {
        /* keys.LinePattern: (match, name), a name that is never empty. */
        if (!PyTuple_Check(line_key) || PyTuple_GET_SIZE(line_key) != 2 ||
            !PyCallable_Check(PyTuple_GET_ITEM(line_key, 0)) || !PyBytes_CheckExact(PyTuple_GET_ITEM(line_key, 1)) ||
            PyBytes_GET_SIZE(PyTuple_GET_ITEM(line_key, 1)) == 0) {
            PyErr_SetString(PyExc_TypeError, "LineSearch: line_key must be (match, name) or None");
            return -1;
        }
        if (max_head < 0) {
            /* The Python read's MAX_HEAD, passed on: a default would be a second copy of it. */
            PyErr_SetString(PyExc_TypeError, "LineSearch: line_key needs max_head >= 0");
            return -1;
        }
        match = PyTuple_GET_ITEM(line_key, 0);
        name = PyTuple_GET_ITEM(line_key, 1);
    }
    Py_INCREF(needles);
    Py_INCREF(fields);
    Py_INCREF(read);
    Py_INCREF(match);
    Py_INCREF(name);
    Py_XSETREF(self->needles, needles);
    Py_XSETREF(self->fields, fields);
    Py_XSETREF(self->read, read);
    Py_XSETREF(self->match, match);
    Py_XSETREF(self->name, name);
    self->max_head = max_head;
    return 0;
}

/* A non-negative int argument, or -1 (not one: the Python function decides). */
static Py_ssize_t index_of(PyObject *value) {
    if (!PyLong_CheckExact(value))
        return -1;
    Py_ssize_t index = PyLong_AsSsize_t(value);
    if (index == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return index;
}

static PyObject *END, *SPAN, *ONE; /* "end", "span" and 1: the match's methods and group */

/* A Py_ssize_t from an int object that the regex module made, or -1 with an error set. */
static Py_ssize_t take_index(PyObject *value) {
    if (value == NULL)
        return -1;
    Py_ssize_t index = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return index;
}

/* The Python read's answer for a line that holds a marker, by the line key: the key its regex reads,
 * when the name occurs once up to the match's end; else True ("parse it"). */
static PyObject *read_line_key(LineSearch *self, PyObject *const *args, const char *data, Py_ssize_t size,
                               Py_ssize_t start) {
    if (size - start > self->max_head)
        Py_RETURN_TRUE;
    PyObject *found = PyObject_Vectorcall(self->match, args, 2, NULL); /* match(data, start) */
    if (found == NULL)
        return NULL;
    if (found == Py_None) {
        Py_DECREF(found);
        Py_RETURN_TRUE;
    }
    PyObject *span_args[] = {found, ONE};
    PyObject *span = PyObject_VectorcallMethod(SPAN, span_args, 2, NULL);
    if (span == NULL) {
        Py_DECREF(found);
        return NULL;
    }
    Py_ssize_t until = take_index(PyObject_VectorcallMethod(END, &found, 1, NULL));
    Py_DECREF(found);
    if (until == -1 && PyErr_Occurred()) {
        Py_DECREF(span);
        return NULL;
    }
    if (!PyTuple_CheckExact(span) || PyTuple_GET_SIZE(span) != 2) {
        Py_DECREF(span);
        PyErr_SetString(PyExc_TypeError, "LineSearch: span(1) is not a pair");
        return NULL;
    }
    Py_ssize_t from = PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 0));
    Py_ssize_t to = from == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(PyTuple_GET_ITEM(span, 1));
    Py_DECREF(span);
    if (to == -1 && PyErr_Occurred())
        return NULL;
    if (from < start || to < from || to > size || until < start || until > size)
        Py_RETURN_TRUE; /* not where line_pattern's group and match can be: not sure, parse it */
    /* data.count(name, start, until) == 1: occurrences that do not overlap, as bytes.count counts. */
    const char *name = PyBytes_AS_STRING(self->name);
    Py_ssize_t length = PyBytes_GET_SIZE(self->name), count = 0;
    const char *at = data + start, *stop = data + until;
    while (count < 2 && stop - at >= length) {
        at = memmem(at, (size_t)(stop - at), name, (size_t)length);
        if (at == NULL)
            break;
        count++;
        at += length;
    }
    if (count != 1)
        Py_RETURN_TRUE;
    return PyUnicode_DecodeASCII(data + from, to - from, "strict");
}

/* read(data, start, end): what prefilter's Python read(data, start, end) returns. */
static PyObject *LineSearch_call(LineSearch *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (self->read == NULL) { /* made by __new__ alone: nothing to search with */
        PyErr_SetString(PyExc_ValueError, "LineSearch: not initialised");
        return NULL;
    }
    if (kwnames != NULL || nargs != 3 || !PyBytes_CheckExact(args[0]))
        goto python;
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t start = index_of(args[1]), end = index_of(args[2]);
    if (start < 0 || end < start || start >= size)
        goto python;
    if (data[start] == '\r' || data[start] == '\n')
        goto python; /* blank lines before the request line */
    Py_ssize_t stop = end < size ? end : size;
    const char *newline = memchr(data + start, '\n', (size_t)(stop - start));
    Py_ssize_t line = newline ? newline - data : end; /* as the Python one: find's -1 -> end */
    Py_ssize_t in_line = (line < size ? line : size) - start;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->needles); i++) {
        PyObject *needle = PyTuple_GET_ITEM(self->needles, i);
        if (memmem(data + start, (size_t)in_line, PyBytes_AS_STRING(needle), (size_t)PyBytes_GET_SIZE(needle))) {
            if (self->match == Py_None)
                goto python; /* a marker and no line key: the Python function says "parse it" */
            return read_line_key(self, args, data, size, start);
        }
    }
    if (self->fields == Py_None)
        Py_RETURN_FALSE;
    PyObject *line_object = PyLong_FromSsize_t(line);
    if (line_object == NULL)
        return NULL;
    PyObject *fields_args[] = {args[0], line_object, args[2]};
    PyObject *found = PyObject_Vectorcall(self->fields, fields_args, 3, NULL);
    Py_DECREF(line_object);
    if (found == NULL)
        return NULL;
    int is_none = found == Py_None;
    Py_DECREF(found);
    return PyBool_FromLong(!is_none);
python:
    return PyObject_Vectorcall(self->read, args, (size_t)nargs, kwnames);
}

static PyMethodDef LineSearch_methods[] = {
    {"read", (PyCFunction)(void (*)(void))LineSearch_call, METH_FASTCALL | METH_KEYWORDS,
     "read(data, start, end): what the Python read it was made with returns."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LineSearchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ebpf_sticky.sessions._headscan.LineSearch",
    .tp_doc = "LineSearch(needles, fields, read, line_key=None, max_head=-1): read's request-line search, in C.",
    .tp_basicsize = sizeof(LineSearch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)LineSearch_init,
    .tp_dealloc = (destructor)LineSearch_dealloc,
    .tp_methods = LineSearch_methods,
};

static struct PyModuleDef headscan = {
    PyModuleDef_HEAD_INIT, .m_name = "_headscan", .m_doc = "prefilter.key_reader's search, in C.", .m_size = -1,
};

PyMODINIT_FUNC PyInit__headscan(void) {
    if (END == NULL && (END = PyUnicode_InternFromString("end")) == NULL)
        return NULL;
    if (SPAN == NULL && (SPAN = PyUnicode_InternFromString("span")) == NULL)
        return NULL;
    if (ONE == NULL && (ONE = PyLong_FromLong(1)) == NULL)
        return NULL;
    if (PyType_Ready(&LineSearchType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&headscan);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "LineSearch", (PyObject *)&LineSearchType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
