"""Files: every file homoflow writes goes through here (DESIGN: one home per formula).

* ``atomic_write`` writes through a temporary file in the same directory, then
  ``os.replace``: a reader, a resumed run or a crash never sees half a file.
* ``read_json`` / ``read_npz`` read back with validation: a truncated, corrupt or
  incomplete file raises ``CorruptFileError`` naming the file and saying what to do.
* ``jsonable`` is the one conversion of metadata to JSON.
* ``prepare_out`` validates an output directory before any compute; ``DirectoryLock``
  keeps two processes from computing into the same directory.
* ``Interrupt`` turns SIGINT / SIGTERM into a request to stop at the next safe point.

This module imports neither JAX nor matplotlib, and NumPy only when it reads or writes
arrays (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

# files whose presence marks a directory as homoflow's (``--overwrite`` clears only those)
MARKERS = ("meta.json", "manifest.json", "sweep.json", "summary.json", "table1.md")
LOCK_NAME = ".homoflow.lock"


class CorruptFileError(ValueError):
    """A file homoflow wrote cannot be read back (truncated, corrupt, incomplete, or from
    something else); the message names the file and says what to do."""


# ---------------------------------------------------------------------------------------
# writing


def jsonable(obj):
    """``obj`` as plain JSON types: numpy scalars and arrays as numbers and lists, non-finite
    floats as strings ("inf", "nan"), callables by name, dataclasses as dicts, anything else
    by ``str`` (so ``json.dumps`` never fails)."""
    np = sys.modules.get("numpy")   # no numpy object exists before numpy is imported
    if np is None:
        import numpy as np
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "__array__"):  # numpy and JAX arrays
        a = np.asarray(obj)
        return jsonable(a.item() if a.ndim == 0 else a.tolist())
    if callable(obj):
        return getattr(obj, "__name__", type(obj).__name__)
    return str(obj)


def atomic_write(path, write: Callable) -> Path:
    """Write ``path`` by calling ``write(binary_file)`` on a temporary file beside it, then
    renaming it into place (atomic on POSIX). On failure the old file is left untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(jsonable(obj), indent=indent) + "\n")


def write_npz(path, **arrays) -> Path:
    import numpy as np

    return atomic_write(path, lambda f: np.savez(f, **arrays))


def write_csv(path, names: list[str], columns: list) -> Path:
    """A CSV file with a header line; values quoted where they hold a comma."""
    def cell(v):
        s = str(v.item() if hasattr(v, "item") else v)
        return f'"{s}"' if "," in s else s

    n = len(columns[0]) if columns else 0
    lines = [",".join(names)] + [",".join(cell(c[r]) for c in columns) for r in range(n)]
    return write_text(path, "\n".join(lines) + "\n")


def write_figure(fig, path, dpi: float | None = None, close: bool = True) -> Path:
    """A matplotlib figure as PNG (atomically), then closed (``close``): pyplot keeps every
    open figure, so a sweep or a long session that saves many would grow without bound."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi or fig.dpi))
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)


def config_hash(config) -> str:
    """A short hash of a configuration (its canonical JSON): what a file was computed for."""
    blob = json.dumps(jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# reading


def _corrupt(path, what: str, advice: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {what}; {advice}")


def read_json(path, advice: str = "the file is damaged: delete it and recompute") -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _corrupt(path, "missing", advice) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _corrupt(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                       f"{len(text)} bytes, truncated?)", advice) from None


def read_npz(path, required: Iterable[str] = (),
             advice: str = "the file is damaged: delete it and recompute") -> dict:
    """Every array of an ``.npz`` file, read eagerly; ``required`` names arrays that must be
    there. Pickled objects are refused (``allow_pickle=False``)."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise _corrupt(path, "missing", advice) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise _corrupt(path, f"not a readable .npz archive ({type(e).__name__}: {e}; "
                       f"truncated or overwritten?)", advice) from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise _corrupt(path, f"lacks the arrays {missing} (it holds {sorted(arrays)[:12]})",
                       advice)
    return arrays


# ---------------------------------------------------------------------------------------
# output directories


def is_homoflow_dir(d: Path) -> bool:
    return any((d / m).exists() for m in MARKERS)


def prepare_out(out, *, resume: bool = False, overwrite: bool = False,
                what: str = "run") -> Path:
    """Check (and create) the output directory before any compute.

    The directory must be creatable and writable. An existing non-empty directory is
    refused unless ``resume`` (continue what is there) or ``overwrite`` (clear it first;
    only a directory homoflow wrote is cleared). Raises ``ValueError`` naming the path."""
    d = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out {d} exists and is not a directory")
    if resume:
        if not d.is_dir():
            raise ValueError(f"--resume {d}: no such directory")
    elif d.is_dir() and any(d.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {d} exists and is not empty (an earlier {what}?); pass "
                             f"--resume to continue it, --overwrite to replace it, or "
                             f"choose a new directory")
        if not is_homoflow_dir(d):
            raise ValueError(f"--overwrite {d}: the directory holds no homoflow output "
                             f"(none of {', '.join(MARKERS)}); refusing to clear it")
        lock = d / LOCK_NAME
        if lock.exists() and _lock_holder_alive(lock):
            raise ValueError(f"--overwrite {d}: {_lock_text(lock)} is still writing there")
        for p in d.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".homoflow-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {d} is not a writable directory ({e.strerror or e})") from None
    return d


def _lock_text(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"process {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def _lock_holder_alive(lock: Path) -> bool:
    try:
        info = json.loads(lock.read_text())
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True   # unreadable: being written right now, or not ours; assume held
    if host != socket.gethostname():
        return True   # cannot check another machine
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """``with DirectoryLock(dir):`` -- at most one process computes into ``dir``.

    The lock is a file created exclusively (``O_EXCL``) holding pid and host; a lock left
    by a process that no longer runs on this host is taken over. A live holder makes
    ``__enter__`` raise ``ValueError`` naming it."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_NAME
        self.held = False

    def __enter__(self):
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _lock_holder_alive(self.path):
                    raise ValueError(f"{self.path.parent} is locked by "
                                     f"{_lock_text(self.path)}, which is computing into it; "
                                     f"wait for it, or delete {self.path} if it is gone")
                self.path.unlink(missing_ok=True)   # stale: its process has ended
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(info)
            self.held = True
            return self
        raise ValueError(f"could not take the lock {self.path}")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


# ---------------------------------------------------------------------------------------
# interruption


class Interrupt:
    """``with Interrupt() as stop:`` -- SIGINT / SIGTERM set ``stop.requested`` instead of
    killing the process; the code polls it at safe points (a run's recorded rows, a sweep's
    finished batches) and writes everything it has. A second signal raises
    ``KeyboardInterrupt`` at once (``immediate=True``: the first one does). Outside the main
    thread it installs nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, message: str = "stopping at the next safe point and saving what is "
                                      "recorded; send it again to stop at once",
                 immediate: bool = False):
        self.message, self.immediate = message, immediate
        self.signal: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def __call__(self, *_) -> bool:   # usable directly as an ``on_record`` hook
        return self.requested

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nhomoflow: {signal.Signals(signum).name}: {self.message}", file=sys.stderr,
              flush=True)
        if self.immediate:
            raise KeyboardInterrupt

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False
