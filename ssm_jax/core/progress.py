"""Training progress on the console: step/total, loss, speed, ETA.

Every ``train.log_every`` steps process 0 logs one line (logger ``ssm_jax``, which the CLI
prints on stderr), e.g.::

    step 200/600 (33%)  loss 0.0712  2.41 steps/s (19.3 img/s)  ETA 2m46s

When stderr is a terminal a tqdm bar is drawn instead (its postfix shows the loss), so a
live run in a terminal stays on one line and a logged run (file, pipe, CI) gets lines.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("ssm_jax")


def format_duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class TrainProgress:
    """Call ``begin()`` once the step is compiled, ``step(n)`` after every step and
    ``report(n, loss)`` every ``log_every`` steps; ``close()`` at the end."""

    def __init__(self, start: int, total: int, images_per_step: int, enabled: bool = True,
                 stream=None, bar: bool | None = None) -> None:
        self.start, self.total, self.images = start, total, images_per_step
        self.enabled = enabled
        stream = sys.stderr if stream is None else stream
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)())
        self.bar = None
        if enabled and bar and total > start:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", file=stream,
                            desc="training", dynamic_ncols=True)
        self.t_begin = self.t_last = time.time()
        self.step_last = start

    def begin(self) -> None:
        self.t_begin = self.t_last = time.time()

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def report(self, step: int, loss: float) -> str | None:
        if not self.enabled:
            return None
        now = time.time()
        window = max(now - self.t_last, 1e-9)
        rate = (step - self.step_last) / window
        overall = (step - self.start) / max(now - self.t_begin, 1e-9)
        eta = (self.total - step) / overall if overall > 0 else float("inf")
        self.t_last, self.step_last = now, step
        pct = 100.0 * step / max(self.total, 1)
        line = (f"step {step}/{self.total} ({pct:.0f}%)  loss {loss:.4f}  {rate:.2f} steps/s "
                f"({rate * self.images:.1f} img/s)  ETA "
                f"{format_duration(eta) if eta != float('inf') else '?'}")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=True)
        else:
            log.info("%s", line)
        return line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
