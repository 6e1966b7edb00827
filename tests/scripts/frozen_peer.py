"""One rank of a 2-rank localsgd job whose peer freezes inside a pass-through collective.

argv[1]: ``broadcast`` (from rank 1) or ``barrier``; argv[2]: how rank 0 ends, ``destroy``
(destroy_process_group, then exit) or ``exit`` (interpreter exit with the group alive).
Rank 1 makes the collective (its call header reaches rank 0 at once), then stops itself with
SIGSTOP before any of the collective's data moves: a peer that is gone without closing its
connections (a hung host, a network partition), which gloo only notices at its own timeout
(600 s here). Rank 0 makes the same collective, which passes through to gloo and blocks there;
another thread calls abort() 2 s later. Rank 0 prints one JSON line (the error, seconds from
abort() to the raise, the wall clock) and ends its job. Launched by tests/test_backend_exit.py,
which kills rank 1 afterwards."""
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import localsgd_comm

op, ending = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("localsgd", pg_options=localsgd_comm.BackendOptions(threshold_bytes=0),
                        timeout=timedelta(seconds=600))
rank = dist.get_rank()
x = torch.full((1000,), float(rank))
dist.barrier()


def collective(async_op=False):
    if op == "broadcast":
        return dist.broadcast(x, src=1, async_op=async_op)
    return dist.barrier(async_op=async_op)


if rank == 1:
    collective(async_op=True)  # the call header goes out now; the worker waits for rank 0's
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen before any data moves; the test kills it
    time.sleep(3600)

backend = dist.group.WORLD._get_backend(torch.device("cpu"))
time.sleep(2.0)  # rank 1's header is here and rank 1 is stopped
aborted_at = []


def aborter():
    time.sleep(2.0)
    aborted_at.append(time.monotonic())
    backend.abort()


th = threading.Thread(target=aborter)
th.start()
try:
    collective()
    err = "no error"
except RuntimeError as exc:
    err = str(exc)
raised_after = time.monotonic() - aborted_at[0] if aborted_at else -1.0
# abort() may still be returning when the collective raised: a thread that takes the GIL back
# after the interpreter began to finalize is ended by CPython with a forced unwind, which aborts
# the process ("terminate called without an active exception"; seen once in 10 runs with a
# daemon thread here). The thread that called abort() must end before the interpreter does.
th.join()
print(json.dumps({"error": err[:500], "raised_after_abort_s": raised_after, "done_at": time.time()}), flush=True)
if ending == "destroy":
    dist.destroy_process_group()
