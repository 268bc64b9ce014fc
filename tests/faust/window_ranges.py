"""Prints, as JSON, the windows Faust's own code gives for a table of timestamps.

Run with a Python that has faust-streaming installed; `tests/tests/window_faust.rs` compares
the output with our windows (the committed copy is `tests/faust/window_ranges.json`).
Faust works in float seconds with inclusive ends (`end = start + size - 0.1`); the output is
in integer milliseconds with Faust's ends as given, so the test can state the mapping.
"""
import json
import sys

from faust.windows import HoppingWindow, SlidingWindow, TumblingWindow

TIMESTAMPS_MS = [
    0, 1, 999, 5_000, 9_999, 10_000, 10_001, 19_999, 20_000, 50_000, 59_999, 60_000,
    60_001, 65_500, 69_999, 70_000, 119_999, 120_000, 1_700_000_000_000, 1_700_000_005_000,
    1_700_000_009_999, 1_700_000_010_000,
]
WINDOWS = {
    "tumbling 10s": TumblingWindow(10),
    "hopping 60s/10s": HoppingWindow(60, 10),
    "sliding 5s/5s": SlidingWindow(5, 5, 60),
}


def ms(seconds):
    return int(round(seconds * 1000))


def main():
    rows = []
    for name, window in WINDOWS.items():
        for ts in TIMESTAMPS_MS:
            seconds = ts / 1000
            rows.append({
                "window": name,
                "timestamp_ms": ts,
                "ranges": [[ms(s), ms(e)] for s, e in window.ranges(seconds)],
                "current": [ms(x) for x in window.current(seconds)],
                "delta_10s": [ms(x) for x in window.delta(seconds, 10)],
            })
    # One row per line, so a difference reads as one.
    sys.stdout.write('{"faust": %s, "rows": [\n' % json.dumps(__import__("faust").__version__))
    sys.stdout.write(",\n".join(json.dumps(row) for row in rows))
    sys.stdout.write("\n]}\n")


if __name__ == "__main__":
    main()
