/*
 * The pump: the relay loop in C (loop.py's RelayLoop runs it when the C relay is built). Part of
 * vdpa_svq._relay, apart from the relay (_relay.c) because it is the loop, not the rings: it sees a
 * relay only through _relay.h. mirrors pump.py:Pump, the readable reference (which runs the
 * Python relays): same names, same rules.
 *
 * One thread, epoll over the guests' kick and the device's call eventfds. A wake-up reads (clears)
 * the eventfd and runs the relay's on_guest_kick / on_device_call, with no Python in between.
 * The pump runs WITHOUT the GIL: it takes it only for Python work (a source that is a Python
 * callable, a relay's notifier that is one, an error), so pumps in several threads (one per
 * queue pair) relay at once. Each relay's lock keeps Python's calls of the relay (stats,
 * ring_state, close, ...) from other threads off the relay while the pump works on it
 * (_relay.c, "Who touches a relay"). Sources that are Python callables (anything that is not a C
 * relay) are called as pump.py's Pump calls them.
 *
 * Polling (poll_us > 0): after a wake-up of a relay (a kick or a call), the pump keeps every ring's
 * notifications off and polls the rings itself until nothing arrived for poll_us, then turns
 * notifications back on (relaying what raced in) and sleeps in epoll again. Under load the guest
 * and the device then make no notification syscalls and the relay no wake-ups: a CPU's worth of
 * spinning bought for latency, as DPDK's PMDs do.
 *
 * Adaptive polling (adaptive_max_us > 0, serve's and attach's default): the window is not fixed
 * but learnt, as KVM's halt polling learns its own: when a wake-up comes soon after a polling phase
 * gave up (sooner than the cap), a longer window would have caught it, so the window doubles;
 * when it comes later than the cap, the spin was wasted, so the window halves (to 0: no polling).
 * Steady traffic grows the window until the pump polls without a break, as with a hand-tuned
 * poll_us; an idle queue costs one window's spin, then nothing.
 *
 * An adaptive phase also has to pay for itself (spin_credit, pump.py says why): it spins idle only
 * on credit, which each poll round earns at POLL_PAYBACK times the time it spent relaying, up to
 * the window. Under load the pump polls without a break; sparse traffic, or a peer starved of the
 * CPU we spin on, runs the credit out and the pump goes back to notifications. A phase in which a
 * yield lost the CPU for HOG_NS or more (contended: a busy thread shares this CPU and kept it for a
 * scheduler slice) sets the window to 0 and pauses polling (contention_pause): there each yield
 * loses the CPU for a whole slice, where a sleeper woken by a notification runs at once. A
 * device's worker that takes the CPU for a short burst of work and sleeps again is not a hog.
 */
#include "_relay.h"

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

enum { SOURCE_STOP, SOURCE_KICK, SOURCE_CALL, SOURCE_CALLABLE };

typedef struct PumpSource {
    struct PumpSource *next; /* every source, freed with the pump (epoll may still name one) */
    int kind, fd;
    Relay *relay;  /* SOURCE_KICK / SOURCE_CALL; the pump's relay list holds the reference */
    PyObject *fn;  /* SOURCE_CALLABLE */
} PumpSource;

typedef struct {
    PyObject_HEAD
    int epfd, stop_fd;
    int stop;          /* set (atomically) by stop(); a stopped pump stays stopped */
    int running;
    PyObject *relays;  /* list of the C relays that have a source here: the ones the poller polls */
    Relay **run;       /* while run() runs: the relays, read without the GIL (the list cannot change) */
    Py_ssize_t nrun;
    PumpSource *sources, stop_source;
    unsigned long long wakeups, poll_rounds, poll_phases;
    /* Adaptive polling: the current window, and how often it grew and shrank. */
    uint64_t window_ns;
    unsigned long long window_grows, window_shrinks, contended_phases;
} Pump;

/* The adaptive window's first step (and a phase's first credit), the phase's payback, and the
 * rules (module functions adapt_window and spin_credit, for their tests). */
