"""The output folder one run owns: a lock, a check that it holds no other run's outputs, and writes that
survive a kill at any instant.

    output_dir/
      .lock           an OS file lock (fcntl.flock) held by the training process; the kernel drops it when
                      the process dies, so a crashed run never blocks the next one. It holds the holder's pid,
                      host and start time, which the refusal names.
      checkpoints/    training state (finetune.train.checkpoint); `latest` names the newest
      model/          the trained model as a plain transformers checkpoint, replaced atomically
      adapter/        LoRA runs: the adapter alone (PEFT format where it can express it)
      metrics.jsonl   one JSON record per log / evaluation

`replace_dir` swaps a freshly written folder into place with one atomic rename (Linux renameat2
RENAME_EXCHANGE), so there is no instant without a complete `model/`; where the kernel or file system lacks
it, two renames are used and an interrupted swap is repaired on the next write or load (`recover_dir`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import errno
import os
import shutil
import socket

LOCK_FILE = ".lock"
# What a finished or interrupted run leaves behind; a fresh run into a folder holding any of these is refused
# (metrics.jsonl only when it holds training records: evaluating before training is not a run).
RUN_OUTPUTS = ("checkpoints", "model", "metrics.jsonl")
# What overwrite_output_dir removes: those, and what an earlier run wrote beside them (so nothing stale is left).
REPLACED_ON_OVERWRITE = RUN_OUTPUTS + ("adapter", "eval_predictions.jsonl", "tensorboard")


class OutputDirError(RuntimeError):
    """The output folder cannot be used by this run: held by another process, holding another run, not writable."""


_HELD: dict[str, list] = {}  # lock path -> [fd, holders]: this process's locks (re-entrant: the CLI, then fit)


class RunLock:
    """An exclusive lock on `output_dir/.lock` for as long as the run lasts (a context manager). Re-entrant
    within one process; another process (or a crashed one's successor) is refused while it is held."""

    def __init__(self, output_dir: str):
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self._key: str | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        ensure_writable(self.output_dir)
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputDirError(
                f"output_dir {self.output_dir} is in use by another training run ({self._holder()}); wait for it "
                "to finish, or give this run another output_dir") from None
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    def release(self) -> None:
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            import fcntl

            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
            del _HELD[self._key]
        self._key = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def ensure_writable(directory: str) -> None:
    """Create `directory` if needed and prove a file can be written in it, or raise OutputDirError saying why."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f"output_dir {directory}: exists and is a file, not a folder; choose another output_dir")
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise OutputDirError(f"output_dir {directory}: not writable ({err.strerror or err}); choose a folder you can "
                             "write to") from None


def previous_run_outputs(directory: str) -> list[str]:
    """The outputs of an earlier run that `directory` holds (checkpoints with at least one step, model/, ...)."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(directory, name)
        if name == "checkpoints":
            if os.path.isdir(path) and any(n.startswith("step-") for n in os.listdir(path)):
                found.append(name)
        elif name == "metrics.jsonl":
            if os.path.isfile(path) and _has_training_records(path):
                found.append(name)
        elif os.path.exists(path) or os.path.exists(path + ".old"):
            found.append(name)
    return found


def _has_training_records(path: str) -> bool:
    """metrics.jsonl of an earlier training run (an evaluation alone writes only eval records)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any('"split": "train"' in line for line in f)
    except OSError:
        return False


def claim_for_fresh_run(directory: str, overwrite: bool, dry_run: bool = False) -> list[str]:
    """Refuse a fresh (not resumed) run into a folder holding another run's outputs unless `overwrite`;
    with `overwrite`, remove those outputs (and say which; not with `dry_run`). Returns what was removed."""
    found = previous_run_outputs(directory)
    if not found:
        return []
    if not overwrite:
        raise OutputDirError(
            f"output_dir {directory} already holds the outputs of another run ({', '.join(found)}); resume it "
            "(fit(..., resume='latest'), `finetune train ... --resume latest`), choose another output_dir, or set "
            "overwrite_output_dir=True (`--set train.overwrite_output_dir=true`) to replace them")
    if dry_run:
        return found
    for name in REPLACED_ON_OVERWRITE:
        path = os.path.join(directory, name)
        for p in (path, path + ".old", path + ".tmp"):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    return found


# ---------------------------------------------------------------------------------------------
# Atomic folder replacement

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap two paths (both must exist). False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def fsync_tree(directory: str) -> None:
    """Flush every file of a freshly written folder to disk, then the folder itself."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_dir(path: str) -> None:
    """Repair a two-rename swap that was interrupted: `path` missing but `path.old` holds the previous one."""
    old = path + ".old"
    if not os.path.exists(path) and os.path.isdir(old):
        os.replace(old, path)


def replace_dir(tmp: str, path: str) -> None:
    """Put the complete folder `tmp` at `path`, replacing what is there, with no instant without `path`."""
    recover_dir(path)
    fsync_tree(tmp)
    if os.path.isdir(path) and exchange_dirs(tmp, path):
        shutil.rmtree(tmp)  # now holds the previous folder
        return
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)  # from here until the next line, recover_dir() can put `old` back
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    parent = os.path.dirname(os.path.abspath(path))
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
