"""The bubblewrap sandbox: one test per attack, each ending as a failed run with the host unaffected."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from gcsl.errors import SandboxError
from gcsl.sandbox import Sandbox, SandboxLimits

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (apt-get install bubblewrap)"
)


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=5.0, max_output_bytes=64 * 1024))


def _processes_with_arg(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@needs_bwrap
def test_runs_code_as_unprivileged_user_in_private_tmp(box):
    res = box.run_python(
        "import os\nprint(os.getuid(), os.getcwd(), sorted(os.listdir('/tmp')))\n"
        "open('/tmp/scratch.txt', 'w').write('ok')\nprint(open('/tmp/scratch.txt').read())"
    )
    assert res.status == "ok", res
    uid, cwd, listing, scratch = res.stdout.split(maxsplit=3)
    assert (uid, cwd, listing, scratch.strip()) == ("65534", "/tmp", "[]", "ok")
    assert res.returncode == 0 and res.reason is None


@needs_bwrap
def test_hides_home_directories_and_root_only_files(box):
    res = box.run_python(
        "import os\n"
        "print(sorted(os.listdir('/root')))\n"
        "try:\n    open('/etc/shadow').read()\n    print('READ')\n"
        "except OSError as exc:\n    print(type(exc).__name__)"
    )
    assert res.status == "ok", res
    lines = res.stdout.splitlines()
    # Only the directory holding the bound-back interpreter may show under a hidden directory.
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    allowed = {Path(p).relative_to("/root").parts[0] for p in prefixes if p.startswith("/root/")}
    assert set(ast.literal_eval(lines[0])) <= allowed
    # Unreadable as a fresh uid, or not there at all: only a few files of /etc are shown.
    assert lines[1] in ("PermissionError", "FileNotFoundError")


@needs_bwrap
def test_report_channel_carries_runtime(box):
    res = box.run_python(
        "import json, os\n"
        "os.write(int(os.environ['GCSL_REPORT_FD']), json.dumps({'runtime_s': 0.25}).encode())"
    )
    assert res.status == "ok"
    assert res.report == {"runtime_s": 0.25} and res.runtime_s == 0.25


@needs_bwrap
def test_large_stdin_and_both_output_streams_do_not_deadlock(box):
    payload = "x" * 2_000_000
    source = (
        f"data = {payload!r}\nimport sys\n"
        "for _ in range(300):\n    sys.stdout.write('o' * 100)\n    sys.stderr.write('e' * 100)\n"
        "print(len(data))"
    )
    res = box.run_python(source)
    assert res.status == "ok", res.reason
    assert res.stdout.endswith("2000000\n") and res.stdout.count("o") == 30_000
    assert len(res.stderr) == 30_000


@needs_bwrap
def test_fork_bomb_is_contained(box):
    marker = f"gcsl-fork-{uuid.uuid4().hex[:8]}"
    source = (
        f"import os, subprocess\n"
        f"subprocess.Popen(['/bin/sleep', '300', '{marker}'])\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    start = time.perf_counter()
    res = box.run_python(source, limits=SandboxLimits(timeout_s=3.0, max_processes=16))
    assert res.status in ("timeout", "failed"), res
    assert time.perf_counter() - start < 10
    time.sleep(0.2)
    assert _processes_with_arg(marker) == [], "a sandboxed process outlived its run"
    # The host can still start processes.
    assert subprocess.run(["/bin/true"]).returncode == 0


@needs_bwrap
def test_memory_bomb_is_memory_exceeded(box):
    res = box.run_python(
        "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))",
        limits=SandboxLimits(timeout_s=10.0, memory_mb=256),
    )
    assert res.status == "memory_exceeded", res
    assert "256 MiB" in res.reason


@needs_bwrap
def test_infinite_loop_times_out_on_the_wall_clock(box):
    start = time.perf_counter()
    res = box.run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=1.0))
    assert res.status == "timeout" and "wall-clock" in res.reason
    assert 1.0 <= res.wall_s < 3.0 and time.perf_counter() - start < 4.0


@needs_bwrap
def test_cpu_limit_is_a_timeout(box):
    res = box.run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert res.status == "timeout" and "CPU time limit" in res.reason
    assert res.wall_s < 6.0


@needs_bwrap
def test_writes_outside_the_sandbox_do_not_reach_the_host(box, tmp_path):
    host_tmp_file = tmp_path / "pwned.txt"
    visible = Path(__file__).parent / f".sandbox-probe-{uuid.uuid4().hex[:8]}"
    visible.write_text("original\n")
    digest = hashlib.sha256(visible.read_bytes()).hexdigest()
    try:
        source = (
            f"import errno, os\nresults = []\n"
            f"for path, mode in [({str(visible)!r}, 'a'), ({str(visible)!r}, 'w'), "
            f"({str(Path(__file__).parent / 'new-file.txt')!r}, 'w')]:\n"
            "    try:\n        open(path, mode).write('pwned')\n        results.append('WROTE')\n"
            "    except OSError as exc:\n        results.append(errno.errorcode[exc.errno])\n"
            f"os.makedirs({str(tmp_path)!r}, exist_ok=True)\n"
            f"open({str(host_tmp_file)!r}, 'w').write('pwned')\n"
            "print(' '.join(results))"
        )
        res = box.run_python(source)
        assert res.status == "ok", res
        outcomes = res.stdout.split()
        # Read-only (EROFS/EACCES), or not visible at all (ENOENT) when the checkout sits under a
        # path the sandbox replaces, such as /tmp.
        assert len(outcomes) == 3 and set(outcomes) <= {"EROFS", "EACCES", "ENOENT"}, outcomes
        assert hashlib.sha256(visible.read_bytes()).hexdigest() == digest
        assert not (Path(__file__).parent / "new-file.txt").exists()
        assert not host_tmp_file.exists()  # it went to the sandbox's private /tmp
    finally:
        visible.unlink()


@needs_bwrap
def test_network_is_unreachable_even_to_host_loopback(box):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
                conn.close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        source = (
            f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
            "    socket.create_connection(addr, timeout=2).close()\n"
        )
        res = box.run_python(source)
    finally:
        done.set()
        thread.join()
        server.close()
    assert res.status == "failed"
    assert "ConnectionRefusedError" in res.stderr or "unreachable" in res.stderr
    assert accepted == []


@needs_bwrap
def test_killing_the_parent_or_everything_leaves_the_host_alone(box):
    sentinel = subprocess.Popen(["/bin/sleep", "60"])
    try:
        # Killing its parent or every process it can see ends (at worst) the run itself.
        for source in (
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(1)",
            "import os, signal\nos.kill(-1, signal.SIGKILL)\nimport time\ntime.sleep(1)",
        ):
            res = box.run_python(source)
            assert res.status in ("failed", "ok"), res
            assert sentinel.poll() is None, "a host process was killed from the sandbox"
        # Host pids do not exist inside the sandbox's pid namespace.
        res = box.run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
        assert res.status == "failed" and "ProcessLookupError" in res.stderr
        assert sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()


@needs_bwrap
def test_output_flood_is_cut_at_the_cap(box):
    start = time.perf_counter()
    res = box.run_python("while True:\n    print('x' * 1000)")
    assert res.status == "output_limit"
    assert len(res.stdout) == 64 * 1024
    assert time.perf_counter() - start < 4.0


@needs_bwrap
def test_run_many_keeps_order_across_workers(box):
    results = box.run_many([f"print({i} * {i})" for i in range(6)], workers=2)
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]
    assert all(r.status == "ok" for r in results)


def test_refuses_to_run_without_bubblewrap_unless_allowed(monkeypatch, tmp_path):
    # A PATH that has prlimit but no bwrap, as on a machine without bubblewrap installed.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("prlimit"), bin_dir / "prlimit")
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(SandboxError, match="apt-get install bubblewrap") as info:
        Sandbox()
    assert "\n" not in str(info.value)
    box = Sandbox(SandboxLimits(timeout_s=5.0), allow_unsafe=True)
    assert not box.isolated and "UNSANDBOXED" in box.description
    res = box.run_python("print('unsafe but limited')")
    assert res.status == "ok" and res.stdout == "unsafe but limited\n"
    assert box.run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=0.5)).status == "timeout"


@needs_bwrap
@pytest.mark.parametrize("payload", ["[" * 200_000, "[" * 1000 + "]" * 1000, '"' + "x" * (4 << 20) + '"'],
                         ids=["deep", "deep-balanced", "huge"])
def test_hostile_report_is_rejected_with_a_reason_not_raised(box, payload):
    # Deep nesting made json's recursive decoder raise RecursionError out of run(); huge reports
    # were buffered without bound.
    res = box.run_python(
        "import os\nfd = int(os.environ['GCSL_REPORT_FD'])\n"
        f"data = {payload!r}.encode()\n"
        "while data:\n    data = data[os.write(fd, data):]\n"
    )
    assert res.status == "ok", res
    assert res.report is None and res.report_error.startswith("report rejected"), res.report_error


def _bwrap_zombies() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            if b"(bwrap)" in stat and stat[stat.rfind(b")") + 2 :].split()[0] == b"Z":
                found.add(int(entry.name))
    return found


@needs_bwrap
def test_a_harmless_run_leaves_no_defunct_processes(box):
    before = _bwrap_zombies()
    for _ in range(3):
        res = box.run_python("print('fine')")
        assert res.status == "ok" and res.stdout == "fine\n", res
        assert _bwrap_zombies() - before == set(), "a finished run left a defunct bwrap process"
    res = box.run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=0.5))
    assert res.status == "timeout"
    assert _bwrap_zombies() - before == set(), "a killed run left a defunct bwrap process"


@needs_bwrap
def test_unix_sockets_on_the_host_file_system_are_unreachable(box, tmp_path):
    # --unshare-net does not cover file-system AF_UNIX sockets: a world-writable one anywhere the
    # sandbox can see (here: /run, /tmp and the checkout) would be a way out.
    places = [tmp_path, Path(__file__).parent]
    if os.access("/run", os.W_OK):
        places.append(Path("/run"))
    servers, paths = [], []
    try:
        for place in places:
            path = place / f".gcsl-sock-{uuid.uuid4().hex[:8]}"
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.chmod(path, 0o777)
            server.listen(4)
            server.setblocking(False)
            servers.append(server)
            paths.append(str(path))
        res = box.run_python(
            f"import errno, socket\nfor path in {paths!r}:\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "    try:\n        s.connect(path)\n        print('CONNECTED', path)\n"
            "    except OSError as exc:\n        print(errno.errorcode[exc.errno])\n"
        )
        assert res.status == "ok", res
        assert "CONNECTED" not in res.stdout, res.stdout
        assert len(res.stdout.split()) == len(paths)
        for server in servers:
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        for server in servers:
            server.close()
        for path in paths:
            Path(path).unlink(missing_ok=True)


FORKED_HOGS = """
import os, time
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray(b"x") * (200 << 20)   # touched, so really resident
            time.sleep(3)
            os._exit(0)
        except MemoryError:
            os._exit(3)
    children.append(pid)