/* mirrors pump.py:ADAPT_START_NS, POLL_PAYBACK, HOG_NS, PAUSE_MIN_NS, PAUSE_MAX_NS, adapt_window,
 * spin_credit, contended and contention_pause */
#define ADAPT_START_NS 10000ull
#define POLL_PAYBACK 4ull
#define HOG_NS 1000000ull
#define PAUSE_MIN_NS 10000000ull
#define PAUSE_MAX_NS 1000000000ull

static uint64_t adapt_window(uint64_t window, uint64_t gap, uint64_t cap)
{
    if (gap < cap) /* a window this much longer would have caught the wake-up: grow */
        return window == 0 ? (ADAPT_START_NS < cap ? ADAPT_START_NS : cap)
                           : (window < cap && window < cap - window ? window * 2 : cap); /* min(2w, cap), no overflow */
    return window / 2 < ADAPT_START_NS ? 0 : window / 2; /* idle longer than the cap: the spin was waste */
}

static uint64_t spin_credit(uint64_t left, uint64_t busy, uint64_t window)
{
    if (left >= window)
        return window;
    uint64_t room = window - left; /* min(window, left + POLL_PAYBACK * busy), with no overflow */
    return busy > room / POLL_PAYBACK ? window : left + POLL_PAYBACK * busy;
}

static int contended(uint64_t longest_yield_ns) { return longest_yield_ns >= HOG_NS; }

static uint64_t contention_pause(uint64_t pause, int was_contended)
{
    if (!was_contended)
        return 0;
    if (pause >= PAUSE_MAX_NS / 2) /* min(max(pause * 2, PAUSE_MIN_NS), PAUSE_MAX_NS), with no overflow */
        return PAUSE_MAX_NS;
    return pause * 2 > PAUSE_MIN_NS ? pause * 2 : PAUSE_MIN_NS;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int pump_stopping(Pump *p) { return __atomic_load_n(&p->stop, __ATOMIC_ACQUIRE); }

/* Call a source's Python callable (the GIL taken for it): 0, or -1 with its exception. */
static int call_with_gil(PyObject *fn)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallNoArgs(fn);
    Py_XDECREF(r);
    PyGILState_Release(gil);
    return r == NULL ? -1 : 0;
}

/* An OSError from errno (the GIL taken for it): -1. */
static int raise_errno(void)
{
    int err = errno;
    PyGILState_STATE gil = PyGILState_Ensure();
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    PyGILState_Release(gil);
    return -1;
}

/* mirrors pump.py:Pump.dispatch */
static int pump_dispatch(PumpSource *src)
{
    switch (src->kind) {
    case SOURCE_KICK:
        return svq_guarded(src->relay, svq_drain_guest, 0);
    case SOURCE_CALL:
        return svq_guarded(src->relay, svq_drain_device, 0);
    default:
        return call_with_gil(src->fn);
    }
}

/* mirrors pump.py:Pump.any_work */
static int pump_any_work(Pump *p)
{
    for (Py_ssize_t i = 0; i < p->nrun; i++)
        if (relay_has_work(p->run[i]))
            return 1;
    return 0;
}

/* mirrors pump.py:Pump.for_each */
static int pump_for_each(Pump *p, int (*work)(Relay *))
{
    /* svq_guarded keeps a RingError on its queue and skips a closed or stopped one, so only
     * other exceptions (a notifier's OSError, ...) end the pump. */
    for (Py_ssize_t i = 0; i < p->nrun; i++)
        if (svq_guarded(p->run[i], work, 1) < 0)
            return -1;
    return 0;
}

/* mirrors pump.py:Pump.poll: a polling phase, then the re-arm; adaptive: credit is not NO_CREDIT.
 * -1 on an error, else whether the phase was contended. */
