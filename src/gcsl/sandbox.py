"""Runs untrusted programs (model-written code) in a bubblewrap sandbox with hard resource limits.

Every run is one fresh process tree inside new namespaces, started by ``bwrap``:

* only what a Python program needs of the host is shown, **read-only**: the system directories
  (``/usr``, ``/bin``, ``/lib*``, ``/sbin``), the interpreter's prefixes and a few files of
  ``/etc`` (the loader cache, ``passwd``, ``group``, ``localtime``, ``alternatives``). Everything
  else (``/home``, ``/root``, ``/run``, ``/var``, ``/opt``, ``/srv``, checkouts, data, and the
  Unix sockets in them) is absent; ``/tmp`` is a private, size-capped tmpfs, ``/dev`` a minimal
  one;
* **no network** (``--unshare-net``: only a private loopback), new PID, IPC, UTS and (where
  possible) cgroup namespaces, ``--die-with-parent`` and ``--new-session`` (no terminal
  injection);
* all capabilities dropped and the program runs as an unprivileged user. When gcsl itself runs
  as root, the outer bwrap sets up the mounts as root, then ``setpriv`` switches to a random,
  unused uid for this run only (so the process limit below counts this run's processes alone)
  and an inner bwrap enters a user namespace with ``--disable-userns``;
* rlimits set in the child by ``prlimit``: CPU seconds, address space, number of processes,
  file size, open files, no core dumps;
* where a cgroup can be made (cgroup v1 ``memory`` and ``pids`` hierarchies writable, as for
  root; or a delegated cgroup v2 directory named by ``$GCSL_SANDBOX_CGROUP``, or the own cgroup v2
  when it can enable both controllers), each run gets its **own cgroup**: its memory (all its
  processes together, swap included) and its number of tasks are capped **per run**, a run the
  kernel OOM-kills is ``memory_exceeded``, and the cgroup (with any process left in it) is
  removed after the run. Where none can be made the fallback is rlimits only, which are per
  process: a program that forks N children can hold N times the address-space limit.
  :attr:`Sandbox.limits_in_force` (recorded beside evaluation results) says which is in force;
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
* reading what is shown: the system directories and the interpreter's prefixes (including its
  site-packages) are readable, as are the few ``/etc`` files above; a secret or a world-writable
  Unix socket placed *inside* those directories would be reachable (sockets in ``/run``,
  ``/tmp``, ``/var``, home directories and checkouts are not; abstract sockets are covered by
  the network namespace). As an ordinary user the program keeps that user's host uid behind the
  namespace, so file permissions are those of the user;
* exhausting the machine as a whole: without a cgroup (see above) memory is capped per process
  only; even with one, the CPU share of many parallel runs and page cache outside the run are
  not accounted;
* orphans other than bwrap's: to reap bwrap's pid-namespace init, the process that uses the
  sandbox becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``); other orphaned descendants of
  that process then wait for it, not for init, to be reaped;
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
    "REPORT_MAX_BYTES",
    "CGROUP_ENV",
]

SANDBOX_STATUSES = ("ok", "failed", "timeout", "memory_exceeded", "output_limit", "error")
REPORT_FD_ENV = "GCSL_REPORT_FD"
# A report is a small JSON object; anything larger (or nested deeper) is rejected, never parsed.
REPORT_MAX_BYTES = 64 * 1024
_REPORT_MAX_DEPTH = 32
# Directories that commonly hold secrets, sockets or other users' files; replaced by empty tmpfs.
DEFAULT_HIDDEN_PATHS = ("/home", "/root", "/run", "/var/run", "/var/tmp", "/mnt", "/media", "/srv")

# What the sandbox shows of the host, read-only: system directories (links stay links) and the
# few files of /etc that the dynamic loader and the C library read.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives", "passwd", "group",
                "nsswitch.conf")

_INSTALL_HINT = "install it with `apt-get install bubblewrap` (or your distribution's package)"
_UNSAFE_HINT = "or pass allow_unsafe=True / --unsafe-no-sandbox to run code without isolation"
# Random per-run uids for root mode live far above any real account (and below 2**31 - 1).
_ROOT_UID_BASE = 1_500_000_000
_ROOT_UID_SPAN = 1 << 26
_SANDBOX_UID = 65534  # uid the program sees inside its user namespace ("nobody")
_probe_lock = threading.Lock()
# Child processes this module started and has not reaped yet (guarded by _reaper_lock).
_reaper_lock = threading.Lock()
_spawned: set[int] = set()
_subreaper_set = False
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
    the program wrote to ``$GCSL_REPORT_FD`` (None if it wrote none or it was rejected, in which
    case ``report_error`` says why: too large, nested too deep, not a JSON object).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    report: dict[str, Any] | None = None
    reason: str | None = None
    report_error: str | None = None

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
            _become_subreaper()
            problem = self._probe()
            if problem is not None:
                if not allow_unsafe:
                    raise SandboxError(
                        f"bubblewrap cannot create a sandbox here ({problem}); it needs bubblewrap "
                        f">= 0.8 and user namespaces (sysctl kernel.unprivileged_userns_clone=1), "
                        f"{_UNSAFE_HINT}"
                    )
                self.isolated = False
        self._cgroups = _cgroup_plan()
        if self._cgroups is not None:
            _sweep_stale_cgroups(self._cgroups)
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
            return f"UNSANDBOXED (rlimits, timeout and output cap only); {self.limits_in_force}"
        who = (
            "root: mounts as root, then a per-run unprivileged uid" if self._as_root else "unprivileged user"
        )
        return (
            f"bubblewrap ({who}; read-only system directories only, private /tmp, no network, new "
            f"pid/ipc/uts namespaces); {self.limits_in_force}"
        )

    @property
    def limits_in_force(self) -> str:
        """How memory and processes are limited: per run (a cgroup) or per process (rlimits only)."""
        if self._cgroups is None:
            return "limits: rlimits per process only (no writable cgroup; memory is not capped per run)"
        return f"limits: per-run cgroup {self._cgroups.version} (memory, pids) plus rlimits per process"

    # -- command construction -------------------------------------------------------------
    def _kept_paths(self) -> list[str]:
        """Interpreter directories that must stay visible even under a hidden directory."""
        paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        real = Path(os.path.realpath(self.python))
        paths.add(str(real.parent.parent))
        paths.add(str(Path(self.python).absolute().parent.parent))
        return sorted(p for p in paths if p and p != "/")

    def _mount_args(self, limits: SandboxLimits) -> list[str]:
        # Only what a Python program needs, read-only: the system directories, the interpreter's
        # prefixes and a few files of /etc. The rest of the host (its sockets, its data) is absent.
        args: list[str] = []
        shown: set[str] = {"/"}
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
                shown.add(d)
        args += ["--perms", "0755", "--dir", "/etc"]
        for name in _ETC_ENTRIES:
            path = os.path.join("/etc", name)
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        args += [
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
            shown.add(h)
        system = [d for d in _SYSTEM_DIRS if d in shown]
        for keep in self._kept_paths():
            if not os.path.isdir(keep) or any(keep == d or keep.startswith(d + "/") for d in system):
                continue  # already visible
            # bwrap creates missing parents with mode 0700, which an unprivileged uid cannot cross.
            parts = Path(keep).parts
            for i in range(2, len(parts)):
                parent = str(Path(*parts[:i]))
                if parent not in shown:
                    args += ["--perms", "0755", "--dir", parent]
                    shown.add(parent)
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
                    with _reaper_lock:  # registered, so a concurrent reaper leaves its status alone
                        proc = subprocess.Popen(
                            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}
                        )
                        _spawned.add(proc.pid)
                    try:
                        _, stderr = proc.communicate(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        _, stderr = proc.communicate()
                        raise
                    finally:
                        with _reaper_lock:
                            _spawned.discard(proc.pid)
                    err = stderr.decode(errors="replace").strip().splitlines()
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
        cgroup = _RunCgroup.create(self._cgroups, lim)
        # A lone surrogate cannot be encoded; escaped, it fails as the program's syntax error.
        data = stdin.encode("utf-8", "backslashreplace") if isinstance(stdin, str) else (stdin or b"")
        report_r, report_w = os.pipe()
        env = dict(self._env, **{REPORT_FD_ENV: str(report_w)})
        command = self._command(list(argv), lim)
        if cgroup is not None:
            command = cgroup.wrap(command)
        start = time.perf_counter()
        try:
            with _reaper_lock:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(report_w,),
                    env=env,
                    start_new_session=True,
                )
                _spawned.add(proc.pid)
        except OSError as exc:
            os.close(report_r)
            os.close(report_w)
            if cgroup is not None:
                cgroup.remove()
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
            with _reaper_lock:
                _spawned.discard(proc.pid)
            # bwrap's pid-namespace init outlives the bwrap we started by a moment; as a child
            # subreaper this process inherits it and reaps it here, so no zombie is left behind.
            if self.isolated:
                _reap_orphans()
            oom = cgroup.oom_killed() if cgroup is not None else False
            if cgroup is not None:
                cgroup.remove()
        wall = time.perf_counter() - start
        out, err, rep = (bytes(b) for b in bufs)
        return self._result(proc.returncode, out, err, rep, wall, stopped, lim, oom=oom)

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
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a sandbox bug must cost one item, not the whole evaluation
                    results[i] = SandboxResult(
                        "error", None, "", "", 0.0, reason=f"sandbox failure: {type(exc).__name__}: {exc}"
                    )
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
        *,
        oom: bool = False,
    ) -> SandboxResult:
        report, report_error = _parse_report(rep)
        result = SandboxResult(
            "ok",
            rc,
            out.decode("utf-8", errors="replace"),
            err.decode("utf-8", errors="replace"),
            wall,
            report,
            report_error=report_error,
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
        elif oom:  # the kernel killed one of its processes: the run as a whole went over budget
            result.status, result.reason = (
                "memory_exceeded",
                f"out of memory (run memory limit {lim.memory_mb} MiB, all processes together)",
            )
        elif rc != 0 and err.startswith(_CGROUP_JOIN_ERROR.encode()):
            result.status, result.reason = "error", err.decode(errors="replace").strip().splitlines()[0]
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


# -- cgroups ---------------------------------------------------------------------------------
_CGROUP_FS = Path("/sys/fs/cgroup")
CGROUP_ENV = "GCSL_SANDBOX_CGROUP"
_CGROUP_JOIN_ERROR = "gcsl-sandbox: cannot join the run's cgroup"
_PIDS_OVERHEAD = 4  # bwrap's own processes (monitor, pid-namespace init, inner bwrap) share the budget
_JOIN_SCRIPT = (
    'while [ "$1" != -- ]; do { echo $$ > "$1"; } 2>/dev/null || { echo "' + _CGROUP_JOIN_ERROR
    + ' ($1)" >&2; exit 125; }; '
    'shift; done; shift; exec "$@"'
)


@dataclass(frozen=True)
class _CgroupPlan:
    version: str  # "v1" or "v2"
    parents: tuple[Path, ...]  # v1: (memory, pids) directories; v2: (one directory,)


_cgroup_lock = threading.Lock()
_cgroup_cache: list[_CgroupPlan | None] = []


def _cgroup_plan() -> _CgroupPlan | None:
    """Where per-run cgroups can be made (probed once per process), or None: rlimits only."""
    with _cgroup_lock:
        if not _cgroup_cache:
            try:
                _cgroup_cache.append(_find_cgroups())
            except OSError:
                _cgroup_cache.append(None)
        return _cgroup_cache[0]


def _can_make_children(parent: Path) -> bool:
    probe = parent / f"gcsl-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        probe.rmdir()
    except OSError:
        pass
    return True


def _find_cgroups() -> _CgroupPlan | None:
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            own[c] = path
    explicit = os.environ.get(CGROUP_ENV)
    if explicit:  # a delegated cgroup v2 directory (e.g. from `systemd-run --user -p Delegate=yes`)
        parent = Path(explicit)
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        if {"memory", "pids"} <= set(enabled) and _can_make_children(parent):
            return _CgroupPlan("v2", (parent,))
        return None
    if (_CGROUP_FS / "memory" / "memory.limit_in_bytes").exists() and (_CGROUP_FS / "pids").is_dir():
        parents = []
        for c in ("memory", "pids"):
            rel = own.get(c, "/").strip("/")
            candidate = _CGROUP_FS / c / rel
            parents.append(candidate if rel and candidate.is_dir() else _CGROUP_FS / c)
        if all(_can_make_children(p) for p in parents):
            return _CgroupPlan("v1", tuple(parents))
        return None
    if (_CGROUP_FS / "cgroup.controllers").exists():
        parent = _CGROUP_FS / own.get("", "/").strip("/")
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        if not {"memory", "pids"} <= enabled:
            # Fails (EBUSY) where this cgroup holds processes itself: then rlimits only.
            (parent / "cgroup.subtree_control").write_text("+memory +pids")
        if _can_make_children(parent):
            return _CgroupPlan("v2", (parent,))
    return None


def _sweep_stale_cgroups(plan: _CgroupPlan) -> None:
    """Removes run cgroups left by an evaluator that was killed before it could remove them."""
    for parent in plan.parents:
        try:
            stale = list(parent.glob("gcsl-run-*"))
        except OSError:
            continue
        for d in stale:
            try:
                pid = int(d.name.split("-")[2])
                os.kill(pid, 0)
                continue  # its evaluator still runs (or the pid was reused): leave it
            except (ValueError, IndexError):
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            _RunCgroup(plan, [d]).remove()  # kills what is left in it, then removes it


class _RunCgroup:
    """The cgroup(s) of one run: made before it starts, removed (with any leftover process) after."""

    def __init__(self, plan: _CgroupPlan, dirs: list[Path]) -> None:
        self.plan, self.dirs = plan, dirs

    @classmethod
    def create(cls, plan: _CgroupPlan | None, lim: SandboxLimits) -> _RunCgroup | None:
        if plan is None:
            return None
        name = f"gcsl-run-{os.getpid()}-{secrets.token_hex(6)}"
        run = cls(plan, [])
        try:
            for parent in plan.parents:
                d = parent / name
                d.mkdir()
                run.dirs.append(d)
            pids = str(lim.max_processes + _PIDS_OVERHEAD)
            if plan.version == "v1":
                mem, pid_dir = run.dirs
                if lim.memory_mb is not None:
                    (mem / "memory.limit_in_bytes").write_text(str(lim.memory_mb << 20))
                    if (mem / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                        (mem / "memory.memsw.limit_in_bytes").write_text(str(lim.memory_mb << 20))
                (pid_dir / "pids.max").write_text(pids)
            else:
                (d,) = run.dirs
                if lim.memory_mb is not None:
                    (d / "memory.max").write_text(str(lim.memory_mb << 20))
                    if (d / "memory.swap.max").exists():
                        (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(pids)
        except OSError:
            run.remove()
            return None
        return run

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started by a shell that first moves itself into the run's cgroup(s)."""
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["/bin/sh", "-c", _JOIN_SCRIPT, "gcsl-sandbox", *procs, "--", *command]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this run for exceeding the memory limit."""
        name = "memory.oom_control" if self.plan.version == "v1" else "memory.events"
        try:
            text = (self.dirs[0] / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return value.strip() not in ("", "0")
        return False  # kernels before 4.13 do not count: such a run shows as killed by SIGKILL

    def remove(self) -> None:
        """Kills whatever is still in the run's cgroups and removes them (best effort, bounded)."""
        for d in self.dirs:
            for _ in range(200):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    try:
                        for pid in (d / "cgroup.procs").read_text().split():
                            _kill_pid(int(pid))
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.005)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- reaping ----------------------------------------------------------------------------------
def _become_subreaper() -> None:
    """Makes this process adopt its orphaned descendants (bwrap's namespace init) so it can reap them."""
    global _subreaper_set
    with _reaper_lock:
        if _subreaper_set:
            return
        _subreaper_set = True
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _reap_orphans(wait_s: float = 1.0) -> None:
    """Reaps adopted bwrap processes (never a child that a Popen of this module still waits for)."""
    me = os.getpid()
    deadline = time.perf_counter() + wait_s
    while True:
        pending = False
        with _reaper_lock:
            for pid in _adopted_bwraps(me):
                if pid in _spawned:
                    continue
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                pending = pending or done == 0
        if not pending or time.perf_counter() >= deadline:
            return
        time.sleep(0.002)


def _adopted_bwraps(parent: int) -> list[int]:
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
        fields = stat[stat.rfind(b")") + 2 :].split()
        if comm == b"bwrap" and len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(name))
    return found


def _parse_report(rep: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The report as a dict, or None and why it was rejected; never raises (the bytes are hostile)."""
    if len(rep) > REPORT_MAX_BYTES:
        return None, f"report rejected: larger than {REPORT_MAX_BYTES} bytes"
    if not rep.strip():
        return None, None
    text = rep.decode("utf-8", errors="replace")
    # Bound the nesting before parsing: json's recursive decoder raises RecursionError on deep input.
    if _json_depth(text) > _REPORT_MAX_DEPTH:
        return None, f"report rejected: nested deeper than {_REPORT_MAX_DEPTH} levels"
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"report rejected: not valid JSON ({type(exc).__name__})"
    if not isinstance(parsed, dict):
        return None, "report rejected: not a JSON object"
    return parsed, None


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text``, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


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
                which = readers[fd]
                buf = bufs[which]
                if which == 2:
                    # Keep one byte past the cap so an oversized report is seen as oversized.
                    buf += chunk[: max(0, REPORT_MAX_BYTES + 1 - len(buf))]
                    continue
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