held = 0
for pid in children:
    _, status = os.waitpid(pid, 0)
    held += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
print(held)
"""


@needs_bwrap
def test_forked_children_share_one_memory_budget(box):
    if "per-run cgroup" not in box.limits_in_force:
        pytest.skip(f"no writable cgroup here, so {box.limits_in_force}")
    # Each child stays under the per-process address-space limit; together they would hold 1.2 GB.
    res = box.run_python(FORKED_HOGS, limits=SandboxLimits(timeout_s=20.0, memory_mb=256))
    assert res.status == "memory_exceeded", res
    assert "256 MiB" in res.reason and "all processes" in res.reason
    assert int(res.stdout.strip() or 0) <= 1, "more than one 200 MB child held its memory at once"
    leftovers = [p for p in Path("/sys/fs/cgroup").glob(f"*/**/gcsl-run-{os.getpid()}-*")]
    assert leftovers == [], "a run's cgroup was not removed"


@needs_bwrap
def test_process_budget_is_per_run(box):
    if "per-run cgroup" not in box.limits_in_force:
        pytest.skip(f"no writable cgroup here, so {box.limits_in_force}")
    res = box.run_python(
        "import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n"
        "    n += 1\nprint(n)\n",
        limits=SandboxLimits(timeout_s=10.0, max_processes=8),
    )
    assert res.status == "ok", res
    assert int(res.stdout) < 8
