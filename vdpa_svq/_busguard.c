/* vdpa_svq._busguard: memory a peer can shrink under us must not kill the process.
 *
 * A vhost-user frontend hands its guest memory as a file and maps it into us; if it truncates
 * the file afterwards, every access past the new end raises SIGBUS, in whichever thread (the C
 * relay, the soft device, Python code reading the ring) touched it. A memfd sealed with
 * F_SEAL_SHRINK cannot shrink, and the backend seals what it can; this module guards the rest
 * (hugetlbfs and tmpfs files, memfds that refuse new seals).
 *
 * A guarded range is registered here. On SIGBUS inside one, the handler maps a private zero page
 * over the faulting page and counts the fault: the access is retried and succeeds (reading zeros,
 * writing into a page nobody else sees), and the owner of the range, polling faults(), closes the
 * connection with the reason. A SIGBUS anywhere else goes to whatever handled it before us, or
 * kills the process as it would have without us.
 *
 * mmap() is not on POSIX's async-signal-safe list, but on Linux it is one system call with no
 * user-space lock: the handler does nothing else that is not. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_GUARDED 256

typedef struct {
    uintptr_t start, end; /* [start, end); start 0: a free slot */
    uintptr_t align;      /* the mapping's page size (hugetlbfs: its huge page size) */
    unsigned long faults; /* SIGBUS faults replaced by zero pages */
    uintptr_t first;      /* the first faulting address */
} Guarded;

static Guarded guarded[MAX_GUARDED];
static struct sigaction previous;
static int installed;

static void chain_previous(int sig, siginfo_t *info, void *ctx)
{
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, ctx);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* Nobody else handled it: the default action, as without us. Returning retries the access,
     * which faults again, now fatally. */
    signal(sig, SIG_DFL);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_GUARDED; i++) {
        Guarded *g = &guarded[i];
        uintptr_t start = __atomic_load_n(&g->start, __ATOMIC_ACQUIRE);
        if (start == 0 || addr < start || addr >= __atomic_load_n(&g->end, __ATOMIC_RELAXED))
            continue;
        uintptr_t page = addr & ~(g->align - 1);
        void *p = mmap((void *)page, g->align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p == MAP_FAILED)
            break;
        uintptr_t none = 0;
        __atomic_compare_exchange_n(&g->first, &none, addr, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        __atomic_fetch_add(&g->faults, 1, __ATOMIC_RELEASE);
        return;
    }
    chain_previous(sig, info, ctx);
}

static int install(void)
{
    if (installed)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

static PyObject *guard(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long start, length, align;
    if (!PyArg_ParseTuple(args, "KKK", &start, &length, &align))
        return NULL;
    if (start == 0 || length == 0 || align == 0 || (align & (align - 1)) || start % align || start + length < start) {
        PyErr_Format(PyExc_ValueError, "guard: bad range %#llx +%#llx (page size %#llx)", start, length, align);
        return NULL;
    }
    if (install() < 0)
        return NULL;
    for (int i = 0; i < MAX_GUARDED; i++) {
        Guarded *g = &guarded[i];
        if (g->start != 0)
            continue;
        g->end = (uintptr_t)(start + length);
        g->align = (uintptr_t)align;
        g->faults = 0;
        g->first = 0;
        __atomic_store_n(&g->start, (uintptr_t)start, __ATOMIC_RELEASE); /* published last */
        return PyLong_FromLong(i);
    }
    PyErr_Format(PyExc_OSError, "guard: more than %d guarded memory ranges", MAX_GUARDED);
    return NULL;
}

static Guarded *slot(PyObject *arg)
{
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= MAX_GUARDED || guarded[i].start == 0) {
        PyErr_Format(PyExc_ValueError, "no guarded range %ld", i);
        return NULL;
    }
    return &guarded[i];
}

static PyObject *unguard(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Guarded *g = slot(arg);
    if (g == NULL)
        return NULL;
    __atomic_store_n(&g->start, 0, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *faults(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Guarded *g = slot(arg);
    if (g == NULL)
        return NULL;
    unsigned long n = __atomic_load_n(&g->faults, __ATOMIC_ACQUIRE);
    return Py_BuildValue("kK", n, (unsigned long long)__atomic_load_n(&g->first, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"guard", guard, METH_VARARGS,
     "guard(start, length, page_size) -> slot: SIGBUS in [start, +length) maps a zero page and is counted"},
    {"unguard", unguard, METH_O, "unguard(slot): before the range is unmapped"},
    {"faults", faults, METH_O, "faults(slot) -> (count, first faulting address)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef busguard_module = {
    PyModuleDef_HEAD_INIT, "vdpa_svq._busguard", "SIGBUS-safe access to memory a peer can shrink.", -1, methods,
};

PyMODINIT_FUNC PyInit__busguard(void) { return PyModule_Create(&busguard_module); }
