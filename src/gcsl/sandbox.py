"""Runs untrusted programs (model-written code) in a bubblewrap sandbox with hard resource limits.

Every run is one fresh process tree inside new namespaces, started by ``bwrap``:

* the host file system is mounted **read-only** (``--ro-bind / /``); ``/tmp`` is a private,
  size-capped tmpfs; ``/home``, ``/root``, ``/run`` and a few other directories are replaced by
  empty tmpfs (the interpreter's own prefix is bound back so Python still starts);
* **no network** (``--unshare-net``: only a private loopback), new PID, IPC, UTS and (where
  possible) cgroup namespaces, ``--die-with-parent`` and ``--new-session`` (no terminal
  injection);
* all capabilities dropped and the program runs as an unprivileged user. When gcsl itself runs
  as root, the outer bwrap sets up the mounts as root, then ``setpriv`` switches to a random,
  unused uid for this run only (so the process limit below counts this run's processes alone)
  and an inner bwrap enters a user namespace with ``--disable-userns``;
* rlimits set in the child by ``prlimit``: CPU seconds, address space, number of processes,
  file size, open files, no core dumps;
* a wall-clock timeout, after which the whole sandbox is killed (SIGKILL to bwrap's process
  group; with a PID namespace, the death of its init takes every process inside with it);
* stdout and stderr are read concurrently (no pipe deadlock) and capped: a run that writes more
  than ``max_output_bytes`` to either is killed and reported as ``output_limit``.

Whatever the program does, :meth:`Sandbox.run` returns a :class:`SandboxResult`; it never raises
for the program's behaviour. Programs may report structured results (e.g. a measured runtime)
as one JSON document written to the file descriptor named by ``$GCSL_REPORT_FD``.

What it does NOT protect against:

* kernel exploits (namespaces, rlimits and a dropped uid are no defence against a kernel bug;
  the kernel's attack surface is the full system-call interface: there is no seccomp filter);
* CPU side channels (Spectre-class leaks, timing of shared caches) and noisy-neighbour effects
  on timings measured in the sandbox;
* reading host files outside the hidden directories: as an ordinary user the program keeps
  that user's host uid (behind the namespace), so it can read whatever the user can read there;
  as root it runs under a fresh uid and can read world-readable files (``/etc``, ``/usr``,
  ``/opt``, a project checked out outside ``/home``). Keep secrets out of reach of both;
* exhausting the machine as a whole: each run's address space, processes and ``/tmp`` are
  capped, but there is no cgroup, so page cache, kernel memory and the CPU share of many
  parallel runs are not accounted;
* a forged report: the report channel is written from inside the sandbox, so a hostile program
  can claim any runtime or verdict. The sandbox protects the host, not the honesty of a score.

``allow_unsafe=True`` (CLI ``--unsafe-no-sandbox``) runs without bubblewrap: only rlimits, the
timeout, the output cap and the process-group kill remain; the code can read and write every file
the user can and open network connections. Use it only for code you trust.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcsl.errors import SandboxError

__all__ = [
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "SANDBOX_STATUSES",
    "DEFAULT_HIDDEN_PATHS",
    "REPORT_FD_ENV",
]

SANDBOX_STATUSES = ("ok", "failed", "timeout", "memory_exceeded", "output_limit", "error")
REPORT_FD_ENV = "GCSL_REPORT_FD"
# Directories that commonly hold secrets, sockets or other users' files; replaced by empty tmpfs.
DEFAULT_HIDDEN_PATHS = ("/home", "/root", "/run", "/var/run", "/var/tmp", "/mnt", "/media", "/srv")

_INSTALL_HINT = "install it with `apt-get install bubblewrap` (or your distribution's package)"
_UNSAFE_HINT = "or pass allow_unsafe=True / --unsafe-no-sandbox to run code without isolation"
# Random per-run uids for root mode live far above any real account (and below 2**31 - 1).
_ROOT_UID_BASE = 1_500_000_000
_ROOT_UID_SPAN = 1 << 26
_SANDBOX_UID = 65534  # uid the program sees inside its user namespace ("nobody")
_probe_lock = threading.Lock()
_probed: dict[tuple, str | None] = {}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    >>> SandboxLimits(timeout_s=2.0).cpu_seconds
    3
    """

    timeout_s: float = 10.0
    memory_mb: int | None = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 256
    max_output_bytes: int = 1 << 20
    tmp_size_mb: int = 64
    cpu_s: int | None = None

    @property
    def cpu_seconds(self) -> int:
        """CPU-time limit: the explicit ``cpu_s``, else the wall timeout rounded up plus one second."""
        if self.cpu_s is not None:
            return int(self.cpu_s)
        return math.ceil(self.timeout_s) + 1


