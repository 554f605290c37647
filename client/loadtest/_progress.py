"""The live progress line: rewritten in place on a terminal, one line every few seconds into a log or a pipe."""
import sys
import time

__all__ = ["Progress"]


class Progress:
    """Callable ``progress(elapsed, requests, errors)`` that prints the run's state to ``stream``.

    Parameters
    ----------
    stream : file
        Usually ``sys.stderr``.
    warmup, duration : float
        Seconds, to show the phase and the time left.
    tty : bool, optional
        Rewrite one line in place (default: whether ``stream`` is a terminal). Otherwise a line is printed every
        ``log_every`` seconds, so a CI log shows the run is alive without thousands of lines.
    log_every : float
        Seconds between lines when not on a terminal.
    """

    def __init__(self, stream=sys.stderr, *, warmup=0.0, duration=0.0, tty=None, log_every=5.0):
        self.stream = stream
        self.warmup, self.duration = warmup, duration
        self.tty = stream.isatty() if tty is None else tty
        self.every = 0.5 if self.tty else log_every
        self._last_print = None
        self._window = []  # (monotonic time, requests) over the last second, for the current rate
        self._width = 0

    def __call__(self, elapsed, requests, errors):
        now = time.monotonic()
        self._window.append((now, requests))
        while len(self._window) > 2 and now - self._window[0][0] > 1.0:
            self._window.pop(0)
        if self._last_print is not None and now - self._last_print < self.every:
            return
        self._last_print = now
        t0, r0 = self._window[0]
        rate = (requests - r0) / (now - t0) if now > t0 else 0.0
        elapsed = max(0.0, elapsed)
        phase = "warm-up" if elapsed < self.warmup else "measure"
        line = (f"[{phase} {elapsed:6.1f}s / {self.warmup + self.duration:.1f}s] {requests:8d} requests "
                f"{rate:9.1f} req/s {errors:6d} errors")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        """End the in-place line (terminal only), so that what follows starts on a fresh line."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
