"""What a person watching a job sees: progress lines with a total and an ETA, and the libraries' own logs (Ray's,
Ray Data's, MLflow's) kept out of the way unless asked for with -v.

Our own lines ("encode: ...") carry what a user needs; Ray Data's execution reports every 10 s made up most of a
job's stderr and buried them.
"""
import logging
import os
import sys
import time
import warnings


VERBOSE = False  # -v: the libraries' own logs as they come; set once, by the command line


def quiet_libraries(verbose=False):
    """Hide Ray's, Ray Data's and MLflow's informational logs and warnings about their own internals (their errors
    still show), unless `verbose`, which `init_ray` then follows too."""
    global VERBOSE
    VERBOSE = verbose
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers on import
    for name, level in (("ray", logging.ERROR), ("ray.data", logging.ERROR), ("mlflow", logging.WARNING),
                        ("alembic", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def init_ray(address=None, **options):
    """Start or join Ray (`address`: None or "local" for a local one), quietly unless -v was given."""
    import ray
    import ray.data  # configures its loggers on import: before quieting them
    ray.init(address=address, log_to_driver=False, logging_level=logging.INFO if VERBOSE else logging.ERROR,
             **options)
    if not VERBOSE:
        quiet_libraries()  # ray.init set the "ray" logger's level again
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False


def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """"label: done/total unit (percent), rate, elapsed, ETA" on stderr. On a terminal the line is redrawn in place
    (at most 5 times a second); elsewhere (a log file, a scheduler's capture) a line is printed every `every`
    seconds and at the end, so a log gets a record rather than a flood."""

    def __init__(self, label, total, unit="images", every=30.0, stream=None):
        self.label, self.total, self.unit, self.every = label, max(int(total), 0), unit, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.shown = None

    def line(self, done, note=""):
        elapsed = time.perf_counter() - self.start
        parts = [f"{self.label}: {done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * done / self.total:.0f}%)"
        if done and elapsed > 0:
            parts.append(f"{done / elapsed:.2f} {self.unit}/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if 0 < done < self.total:
            parts.append(f"ETA {_duration(elapsed / done * (self.total - done))}")
        return ", ".join(parts) + (f"; {note}" if note else "")

    def update(self, done, note=""):
        now = time.perf_counter()
        final = done >= self.total
        if final and self.shown == done:
            return
        if not final and now - self.last < (0.2 if self.tty else self.every):
            return
        self.last, self.shown = now, done
        text = self.line(done, note)
        if self.tty:
            print("\r\033[K" + text, end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def close(self):
        """End the line on a terminal (after an update that was not the last)."""
        if self.tty and self.shown is not None and self.shown < self.total:
            print(file=self.stream, flush=True)
