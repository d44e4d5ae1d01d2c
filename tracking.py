"""What a run reports: a console line per logged step, a tqdm bar on terminals, and out_dir/log.jsonl."""

import json
import os
import sys
import time

from tqdm import tqdm


class RunLog:
    """Rank 0 writes; other ranks hold a RunLog that does nothing."""

    def __init__(self, out_dir, enabled, start_iter, max_iters, resumed=False):
        self.enabled = enabled
        self.t0 = time.time()
        self.file = None
        self.bar = None
        if not enabled:
            return
        # A resumed run appends to the log of the run it continues.
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a" if resumed else "w")
        if sys.stderr.isatty():
            self.bar = tqdm(total=max_iters, initial=start_iter, unit="it", dynamic_ncols=True, leave=False)

    def elapsed(self):
        return time.time() - self.t0

    def write(self, row):
        """Append one JSON row to log.jsonl, stamped with seconds since the run started."""
        if not self.enabled:
            return
        row = {"time_s": round(self.elapsed(), 3), **row}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def print(self, line):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def step(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