#define NO_CREDIT UINT64_MAX
static int pump_poll(Pump *p, uint64_t poll_ns, uint64_t credit)
{
    p->poll_phases++;
    uint64_t longest_yield = 0; /* the longest a yield of this phase kept us off the CPU */
    uint64_t deadline = now_ns() + (credit == NO_CREDIT ? poll_ns : credit);
    while (!pump_stopping(p)) {
        if (!pump_any_work(p)) {
            int found = 0;
            /* Idle: spin, and yield the CPU at each turn: where the device's worker shares this
             * CPU (vdpa_sim's kthread), a plain spin would hold it off for a whole scheduler
             * slice, and the device would stall while we wait for it. */
            for (uint64_t t = now_ns(); !pump_stopping(p) && t < deadline;) {
                if (pump_any_work(p)) {
                    found = 1;
                    break;
                }
                sched_yield();
                uint64_t back = now_ns();
                if (back - t > longest_yield)
                    longest_yield = back - t;
                t = back;
            }
            if (!found)
                break;
        }
        p->poll_rounds++;
        uint64_t start = now_ns();
        if (pump_for_each(p, svq_poll_once) < 0)
            return -1;
        uint64_t now = now_ns();
        if (credit != NO_CREDIT) /* what is left of the credit, and what this round earned */
            credit = spin_credit(deadline > start ? deadline - start : 0, now - start, poll_ns);
        deadline = now + (credit == NO_CREDIT ? poll_ns : credit);
    }
    if (pump_for_each(p, svq_rearm) < 0)
        return -1;
    return contended(longest_yield);
}

/* A source that is not a working eventfd any more (hung up, in error, read() gave no counter):
 * a peer's fd that would otherwise wake us forever. Out of the epoll set; its relay stops with
 * the reason (pump.py's Pump.drop says the same). A callable's source ends the pump instead:
 * there is no queue to stop. */
/* mirrors pump.py:Pump.drop */
static int pump_drop(Pump *p, PumpSource *src)
{
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, src->fd, NULL);
    if (src->kind == SOURCE_CALLABLE) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyErr_Format(PyExc_OSError, "fd %d hung up or is not an eventfd", src->fd);
        PyGILState_Release(gil);
        return -1;
    }
    return relay_hung_up(src->relay, src->kind == SOURCE_KICK);
}

static void pump_run_end(Pump *p)
{
    p->running = 0;
    PyMem_RawFree(p->run);
    p->run = NULL;
    p->nrun = 0;
}

/* mirrors pump.py:Pump.run */
static PyObject *pump_run(Pump *p, PyObject *args)
{
    long poll_us = 0, adaptive_max_us = 0;
    if (!PyArg_ParseTuple(args, "|ll", &poll_us, &adaptive_max_us))
        return NULL;
    if (poll_us < 0 || adaptive_max_us < 0 || (poll_us && adaptive_max_us)) {
        PyErr_SetString(PyExc_ValueError, "poll_us and adaptive_max_us must be >= 0, and not both set");
        return NULL;
    }
    uint64_t cap = (uint64_t)adaptive_max_us * 1000;
    uint64_t idle_since = now_ns(); /* when the pump last stopped working (for the adaptive gap) */
    uint64_t pause = 0, paused_until = 0; /* after contended phases: no polling until then */
    if (p->running) {
        PyErr_SetString(PyExc_RuntimeError, "the pump is already running");
        return NULL;
    }
    /* The relays, for a run without the GIL: pump_add refuses new ones while we run, and the
     * list (which holds them) lives as long as the pump, which the caller holds. */
    p->nrun = PyList_GET_SIZE(p->relays);
    p->run = PyMem_RawMalloc((p->nrun ? p->nrun : 1) * sizeof *p->run);
    if (p->run == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < p->nrun; i++)
        p->run[i] = (Relay *)PyList_GET_ITEM(p->relays, i);
    p->running = 1;
    PyThreadState *tstate = PyEval_SaveThread(); /* from here on, the GIL only for Python work */
    struct epoll_event events[32];
    while (!pump_stopping(p)) {
        int n = epoll_wait(p->epfd, events, 32, 1000);
        uint64_t woke = now_ns(); /* the wake-up's work, from here, earns a first credit */
        if (n < 0) {
            if (errno == EINTR)
                continue;
            raise_errno();
            goto fail;
        }
        int worked = 0;
        for (int i = 0; i < n && !pump_stopping(p); i++) {
            PumpSource *src = events[i].data.ptr;
            if (src->kind == SOURCE_STOP)
                continue; /* the stop flag says it all */
            uint64_t count;
            ssize_t got = read(src->fd, &count, sizeof count);
            if (got < 0 && errno == EAGAIN)
                continue; /* another reader was first */
            if (got != (ssize_t)sizeof count || events[i].events & (EPOLLHUP | EPOLLERR)) {
                if (pump_drop(p, src) < 0)
                    goto fail;
                continue;
            }
            p->wakeups++;
            if (pump_dispatch(src) < 0)
                goto fail;
            worked |= src->kind != SOURCE_CALLABLE;
        }
        if (!worked)
            continue;
        uint64_t now = now_ns();
        if (!cap) {
            if (poll_us && pump_poll(p, (uint64_t)poll_us * 1000, NO_CREDIT) < 0)
                goto fail;
        } else if (now >= paused_until) {
            uint64_t window = adapt_window(p->window_ns, now - idle_since, cap);
            p->window_grows += window > p->window_ns;
            p->window_shrinks += window < p->window_ns;
            p->window_ns = window;
            if (window > 0) {
                uint64_t first = ADAPT_START_NS < window ? ADAPT_START_NS : window;
                int was_contended = pump_poll(p, window, spin_credit(first, now - woke, window));
                if (was_contended < 0)
                    goto fail;
                pause = contention_pause(pause, was_contended);
                if (was_contended) { /* the spin took the CPU from runnable threads: pause */
                    p->contended_phases++;
                    p->window_shrinks++;
                    p->window_ns = 0;
                    paused_until = now_ns() + pause;
                }
            }
        }
        idle_since = now_ns();
    }
    PyEval_RestoreThread(tstate);
    pump_run_end(p);
    Py_RETURN_NONE;
fail:
    PyEval_RestoreThread(tstate); /* the exception waits in this thread's state */
    pump_run_end(p);
    return NULL;
}

