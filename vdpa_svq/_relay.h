/*
 * _relay.h: what the two files of vdpa_svq._relay know of each other. _relay.c holds the relay
 * (the Relay type, the shadow ring's driver side), _pump.c the loop that runs relays (the Pump
 * type); the pump sees a relay only through the functions below, so that the relay's struct and
 * its ring code (_ring.h) stay in one file. Hidden: the extension exports nothing but its PyInit.
 */
#ifndef VDPA_SVQ_RELAY_H
#define VDPA_SVQ_RELAY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#pragma GCC visibility push(hidden)

/* ---- _relay.c's, for the pump ------------------------------------------------------------------ */

typedef struct Relay Relay;
extern PyTypeObject RelayType; /* vdpa_svq._relay.CShadowVirtqueue */

/* The pump calls these WITHOUT the GIL: each takes the relay's lock (_relay.c, "Who touches a
 * relay"), and the GIL only for Python work (a callable notifier, an error). */

/* mirrors relay.py:ShadowVirtqueue._guarded: run `work` on the relay; a RingError stops this
 * queue (kept in its .error): 0; any other exception is left pending in this thread: -1. A
 * closed relay is skipped (closed_ok) or an error. */
int svq_guarded(Relay *q, int (*work)(Relay *), int closed_ok);
/* The work a wake-up runs: mirrors relay.py:ShadowVirtqueue._drain_guest / _drain_device. */
int svq_drain_guest(Relay *q);
int svq_drain_device(Relay *q);
/* The work a polling phase runs: one round with notifications off; notifications back on. */
int svq_poll_once(Relay *q);
int svq_rearm(Relay *q);
/* Whether the relay is open, not stopped, and has work for the poller. */
int relay_has_work(Relay *q);
/* One of its fds is not a working eventfd any more (kick: the guest's, else the device's call):
 * the relay stops with the reason. 0, or -1 with an exception. */
int relay_hung_up(Relay *q, int kick);

/* ---- _pump.c's, for the module ----------------------------------------------------------------- */

extern PyTypeObject PumpType; /* vdpa_svq._relay.Pump */
/* adapt_window(window_ns, gap_ns, cap_ns): the adaptive window's rule, for its test. */
PyObject *py_adapt_window(PyObject *module, PyObject *args);
/* spin_credit(left_ns, busy_ns, window_ns): an adaptive polling phase's credit, for its test. */
PyObject *py_spin_credit(PyObject *module, PyObject *args);
/* contended(switches, phase_ns): whether a polling phase competed for its CPU, for its test. */
PyObject *py_contended(PyObject *module, PyObject *args);
/* contention_pause(pause_ns, was_contended): how long polling pauses after a phase, for its test. */
PyObject *py_contention_pause(PyObject *module, PyObject *args);

#pragma GCC visibility pop

#endif /* VDPA_SVQ_RELAY_H */
