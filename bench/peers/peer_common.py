"""What the peers share: the process start, stdout kept for the result line, the result line
itself, the common command line and the hard watchdog.

Each peer imports it first, before its framework (`from peer_common import ...`; a script's
own directory is on sys.path), since importing it points file descriptor 1 at stderr.
"""
import os
import sys
import time


def _process_age() -> float:
    """Seconds since this process started (from /proc), so `startup_s` includes the
    interpreter's start and the imports; 0 where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


START = time.monotonic() - _process_age()

# The result line is the only thing on stdout: keep the real stdout for it, and point file
# descriptor 1 at stderr, so whatever Faust, mode, Quix or librdkafka prints (banners,
# progress) goes to stderr.
RESULT_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

import argparse  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402

# The hard watchdog ends the process this many seconds after --timeout.
WATCHDOG_GRACE_S = 30


class Result:
    """What was counted, and the one result line (printed once, by whoever gets there
    first: the peer's own loop, agent or deadline, or the watchdog thread).

    A peer that counts per key overrides `counts`; `first_read` says whether the line
    has `first_read_s` (the peers that note it call `read`)."""

    def __init__(self, peer: str, shape: str, orders: int, first_read: bool = True):
        self.peer = peer
        self.shape = shape
        self.orders = orders
        self.events = 0
        self.first_read = None  # monotonic time of the first record read from TOPIC
        self.first = None  # ... of the first event counted
        self.last = None  # ... and of the last one
        self._has_first_read = first_read
        self._lock = threading.Lock()
        self._printed = False

    def read(self, value):
        """A stream processor that notes when the first record was read (before group_by's
        repartition), and passes the value on."""
        if self.first_read is None:
            self.first_read = time.monotonic()
        return value

    def counted(self) -> bool:
        """Notes one event counted; True when that was the last one wanted."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.events += 1
        return self.events >= self.orders

    def counts(self):
        """The count of each key, for `accounts` and `sum_of_counts`; None (no such
        fields) for a peer that keeps no counts. Called under the lock, from any thread."""
        return None

    def emit(self) -> bool:
        """Prints the result line, unless it has been printed; True if this call did."""
        with self._lock:
            if self._printed:
                return False
            self._printed = True
            counts = self.counts()
            seconds = (self.last - self.first) if self.first is not None else 0.0
            line = {
                "peer": self.peer,
                "shape": self.shape,
                "events": self.events,
                "seconds": round(seconds, 3),
                "events_per_s": round(self.events / seconds, 1) if seconds > 0 else 0.0,
            }
            if counts is not None:
                line["accounts"] = sum(1 for c in counts if c)
                line["sum_of_counts"] = sum(counts)
            line["complete"] = self.events >= self.orders
            line["startup_s"] = round(self.first - START, 3) if self.first is not None else None
            if self._has_first_read:
                # Not in the common contract: from process start to the first record read
                # from TOPIC. With group_by, the first count waits for the repartition to
                # fill, so the work between the two is in startup_s, not in seconds.
                line["first_read_s"] = round(self.first_read - START, 3) if self.first_read is not None else None
            RESULT_OUT.write(json.dumps(line) + "\n")
            RESULT_OUT.flush()
            return True


def arguments(description: str, app_id_prefix: str, app_id_help: str,
              orders_help: str = "stop after counting this many events",
              shape: bool = True) -> argparse.ArgumentParser:
    """The command line every peer takes: --broker --topic --orders --timeout [--shape]
    [--app-id], the app id defaulting to APP_ID_PREFIX and a random suffix. A peer adds its
    own arguments before parsing."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--orders", type=int, required=True, help=orders_help)
    p.add_argument("--timeout", type=float, required=True, help="seconds from process start")
    if shape:
        p.add_argument("--shape", choices=["group_by", "by_key"], required=True)
    p.add_argument("--app-id", default=f"{app_id_prefix}-{uuid.uuid4().hex[:8]}", help=app_id_help)
    return p


def start_watchdog(name: str, deadline: float, result: Result, cleanup=None) -> None:
    """Hard watchdog: whatever hangs (a rebalance that never ends, a shutdown that waits on
    the broker), print what was counted, run CLEANUP, and end (exit 0) WATCHDOG_GRACE_S
    seconds after DEADLINE (a time.monotonic() time: START + --timeout)."""

    def watchdog() -> None:
        print(f"{name}: watchdog: exiting", file=sys.stderr)
        result.emit()
        if cleanup is not None:
            cleanup()
        os._exit(0)

    timer = threading.Timer(max(0.0, deadline + WATCHDOG_GRACE_S - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()