/* Every failure leaves through `fail`, which frees the source and drops its reference to fn
 * together: no path can forget one of the two. */
static PyObject *pump_add(Pump *p, int kind, int fd, Relay *relay, PyObject *fn)
{
    PumpSource *src = PyMem_RawCalloc(1, sizeof *src);
    if (src == NULL)
        return PyErr_NoMemory();
    src->kind = kind;
    src->fd = fd;
    src->relay = relay;
    src->fn = Py_XNewRef(fn);
    if (relay != NULL) {
        int known = PySequence_Contains(p->relays, (PyObject *)relay);
        if (known < 0)
            goto fail;
        if (!known && p->running) {
            PyErr_SetString(PyExc_RuntimeError, "relays join the pump before it runs (a new fd of one may come later)");
            goto fail;
        }
        if (!known && PyList_Append(p->relays, (PyObject *)relay) < 0)
            goto fail;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = src};
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    src->next = p->sources;
    p->sources = src;
    Py_RETURN_NONE;
fail:
    Py_XDECREF(src->fn);
    PyMem_RawFree(src);
    return NULL;
}

/* mirrors pump.py:Pump.add_relay */
static PyObject *pump_add_relay(Pump *p, PyObject *args)
{
    int fd;
    PyObject *relay;
    const char *which;
    if (!PyArg_ParseTuple(args, "iO!s", &fd, &RelayType, &relay, &which))
        return NULL;
    int kind = strcmp(which, "kick") == 0 ? SOURCE_KICK : strcmp(which, "call") == 0 ? SOURCE_CALL : -1;
    if (kind < 0) {
        PyErr_Format(PyExc_ValueError, "which must be 'kick' (the guest's) or 'call' (the device's), not %s", which);
        return NULL;
    }
    return pump_add(p, kind, fd, (Relay *)relay, NULL);
}

/* mirrors pump.py:Pump.add_callable */
static PyObject *pump_add_callable(Pump *p, PyObject *args)
{
    int fd;
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "iO", &fd, &fn))
        return NULL;
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "handler must be callable");
        return NULL;
    }
    return pump_add(p, SOURCE_CALLABLE, fd, NULL, fn);
}