@dataclass
class SandboxResult:
    """What one sandboxed run did.

    ``status`` is one of ``ok`` (exit code 0), ``failed`` (non-zero exit or killed by a signal),
    ``timeout`` (wall clock or CPU limit), ``memory_exceeded``, ``output_limit`` (killed for writing
    too much) and ``error`` (the sandbox itself could not run the program). ``report`` is the JSON
    the program wrote to ``$GCSL_REPORT_FD`` (None if it wrote none or it did not parse).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    report: dict[str, Any] | None = None
    reason: str | None = None

    @property
    def runtime_s(self) -> float | None:
        """The runtime the program itself reported (``report["runtime_s"]``), if any."""
        value = (self.report or {}).get("runtime_s")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Sandbox:
    """Runs programs in bubblewrap with resource limits; refuses to run unsandboxed unless told to.

    >>> box = Sandbox(SandboxLimits(timeout_s=5))           # doctest: +SKIP
    >>> box.run_python("print(6 * 7)").stdout              # doctest: +SKIP
    '42\\n'
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        allow_unsafe: bool = False,
        python: str | None = None,
        hide_paths: Sequence[str] = DEFAULT_HIDDEN_PATHS,
    ) -> None:
        self.limits = limits or SandboxLimits()
        # The interpreter itself, not a virtual environment's link to it: a venv may live under a
        # path the sandbox hides (/tmp, /home), and candidate code needs only the standard library.
        self.python = python or os.path.realpath(sys.executable)
        self.hide_paths = tuple(hide_paths)
        self._prlimit = shutil.which("prlimit")
        if self._prlimit is None:
            raise SandboxError(
                "the sandbox needs `prlimit` (util-linux) to set resource limits: "
                "install it with `apt-get install util-linux`"
            )
        bwrap = shutil.which("bwrap")
        self._as_root = os.geteuid() == 0
        self._bwrap = bwrap
        self._setpriv = shutil.which("setpriv") if self._as_root else None
        if bwrap is None:
            if not allow_unsafe:
                raise SandboxError(f"bubblewrap (`bwrap`) is not installed: {_INSTALL_HINT}, {_UNSAFE_HINT}")
            self.isolated = False
        else:
            if self._as_root and self._setpriv is None:
                raise SandboxError(
                    "running as root, the sandbox needs `setpriv` (util-linux) to drop to an "
                    "unprivileged user: install it with `apt-get install util-linux`"
                )
            self.isolated = True
            problem = self._probe()
            if problem is not None:
                if not allow_unsafe:
                    raise SandboxError(
                        f"bubblewrap cannot create a sandbox here ({problem}); it needs bubblewrap "
                        f">= 0.8 and user namespaces (sysctl kernel.unprivileged_userns_clone=1), "
                        f"{_UNSAFE_HINT}"
                    )
                self.isolated = False
        self._env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            # Single-threaded numeric libraries: steadier timings and a small address space.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }

    @property
    def description(self) -> str:
        """One line saying how runs are isolated (recorded beside evaluation results)."""
        if not self.isolated:
            return "UNSANDBOXED (rlimits, timeout and output cap only)"
        who = (
            "root: mounts as root, then a per-run unprivileged uid" if self._as_root else "unprivileged user"
        )
        return f"bubblewrap ({who}; read-only root, private /tmp, no network, new pid/ipc/uts namespaces)"

    # -- command construction -------------------------------------------------------------
    def _kept_paths(self) -> list[str]:
        """Interpreter directories that must stay visible even under a hidden directory."""
        paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        real = Path(os.path.realpath(self.python))
        paths.add(str(real.parent.parent))
        paths.add(str(Path(self.python).absolute().parent.parent))
        return sorted(p for p in paths if p and p != "/")

    def _mount_args(self, limits: SandboxLimits) -> list[str]:
        args = [
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--perms",
            "1777",
            "--size",
            str(limits.tmp_size_mb << 20),
            "--tmpfs",
            "/tmp",
        ]
        hidden = [h for h in self.hide_paths if os.path.isdir(h) and not os.path.islink(h) and h != "/tmp"]
        for h in hidden:
            args += ["--tmpfs", h]
        for keep in self._kept_paths():
            parent = next((h for h in hidden if keep == h or keep.startswith(h.rstrip("/") + "/")), None)
            if parent is None or not os.path.isdir(keep):
                continue
            # bwrap creates missing parents with mode 0700, which an unprivileged uid cannot cross.
            rel = Path(keep).relative_to(parent)
            for i in range(1, len(rel.parts)):
                args += ["--perms", "0755", "--dir", str(Path(parent, *rel.parts[:i]))]
            args += ["--ro-bind", keep, keep]
        return args + ["--chdir", "/tmp"]

    def _limit_args(self, limits: SandboxLimits) -> list[str]:
        def both(v: int) -> str:
            return f"{v}:{v}"

        args = [
            self._prlimit,
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--nproc={both(limits.max_processes)}",
            f"--fsize={both(limits.max_file_mb << 20)}",
            f"--nofile={both(limits.max_open_files)}",
            "--core=0:0",
        ]
        if limits.memory_mb is not None:
            args.append(f"--as={both(limits.memory_mb << 20)}")
        return args + ["--"]

    def _command(self, argv: list[str], limits: SandboxLimits) -> list[str]:
        limited = self._limit_args(limits) + argv
        if not self.isolated:
            return limited
        namespaces = [
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
        ]
        userns = [
            "--unshare-user",
            "--disable-userns",
            "--uid",
            str(_SANDBOX_UID),
            "--gid",
            str(_SANDBOX_UID),
        ]
        if not self._as_root:
            return [
                self._bwrap,
                *namespaces,
                *userns,
                *self._mount_args(limits),
                "--cap-drop",
                "ALL",
                "--",
                *limited,
            ]
        # As root a user namespace would map the program to host uid 0, which the kernel exempts
        # from RLIMIT_NPROC; so mount as root, then become a fresh unprivileged uid for this run.
        uid = _ROOT_UID_BASE + secrets.randbelow(_ROOT_UID_SPAN)
        return [
            self._bwrap,
            *namespaces,
            *self._mount_args(limits),
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
            "--",
            self._setpriv,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--",
            self._bwrap,
            *userns,
            "--die-with-parent",
            "--bind",
            "/",
            "/",
            "--chdir",
            "/tmp",
            "--",
            *limited,
        ]

    def _probe(self) -> str | None:
        """Runs the interpreter once in the sandbox; returns why it failed, or None."""
        key = (self._bwrap, self.python, self._as_root, self.hide_paths)
        with _probe_lock:
            if key not in _probed:
                cmd = self._command([self.python, "-I", "-c", "pass"], SandboxLimits(timeout_s=30))
                try:
                    proc = subprocess.run(cmd, capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
                    err = proc.stderr.decode(errors="replace").strip().splitlines()
                    _probed[key] = (
                        None if proc.returncode == 0 else (err[-1] if err else f"exit {proc.returncode}")
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    _probed[key] = str(exc)
            return _probed[key]

    # -- running ----------------------------------------------------------------------------
    def run(
        self, argv: Sequence[str], *, stdin: bytes | str | None = None, limits: SandboxLimits | None = None
    ) -> SandboxResult:
        """Runs ``argv`` in the sandbox and returns what happened (never raises for the program).

        >>> Sandbox().run(["/bin/echo", "hi"]).stdout        # doctest: +SKIP
        'hi\\n'
        """
        lim = limits or self.limits
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        report_r, report_w = os.pipe()
        env = dict(self._env, **{REPORT_FD_ENV: str(report_w)})
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                self._command(list(argv), lim),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(report_w,),
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(report_r)
            os.close(report_w)
            return SandboxResult(
                "error", None, "", "", time.perf_counter() - start, reason=f"could not start: {exc}"
            )
        os.close(report_w)
        deadline = start + lim.timeout_s
        try:
            bufs, stopped = _pump(proc, data, report_r, deadline, lim.max_output_bytes)
            if stopped is None and not _wait_exit(proc.pid, deadline):
                stopped = "timeout"
        finally:
            # The pid is not reaped yet, so the group id cannot have been reused by another process.
            _kill_group(proc.pid)
            os.close(report_r)
            proc.wait()
        wall = time.perf_counter() - start
        out, err, rep = (bytes(b) for b in bufs)
        return self._result(proc.returncode, out, err, rep, wall, stopped, lim)

    def run_python(self, source: str, *, limits: SandboxLimits | None = None) -> SandboxResult:
        """Runs Python ``source`` (fed on stdin, so its size is not limited by argv) in the sandbox.

        >>> Sandbox().run_python("import os; print(os.getuid())").stdout   # doctest: +SKIP
        '65534\\n'
        """
        # -I: ignore PYTHON* variables and the user site; the program starts in the private /tmp.
        return self.run([self.python, "-I", "-"], stdin=source, limits=limits)

    def run_many(
        self,
        sources: Sequence[str],
        *,
        workers: int = 1,
        progress: bool = False,
        desc: str = "sandbox",
        limits: SandboxLimits | None = None,
        on_result: Callable[[int, SandboxResult], None] | None = None,
    ) -> list[SandboxResult]:
        """Runs many Python programs, ``workers`` at a time, with an optional tqdm progress bar.

        Results come back in input order. ``on_result(index, result)`` is called as each finishes.

        >>> [r.stdout for r in Sandbox().run_many(["print(1)", "print(2)"], workers=2)]  # doctest: +SKIP
        ['1\\n', '2\\n']
        """
        from tqdm.auto import tqdm

        results: list[SandboxResult | None] = [None] * len(sources)
        with (
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
            tqdm(total=len(sources), desc=desc, disable=not progress, leave=False) as bar,
        ):
            futures = {pool.submit(self.run_python, src, limits=limits): i for i, src in enumerate(sources)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(1)
        return results  # type: ignore[return-value]

    def _result(
        self,
        rc: int | None,
        out: bytes,
        err: bytes,
        rep: bytes,
        wall: float,
        stopped: str | None,
        lim: SandboxLimits,
    ) -> SandboxResult:
        report = None
        if rep.strip():
            try:
                parsed = json.loads(rep.decode("utf-8", errors="replace"))
                report = parsed if isinstance(parsed, dict) else None
            except ValueError:
                report = None
        result = SandboxResult(
            "ok",
            rc,
            out.decode("utf-8", errors="replace"),
            err.decode("utf-8", errors="replace"),
            wall,
            report,
        )
        sig = None
        if rc is not None and rc < 0:
            sig = -rc
        elif self.isolated and rc is not None and 128 < rc <= 128 + 64:
            sig = rc - 128  # bwrap exits with 128 + N when its child dies of signal N
        if stopped == "timeout":
            result.status, result.reason = "timeout", f"wall-clock timeout after {lim.timeout_s:g} s"
        elif stopped == "output_limit":
            result.status, result.reason = (
                "output_limit",
                f"wrote more than {lim.max_output_bytes} bytes of output",
            )
        elif sig == signal.SIGXCPU:
            result.status, result.reason = "timeout", f"CPU time limit of {lim.cpu_seconds} s exceeded"
        elif rc != 0 and _out_of_memory(err):
            limit = f"{lim.memory_mb} MiB" if lim.memory_mb is not None else "no limit"
            result.status, result.reason = "memory_exceeded", f"out of memory (address-space limit {limit})"
        elif rc != 0 and self.isolated and err.startswith(b"bwrap:"):
            result.status, result.reason = "error", err.decode(errors="replace").strip().splitlines()[0]
        elif rc != 0:
            result.status = "failed"
            result.reason = (
                f"killed by signal {sig} ({signal.Signals(sig).name})"
                if sig and sig in _SIGNALS
                else f"exit code {rc}"
            )
        return result


_SIGNALS = {s.value for s in signal.Signals}


def _out_of_memory(err: bytes) -> bool:
    tail = err[-4096:]
    return b"MemoryError" in tail or b"Cannot allocate memory" in tail or b"std::bad_alloc" in tail


def _pump(
    proc: subprocess.Popen, data: bytes, report_fd: int, deadline: float, cap: int
) -> tuple[list[bytearray], str | None]:
    """Feeds stdin and drains stdout, stderr and the report pipe until EOF, the deadline or the cap."""
    sel = selectors.DefaultSelector()
    bufs = [bytearray(), bytearray(), bytearray()]
    readers = {proc.stdout.fileno(): 0, proc.stderr.fileno(): 1, report_fd: 2}
    for fd in readers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    view, pos = memoryview(data), 0
    if data:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    try:
        while sel.get_map():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return bufs, "timeout"
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pos += os.write(fd, view[pos : pos + 65536])
                    except (BrokenPipeError, BlockingIOError) as exc:
                        if isinstance(exc, BlockingIOError):
                            continue
                        pos = len(data)
                    if pos >= len(data):
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[readers[fd]]
                buf += chunk
                if len(buf) > cap:
                    del buf[cap:]
                    return bufs, "output_limit"
        return bufs, None
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass


def _wait_exit(pid: int, deadline: float) -> bool:
    """Waits (without reaping) until ``pid`` exits or the deadline passes; True if it exited."""
    delay = 0.0005
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.perf_counter() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
