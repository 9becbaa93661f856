"""Thread priorities: the receiver's acknowledgements before forwarding work.

Acknowledging a C-STORE is a chain of steps between the sender and the
receiving process, each waiting for the other; forwarding is work that the
spool lets wait. On a busy machine the scheduler then gives the CPU to the
receiver first, and forwarding takes what is left.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

#: How much nicer than the receiver the forwarding workers run: a nice of 10
#: still gets about a tenth of a contended core, and all of an idle one.
FORWARD_NICE = 10
#: How much nicer the threads that forward an instance while it arrives run
#: (:mod:`gateway.cut_through`): they compete with the receipt of that very
#: instance, whose acknowledgement the sender waits for, so they take only
#: the CPU the receipt leaves idle, and catch up once it is acknowledged.
CUT_THROUGH_NICE = 19


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread (and the threads it starts) ``increment`` nicer.

    On Linux a nice value belongs to one thread; elsewhere this does nothing.
    """
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