/* mirrors pump.py:Pump.stop */
static PyObject *pump_stop(Pump *p, PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(p->stop_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static int pump_init(Pump *p, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
        return -1;
    if (p->relays != NULL) {
        PyErr_SetString(PyExc_TypeError, "Pump is initialised once");
        return -1;
    }
    p->epfd = p->stop_fd = -1;
    p->relays = PyList_New(0);
    if (p->relays == NULL)
        return -1;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->epfd < 0 || p->stop_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    p->stop_source.kind = SOURCE_STOP;
    p->stop_source.fd = p->stop_fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &p->stop_source};
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->stop_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static int pump_traverse(Pump *p, visitproc visit, void *arg)
{
    Py_VISIT(p->relays);
    for (PumpSource *s = p->sources; s != NULL; s = s->next)
        Py_VISIT(s->fn);
    return 0;
}

static int pump_clear(Pump *p)
{
    Py_CLEAR(p->relays);
    for (PumpSource *s = p->sources; s != NULL; s = s->next)
        Py_CLEAR(s->fn);
    return 0;
}

static void pump_dealloc(Pump *p)
{
    PyObject_GC_UnTrack(p);
    pump_clear(p);
    while (p->sources != NULL) {
        PumpSource *next = p->sources->next;
        PyMem_RawFree(p->sources);
        p->sources = next;
    }
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->stop_fd >= 0)
        close(p->stop_fd);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* mirrors pump.py:Pump.stats */
static PyObject *pump_get_stats(Pump *p, void *Py_UNUSED(closure))
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "wakeups", p->wakeups, "poll_phases", p->poll_phases,
                         "poll_rounds", p->poll_rounds, "poll_window_ns", (unsigned long long)p->window_ns,
                         "window_grows", p->window_grows, "window_shrinks", p->window_shrinks,
                         "contended_phases", p->contended_phases);
}

static PyMethodDef pump_methods[] = {
    {"add_relay", (PyCFunction)pump_add_relay, METH_VARARGS,
     "add_relay(fd, relay, 'kick'|'call'): the guest's kick or the device's call eventfd of a C relay."},
    {"add_callable", (PyCFunction)pump_add_callable, METH_VARARGS, "add_callable(fd, fn): fn() when fd is readable."},
    {"run", (PyCFunction)pump_run, METH_VARARGS,
     "run(poll_us=0, adaptive_max_us=0): relay until stop(); releases the GIL to wait. poll_us: a fixed\n"
     "polling window after each burst; adaptive_max_us: a learnt window, at most this long."},
    {"stop", (PyCFunction)pump_stop, METH_NOARGS, "Make run() return (from any thread)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pump_getset[] = {
    {"stats", (getter)pump_get_stats, NULL,
     "{'wakeups', 'poll_phases', 'poll_rounds', 'poll_window_ns', 'window_grows', 'window_shrinks', "
     "'contended_phases'}", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vdpa_svq._relay.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The relay loop in C: epoll over eventfds, optional busy polling.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pump_init,
    .tp_dealloc = (destructor)pump_dealloc,
    .tp_traverse = (traverseproc)pump_traverse,
    .tp_clear = (inquiry)pump_clear,
    .tp_methods = pump_methods,
    .tp_getset = pump_getset,
};

PyObject *py_adapt_window(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long window, gap, cap;
    if (!PyArg_ParseTuple(args, "KKK", &window, &gap, &cap))
        return NULL;
    return PyLong_FromUnsignedLongLong(adapt_window(window, gap, cap));
}

PyObject *py_contended(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long longest_yield;
    if (!PyArg_ParseTuple(args, "K", &longest_yield))
        return NULL;
    return PyBool_FromLong(contended(longest_yield));
}

PyObject *py_contention_pause(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long pause;
    int was_contended;
    if (!PyArg_ParseTuple(args, "Kp", &pause, &was_contended))
        return NULL;
    return PyLong_FromUnsignedLongLong(contention_pause(pause, was_contended));
}

PyObject *py_spin_credit(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long left, busy, window;
    if (!PyArg_ParseTuple(args, "KKK", &left, &busy, &window))
        return NULL;
    return PyLong_FromUnsignedLongLong(spin_credit(left, busy, window));
}
