"""Stop a run cleanly on SIGTERM (preemption, torchrun shutting down) or SIGINT (Ctrl-C): the
handler only records the request; the trainer finishes the step, saves and exits 0. A second
signal of the same kind is handled the default way, so Ctrl-C twice still stops at once."""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager installing the handlers; `requested` names the signal received, or is None."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __enter__(self):
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
