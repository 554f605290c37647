/* Guard for memory mappings of shared-memory objects that another process may shrink (server/_shm.py).
 *
 * A mapped file that its owner truncates raises SIGBUS on the next access past the new end, which kills the
 * process: no Python handler can resume the faulting copy (it may be inside convcore's OpenMP loops, without the
 * GIL). This module installs a SIGBUS handler that, for a fault inside a protected range, maps anonymous zero pages
 * over the whole range (MAP_FIXED) and flags it; the access then completes on zeros, and the request that made it
 * checks the flag afterwards and fails with a clear error. A fault anywhere else goes to the handler installed before
 * this one (faulthandler, say), or kills the process as it would have. libwayland-server does the same for the
 * shared-memory pools of its clients (wl_shm_buffer_begin_access).
 *
 * The table of ranges is read by the handler, so it is a fixed array of atomics: a slot's length is set before its
 * start, and its start cleared before it is reused; mmap is a plain system call, safe in a signal handler on Linux.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>

#define SLOTS 1024

typedef struct {
    _Atomic uintptr_t start;
    _Atomic size_t length;
    _Atomic int faulted;
} Range;

static Range ranges[SLOTS];
static struct sigaction previous;
static int installed = 0;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t start = atomic_load(&ranges[i].start);
        size_t length = atomic_load(&ranges[i].length);
        if (start != 0 && addr - start < length) {
            void *p = mmap((void *)start, length, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
            if (p != MAP_FAILED) {
                atomic_store(&ranges[i].faulted, 1);
                return; /* the faulting access runs again, on zero pages */
            }
            break;
        }
    }
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL); /* the access faults again and ends the process, as without this module */
}

static PyObject *guard_protect(PyObject *self, PyObject *args)
{
    unsigned long long start, length;
    if (!PyArg_ParseTuple(args, "KK", &start, &length))
        return NULL;
    if (start == 0 || length == 0) {
        PyErr_Format(PyExc_ValueError, "protect: start and length must be > 0, got %llu and %llu", start, length);
        return NULL;
    }
    if (!installed) {
        struct sigaction act;
        act.sa_sigaction = on_sigbus;
        sigemptyset(&act.sa_mask);
        act.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
        if (sigaction(SIGBUS, &act, &previous) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        installed = 1;
    }
    /* Called with the GIL held: no two callers race for a slot. */
    for (int i = 0; i < SLOTS; i++) {
        if (atomic_load(&ranges[i].start) == 0) {
            atomic_store(&ranges[i].faulted, 0);
            atomic_store(&ranges[i].length, (size_t)length);
            atomic_store(&ranges[i].start, (uintptr_t)start);
            return PyLong_FromLong(i);
        }
    }
    PyErr_SetString(PyExc_RuntimeError, "protect: every slot is in use");
    return NULL;
}

static int slot_arg(PyObject *args, int *slot)
{
    if (!PyArg_ParseTuple(args, "i", slot))
        return 0;
    if (*slot < 0 || *slot >= SLOTS) {
        PyErr_Format(PyExc_ValueError, "slot must be 0 to %d, got %d", SLOTS - 1, *slot);
        return 0;
    }
    return 1;
}

static PyObject *guard_faulted(PyObject *self, PyObject *args)
{
    int slot;
    if (!slot_arg(args, &slot))
        return NULL;
    return PyBool_FromLong(atomic_load(&ranges[slot].faulted));
}

static PyObject *guard_unprotect(PyObject *self, PyObject *args)
{
    int slot;
    if (!slot_arg(args, &slot))
        return NULL;
    atomic_store(&ranges[slot].start, 0);
    atomic_store(&ranges[slot].length, 0);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"protect", guard_protect, METH_VARARGS,
     "protect(start, length) -> slot: a SIGBUS inside [start, start + length) maps zero pages there and flags it."},
    {"faulted", guard_faulted, METH_VARARGS, "faulted(slot) -> bool: whether a SIGBUS hit the slot's range."},
    {"unprotect", guard_unprotect, METH_VARARGS, "unprotect(slot): forget the range (before unmapping it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shmguard", NULL, -1, methods};

PyMODINIT_FUNC PyInit__shmguard(void) { return PyModule_Create(&module); }
