#!/usr/bin/env python3
"""batchrun's benchmark suite: ``python benchmarks/run.py`` (or ``make bench``).

Everything runs against the embedded endpoint (``batchrun mock-server``) started
in its own process on 127.0.0.1. With two or more CPUs the endpoint is pinned to
one core and every measured client process to another, so client and server
never share a core. Results are printed as a table and written to
``benchmarks/results.md`` (``BENCH_RESULTS`` overrides the path).

1. Throughput at no server latency: batchrun end to end vs ``minimal_loop.py``
   (aiohttp + asyncio.Semaphore) at concurrency 64 and 256, in alternating
   pairs; the median ratio and its range. Plus the ``openai`` SDK loop
   (``sdk_loop.py``) at concurrency 64 on fewer rows, when ``openai`` imports.
2. 50 ms server latency, concurrency 64: batchrun rows/s against 64 / 0.05 s.
3. Peak RSS of the batchrun process as the input grows: 10k, 100k and 1,000,000
   rows (``BENCH_FULL=0``: 10k, 100k and 300k), and along the growth between the
   two largest, at 10,000,000 (measured when ``BENCH_MEM_SIZES`` holds it: a run
   of half an hour or more).
4. ``batchrun --help`` start-up time, and that pandas/pyarrow are not imported on it.
5. The cost of ``--rpm``/``--tpm`` pacing that never has to wait, in alternating pairs.
6. Structured outputs: what parsing and validating an answer costs, and the
   triage schema against plain text end to end.
7. Personal data (``pii``): the tickets with a contact block each (e-mail, a
   phone number in one of several formats, and in some a card number, an IBAN,
   an IP address; every value distinct), the same job with and without
   ``--pii email,phone,card,iban,ip`` end to end in alternating pairs, and the
   scanning alone in µs per KB of prompt (needs ``batchrun[pii]``).
8. Sporadic 429s and 503s (5% of answers, Retry-After 1 s, no budget spent):
   rows/s against the fault-free run on the same rows, in alternating pairs.
9. A rate limit the server enforces (``--rpm-limit``): the share of the limit
   batchrun gets and the 429s it takes per row.
10. The Batch API with a deadline (``batch_api.py``): a hybrid job against the
   endpoint's queue vs online vs the batch alone: cost at a 50% batch discount,
   and how long before the deadline it finished.
11. The Ray engine (``--engine ray``, when ``ray`` imports) against the local
    engine, in alternating pairs: rows/s and the CPU per row of the whole process
    tree (driver, Ray's own processes, the senders), start-up included and beyond it.
12. ``batchrun report --by id`` over a 1,000,000-row output (``BENCH_ONLY=report``;
    made without sending by ``report_outputs.py``, in its own process): seconds and
    peak RSS for json (the median of 3), csv and the table, and ``--by model`` and
    ``--by day`` beside them (``BENCH_REPORT_ROWS`` sets the rows).
13. ``batchrun merge`` of 3 shard outputs of 1,000,000 rows each (outputs made
    without sending: ``make_outputs.py``) and of 300,000 rows in all: peak RSS and
    seconds, which should not grow with the rows (``BENCH_ONLY=merge``;
    ``BENCH_MERGE_SIZES``: rows in all, default ``300000,3000000``).
14. A rerun of a finished job of 10,000,000 rows (``BENCH_ONLY=rerun``;
    ``BENCH_FULL=0``: 1,000,000; ``BENCH_RERUN_ROWS``): the input written, the
    finished output made as a run leaves it (``make_outputs.py``), then ``batchrun
    run`` again: seconds and peak RSS to answer from the output that nothing is
    left to send.

Environment switches: ``BENCH_FULL=0`` (leave out the 1M-row memory run),
``BENCH_ROWS`` (rows of the throughput runs, default 20000), ``BENCH_PAIRS``
(alternating pairs per comparison, default 3), ``BENCH_MEM_SIZES`` (memory-run sizes,
default ``10000,100000``, or ``10000,100000,300000`` with ``BENCH_FULL=0``),
``BENCH_ONLY`` (comma list of throughput, sdk, pacing, structured, pii, memory, latency, help,
sporadic, ratelimit, batchapi, ray, report, merge, rerun), ``BENCH_KEEP=1`` (keep the temp dir).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import batch_api  # noqa: E402
from make_tickets import write_files  # noqa: E402

PY = sys.executable
TEMPLATE = "Summarize this ticket: {ticket}"
MODEL = "m"

ROWS = int(os.environ.get("BENCH_ROWS", "20000"))
PAIRS = max(1, int(os.environ.get("BENCH_PAIRS", "3")))
FULL = os.environ.get("BENCH_FULL", "1") not in ("", "0")
KEEP = os.environ.get("BENCH_KEEP", "") not in ("", "0")
RESULTS = Path(os.environ.get("BENCH_RESULTS", str(HERE / "results.md")))
SECTIONS = (
    "throughput",
    "sdk",
    "pacing",
    "structured",
    "pii",
    "memory",
    "merge",
    "rerun",
    "latency",
    "help",
    "sporadic",
    "ratelimit",
    "batchapi",
    "ray",
    "report",
)
ONLY = (
    tuple(x.strip() for x in os.environ.get("BENCH_ONLY", "").split(",") if x.strip()) or SECTIONS
)

THROUGHPUT_CONCURRENCY = (64, 256)
SDK_ROWS = min(3000, ROWS)
LATENCY_MS = 50
LATENCY_CONCURRENCY = 64
LATENCY_RUNS = 3
MEMORY_CONCURRENCY = 256
MEMORY_SIZES = tuple(
    int(x)
    for x in os.environ.get(
        "BENCH_MEM_SIZES", "10000,100000,300000" if not FULL else "10000,100000"
    ).split(",")
    if x
) + ((1_000_000,) if FULL else ())
HELP_RUNS = 10

# Flat memory: merge and the rerun of a finished job (make_outputs.py makes their outputs).
PROJECTED_ROWS = 10_000_000
"""The size the memory section projects its growth to (issue #17's 10 million rows)."""
MERGE_SIZES = tuple(
    int(x) for x in os.environ.get("BENCH_MERGE_SIZES", "300000,3000000").split(",") if x
)
MERGE_SHARDS = 3
RERUN_ROWS = int(os.environ.get("BENCH_RERUN_ROWS", "10000000" if FULL else "1000000"))
RERUN_BASE_URL = "http://127.0.0.1:9/v1"
"""The rerun sends nothing: no endpoint needs to listen."""
TARGET_MERGE_MB = 300.0
TARGET_RERUN_S = 10.0

TARGET_THROUGHPUT_RATIO = 1.0
TARGET_LATENCY_SHARE = 0.95
TARGET_RSS_MB = 300.0
TARGET_HELP_S = 0.3
TARGET_PACING_OVERHEAD = 0.05
TARGET_STRUCTURED_OVERHEAD = 0.10
TARGET_PII_RATIO = 0.4
TARGET_PII_US_PER_KB = 100.0
PII_KINDS = "email,phone,card,iban,ip"
TRIAGE_SCHEMA = HERE.parent / "jobs" / "triage_schema.json"
STRUCTURED_LATENCY_ROWS = 5000
SPORADIC_ROWS = min(5000, ROWS)
SPORADIC_CONCURRENCY = 64
SPORADIC_FLAGS = ("--fault-rate", "0.05", "--faults", "429,503", "--retry-after-s", "1")
TARGET_SPORADIC_EXTRA_S = 3.0
LIMIT_RPM = 30_000
LIMIT_ROWS = min(5000, ROWS)
LIMIT_CONCURRENCY = (16, 64)
LIMIT_RUNS = 2
TARGET_LIMIT_CONCURRENCY = 16  # the job's default; more workers take more 429s a row
TARGET_LIMIT_SHARE = 0.95
TARGET_LIMIT_429S = 0.05
RAY_CONCURRENCY = 64
RAY_SMALL_ROWS = 500
"""A run this small is nearly all start-up: the CPU beyond it is what the rows cost."""

# batchrun report over many groups (report_outputs.py makes its output).
REPORT_ROWS = int(os.environ.get("BENCH_REPORT_ROWS", "1000000"))
REPORT_RUNS = 3
"""Runs of the headline case (``--by id --format json``); the others run once."""
REPORT_CASES = (
    ("--by id, json", ("--by", "id", "--format", "json")),
    ("--by id, csv", ("--by", "id", "--format", "csv")),
    ("--by id, table", ("--by", "id")),
    ("--by model, table", ("--by", "model")),
    ("--by day, json", ("--by", "day", "--format", "json")),
)
TARGET_REPORT_S = 10.0

# No proxy may route a loopback request anywhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- CPUs


def _cpu_plan() -> tuple[int | None, int | None]:
    """(client core, server core): two distinct cores when there are two, else no pinning."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


CLIENT_CPU, SERVER_CPU = _cpu_plan()


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _busy_s() -> float:
    """CPU seconds spent busy by the whole machine so far (all CPUs, /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return sum(v[i] for i in (0, 1, 2, 5, 6, 7) if i < len(v)) / _CLK_TCK


def _steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat (0, 0 when unreadable)."""
    try:
        with open("/proc/stat") as fh:
            parts = fh.readline().split()[1:]
    except OSError:
        return 0, 0
    values = [int(v) for v in parts]
    steal = values[7] if len(values) > 7 else 0
    return steal, sum(values[:8])


# ---------------------------------------------------------------------- processes


@dataclass
class Proc:
    rc: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    stdout: str
    stderr: str
    machine_busy_s: float = 0.0


def run_proc(
    cmd: Sequence[str],
    *,
    cpu: int | None,
    timeout_s: float,
    workdir: Path,
    env: dict[str, str] | None = None,
    tree_keep: set[int] | None = None,
) -> Proc:
    """Run ``cmd`` pinned to ``cpu``; wall time from spawn to reaped exit, with the
    child's own CPU time and peak RSS from wait4. Killed after ``timeout_s``.
    With ``tree_keep`` (the pids of this process's children that outlive the run,
    the endpoint's), the CPU time is that of the whole process tree the command
    started (see ``TreeCpu``)."""
    out_path = workdir / "proc.stdout"
    err_path = workdir / "proc.stderr"
    timed_out = threading.Event()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        busy0 = _busy_s()
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=_pin(cpu),
            env=env,
            cwd=workdir,
        )

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        tree = TreeCpu(proc.pid, tree_keep) if tree_keep is not None else None
        try:
            if tree is not None:
                _wait_exited(proc.pid)  # exited, not reaped: its own CPU time is still readable
                tree.stop()
            while True:
                try:
                    _, status, usage = os.wait4(proc.pid, 0)
                    break
                except InterruptedError:
                    continue
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        if tree_keep is not None:
            _reap_orphans(tree_keep)
        busy = _busy_s() - busy0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu_s = usage.ru_utime + usage.ru_stime
    result = Proc(
        rc=proc.returncode,
        wall_s=wall,
        cpu_s=tree.cpu_s if tree is not None else cpu_s,
        maxrss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        machine_busy_s=busy,
    )
    if timed_out.is_set():
        raise BenchError(f"timed out after {timeout_s:.0f}s: {' '.join(cmd[:6])} ...")
    return result


def _set_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux
    PR_SET_CHILD_SUBREAPER): the processes Ray leaves when its driver exits come
    back to it, to be counted and reaped."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _processes() -> dict[int, tuple[int, float]]:
    """Every process: its parent and its own CPU seconds so far (a zombie's: final)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with (
                contextlib.suppress(OSError, IndexError, ValueError),
                open(f"/proc/{name}/stat") as fh,
            ):
                fields = fh.read().rsplit(")", 1)[1].split()
                found[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return found


def _child_pids() -> list[int]:
    me = os.getpid()
    return [pid for pid, (parent, _) in _processes().items() if parent == me]


def _wait_exited(pid: int) -> None:
    """Until ``pid`` (a child) has exited, leaving it unreaped."""
    while True:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            return
        except InterruptedError:
            continue


class TreeCpu:
    """The CPU time of a command and of every process it started, sampled every
    ``interval_s`` from /proc (``resource.RUSAGE_CHILDREN`` misses them: Ray's
    processes are reaped by parents that do not wait for them). The command's
    own time is read once it has exited, before it is reaped; the others' is
    their last sample, a lower bound short of at most their last ``interval_s``."""

    def __init__(self, root: int, keep: set[int], interval_s: float = 0.1) -> None:
        self.root = root
        self.keep = keep
        self.interval_s = interval_s
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        procs = _processes()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in procs.items():
            children.setdefault(parent, []).append(pid)
        # The command's tree, and what its processes left to this one (the subreaper).
        roots = [self.root] + [pid for pid in children.get(os.getpid(), []) if pid not in self.keep]
        stack = list(dict.fromkeys(roots))
        while stack:
            pid = stack.pop()
            if pid in procs:
                self.seen[pid] = max(self.seen.get(pid, 0.0), procs[pid][1])
            stack.extend(children.get(pid, []))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(self.seen.values())


def _reap_orphans(keep: set[int], timeout_s: float = 30.0) -> None:
    """Reap every child left after a run but ``keep`` (Ray's processes, handed
    here by the subreaper as their parents exit), killed after ``timeout_s``: no
    run leaves a process behind to load the next."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        left = [pid for pid in _child_pids() if pid not in keep]
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


class MockServer:
    """``batchrun mock-server`` in its own process on 127.0.0.1, pinned to the server core."""

    def __init__(
        self, workdir: Path, latency_ms: float = 0.0, flags: Sequence[str] = (), name: str = ""
    ) -> None:
        self.workdir = workdir
        self.latency_ms = latency_ms
        self.flags = tuple(flags)
        self.name = name or f"{latency_ms:g}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.root = ""

    def __enter__(self) -> MockServer:
        ready = self.workdir / f"mock-ready-{self.name}"
        ready.unlink(missing_ok=True)
        self.log = (self.workdir / f"mock-{self.name}.log").open("wb")
        cmd = [PY, "-m", "batchrun", "mock-server", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--ready-file", str(ready), "--latency-ms", f"{self.latency_ms:g}", *self.flags]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin(SERVER_CPU),
            cwd=self.workdir,
        )
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"mock server exited with {self.proc.returncode}: "
                        + (self.workdir / f"mock-{self.name}.log").read_text()[-2000:]
                    )
                if time.monotonic() > deadline:
                    raise BenchError("mock server not ready within 30s")
                time.sleep(0.05)
            self.base_url = ready.read_text().strip()
            if not self.base_url.startswith("http://127.0.0.1:"):
                raise BenchError(f"mock server is not on loopback: {self.base_url}")
            self.root = self.base_url.removesuffix("/v1")
            self.stats()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        say(
            f"mock server ({self.latency_ms:g} ms latency{' '.join(('', *self.flags))}) "
            f"on {self.base_url}, pid {self.proc.pid}"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def _call(self, method: str, path: str) -> bytes:
        req = urllib.request.Request(
            self.root + path, method=method, data=b"" if method == "POST" else None
        )
        with _OPENER.open(req, timeout=30) as resp:
            body: bytes = resp.read()
            return body

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._call("GET", "/_stats"))
        data.pop("bodies", None)
        return data

    def cpu_s(self) -> float:
        assert self.proc is not None
        return _proc_cpu_s(self.proc.pid)


# -------------------------------------------------------------------------- runs


@dataclass
class Run:
    kind: str
    rows: int
    concurrency: int
    wall_s: float
    run_s: float | None
    cpu_s: float
    maxrss_mb: float
    server_busy: float
    other_load: float = 0.0
    send_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def run_rows_per_s(self) -> float | None:
        return self.rows / self.run_s if self.run_s else None

    @property
    def send_rows_per_s(self) -> float:
        return self.rows / self.send_s if self.send_s > 0 else 0.0

    @property
    def cpu_us_per_row(self) -> float:
        return self.cpu_s / self.rows * 1e6


def _log_times(path: Path) -> float | None:
    """Seconds from batchrun's ``start`` event (input scanned, journal open) to its
    ``summary`` event (Parquet written), from its JSON log (ms resolution)."""
    start = end = None
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            when = dt.datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
            if rec.get("event") == "start" and start is None:
                start = when
            elif rec.get("event") == "summary":
                end = when
    return end - start if start is not None and end is not None else None


def _timeout_for(rows: int, rate_floor: float = 300.0) -> float:
    return 60.0 + rows / rate_floor


def _check_output(path: Path, rows: int) -> float:
    """Check the output has every row, all ok; return the sending span in seconds
    (first ``started_at`` to last ``finished_at``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["status", "started_at", "finished_at"])
    if table.num_rows != rows:
        raise BenchError(f"{path.name} has {table.num_rows} rows, expected {rows}")
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py()
    if ok != rows:
        raise BenchError(f"{path.name}: {rows - ok} rows are not ok")
    first = pc.min(table["started_at"]).value
    last = pc.max(table["finished_at"]).value
    return float(last - first) / 1e6


def _finish(
    kind: str,
    server: MockServer,
    proc: Proc,
    cmd: Sequence[str],
    rows: int,
    concurrency: int,
    output: Path,
    server_cpu_before: float,
    run_s: float | None,
    extra: dict[str, Any],
) -> Run:
    server_cpu = server.cpu_s() - server_cpu_before
    if proc.rc != 0:
        raise BenchError(
            f"{kind} exited {proc.rc}: {' '.join(cmd[:4])} ...\n{proc.stderr[-3000:]}{proc.stdout[-1000:]}"
        )
    send_s = _check_output(output, rows)
    stats = server.stats()
    received = stats.get("requests")
    if server.flags:  # faults or a limit: retried rows make more requests than rows
        extra["outcomes"] = stats.get("by_outcome", {})
        if stats["by_outcome"].get("ok") != rows:
            raise BenchError(f"{kind}: the server answered {stats['by_outcome']} for {rows} rows")
    elif received != rows:
        raise BenchError(f"{kind}: the server received {received} requests for {rows} rows")
    if not extra.pop("keep_output", False):
        output.unlink(missing_ok=True)
    return Run(
        kind,
        rows,
        concurrency,
        proc.wall_s,
        run_s,
        proc.cpu_s,
        proc.maxrss_mb,
        server_cpu / proc.wall_s,
        max(0.0, proc.machine_busy_s - proc.cpu_s - server_cpu) / proc.wall_s,
        send_s,
        extra,
    )


def run_batchrun(
    server: MockServer,
    workdir: Path,
    input_path: Path,
    rows: int,
    concurrency: int,
    extra_args: Sequence[str] = (),
    kind: str = "batchrun",
    keep_output: bool = False,
    env: dict[str, str] | None = None,
) -> Run:
    """``batchrun run`` on ``rows`` of ``input_path``; with ``env`` (a Ray run),
    the CPU of its whole process tree."""
    output = workdir / "batchrun-out.parquet"
    log = workdir / "batchrun-log.jsonl"
    output.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    shutil.rmtree(workdir / "batchrun-out.parquet.partial", ignore_errors=True)
    cmd = [PY, "-m", "batchrun", "run", "--input", str(input_path)]
    cmd += ["--prompt-template", TEMPLATE, "--model", MODEL, "--base-url", server.base_url]
    cmd += ["--api-key-env", "", "--concurrency", str(concurrency), "--output", str(output), "-q"]
    cmd += ["--log-file", str(log), "--log-format", "json", *extra_args]
    server.reset()
    before = server.cpu_s()
    keep = {server.proc.pid} if env is not None and server.proc is not None else None
    proc = run_proc(
        cmd, cpu=CLIENT_CPU, timeout_s=_timeout_for(rows), workdir=workdir, env=env, tree_keep=keep
    )
    extra = {"keep_output": True} if keep_output else {}
    return _finish(
        kind, server, proc, cmd, rows, concurrency, output, before, _log_times(log), extra
    )


def run_loop_script(
    script: str,
    server: MockServer,
    workdir: Path,
    input_path: Path,
    rows: int,
    concurrency: int,
    kind: str,
) -> Run:
    output = workdir / f"{kind}-out.parquet"
    output.unlink(missing_ok=True)
    cmd = [PY, str(HERE / script), "--input", str(input_path), "--base-url", server.base_url]
    cmd += ["--model", MODEL, "--prompt-template", TEMPLATE, "--concurrency", str(concurrency)]
    cmd += ["--output", str(output)]
    server.reset()
    before = server.cpu_s()
    proc = run_proc(cmd, cpu=CLIENT_CPU, timeout_s=_timeout_for(rows, 100.0), workdir=workdir)
    stats: dict[str, Any] = {}
    with contextlib.suppress(ValueError, IndexError):
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
    # Comparable with batchrun's start→summary span: sending plus the Parquet write.
    run_s = stats["send_s"] + stats["write_s"] if "send_s" in stats else None
    return _finish(kind, server, proc, cmd, rows, concurrency, output, before, run_s, stats)


# -------------------------------------------------------------------------- inputs


def make_inputs(workdir: Path) -> Path:
    path = workdir / f"tickets-{ROWS}.jsonl"
    t = time.perf_counter()
    write_files(ROWS, path, seed=7)
    say(
        f"generated {ROWS:,} tickets in {time.perf_counter() - t:.1f}s ({path.stat().st_size / 1e6:.1f} MB)"
    )
    return path


def head_lines(src: Path, dst: Path, n: int) -> Path:
    with src.open("rb") as fin, dst.open("wb") as fout:
        for i, line in enumerate(fin):
            if i >= n:
                break
            fout.write(line)
    return dst


def stream_big_input(base: Path, dst: Path, n: int) -> Path:
    """``n`` rows written as a stream: the base tickets cycled, every id made unique."""
    import orjson

    with base.open("rb") as fh:
        tickets = [orjson.loads(line) for line in fh if line.strip()]
    width = max(7, len(str(n)))
    with dst.open("wb", buffering=1 << 20) as out:
        for i in range(n):
            row = tickets[i % len(tickets)]
            out.write(orjson.dumps({**row, "id": f"T-{i + 1:0{width}d}"}) + b"\n")
    return dst


# ---------------------------------------------------------------------- benchmarks


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass
class Pairs:
    """Alternating pairs (a, b): b/a ratio per pair."""

    a: list[Run] = field(default_factory=list)
    b: list[Run] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [rb.rows_per_s / ra.rows_per_s for ra, rb in zip(self.a, self.b, strict=True)]

    def cpu_ratios(self) -> list[float]:
        return [
            rb.cpu_us_per_row / ra.cpu_us_per_row for ra, rb in zip(self.a, self.b, strict=True)
        ]

    def best_ratio(self) -> float:
        """Fastest b over fastest a: interference only ever slows a run down, so the
        best of each is the least disturbed estimate."""
        return max(r.rows_per_s for r in self.b) / max(r.rows_per_s for r in self.a)


def alternate(n: int, first: Callable[[], Run], second: Callable[[], Run], label: str) -> Pairs:
    pairs = Pairs()
    for i in range(n):
        ra = first()
        rb = second()
        pairs.a.append(ra)
        pairs.b.append(rb)
        say(
            f"{label} pair {i + 1}/{n}: {ra.kind} {ra.rows_per_s:,.0f} rows/s, "
            f"{rb.kind} {rb.rows_per_s:,.0f} rows/s (ratio {rb.rows_per_s / ra.rows_per_s:.3f})"
        )
    return pairs


def bench_throughput(server: MockServer, workdir: Path, tickets: Path) -> dict[int, Pairs]:
    # Warm-up (discarded): page cache, .pyc files, the server's first connections.
    warm = head_lines(tickets, workdir / "warmup.jsonl", 2000)
    run_loop_script("minimal_loop.py", server, workdir, warm, 2000, 64, "minimal")
    run_batchrun(server, workdir, warm, 2000, 64)
    out: dict[int, Pairs] = {}
    for c in THROUGHPUT_CONCURRENCY:
        out[c] = alternate(
            PAIRS,
            lambda c=c: run_loop_script(
                "minimal_loop.py", server, workdir, tickets, ROWS, c, "minimal"
            ),
            lambda c=c: run_batchrun(server, workdir, tickets, ROWS, c),
            f"throughput c={c}",
        )
    return out


def bench_sdk(server: MockServer, workdir: Path, tickets: Path) -> dict[str, Run] | str:
    check = subprocess.run(
        [PY, "-c", "import openai; print(openai.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check.returncode != 0:
        return "skipped: `openai` is not importable (pip install openai to include it)"
    small = head_lines(tickets, workdir / f"sdk-input-{SDK_ROWS}.jsonl", SDK_ROWS)
    runs = {
        "sdk": run_loop_script("sdk_loop.py", server, workdir, small, SDK_ROWS, 64, "sdk"),
        "minimal": run_loop_script(
            "minimal_loop.py", server, workdir, small, SDK_ROWS, 64, "minimal"
        ),
        "batchrun": run_batchrun(server, workdir, small, SDK_ROWS, 64),
    }
    runs["sdk"].extra["openai_version"] = check.stdout.strip()
    say("sdk loop c=64: " + ", ".join(f"{k} {r.rows_per_s:,.0f} rows/s" for k, r in runs.items()))
    return runs


def bench_pacing(server: MockServer, workdir: Path, tickets: Path) -> Pairs:
    return alternate(
        PAIRS,
        lambda: run_batchrun(server, workdir, tickets, ROWS, 64),
        lambda: run_batchrun(
            server,
            workdir,
            tickets,
            ROWS,
            64,
            ("--rpm", "10000000", "--tpm", "10000000000"),
            kind="batchrun+rpm/tpm",
        ),
        "rpm/tpm c=64",
    )


def bench_structured(server: MockServer, workdir: Path, tickets: Path) -> dict[str, Any]:
    """Plain text vs the triage schema (every answer parsed, validated and typed),
    end to end; then what parsing, validating and typing cost per answer, timed
    alone on the answers of the last structured run."""
    pairs = alternate(
        PAIRS,
        lambda: run_batchrun(server, workdir, tickets, ROWS, 64),
        lambda: run_batchrun(
            server,
            workdir,
            tickets,
            ROWS,
            64,
            ("--response-schema", str(TRIAGE_SCHEMA)),
            kind="batchrun+schema",
        ),
        "structured c=64",
    )
    import pyarrow.parquet as pq

    from batchrun.config import load_job
    from batchrun.structured import load_structured

    schema_args = ("--response-schema", str(TRIAGE_SCHEMA))
    run_batchrun(
        server, workdir, tickets, ROWS, 64, schema_args, "batchrun+schema", keep_output=True
    )
    answers = (
        pq.read_table(workdir / "batchrun-out.parquet", columns=["completion"])
        .column(0)
        .to_pylist()
    )
    job = load_job(
        None,
        {
            "input": str(tickets),
            "model": MODEL,
            "prompt_template": TEMPLATE,
            "response_schema": str(TRIAGE_SCHEMA),
        },
    )
    structured = load_structured(job, set())
    assert structured is not None
    started = time.perf_counter()
    for text in answers:
        structured.parse(text, "stop", job.max_tokens)
    parse_us = (time.perf_counter() - started) / len(answers) * 1e6
    say(
        f"structured: parse + validate + type {parse_us:.1f} µs per answer ({len(answers):,} answers)"
    )
    # The same comparison where the endpoint is never the bottleneck (50 ms per
    # answer, far from busy): what is left of the difference is the client's.
    rows = min(ROWS, STRUCTURED_LATENCY_ROWS)
    small = head_lines(tickets, workdir / "tickets-structured.jsonl", rows)
    with MockServer(workdir, latency_ms=LATENCY_MS) as slow:
        paced = alternate(
            PAIRS,
            lambda: run_batchrun(slow, workdir, small, rows, LATENCY_CONCURRENCY),
            lambda: run_batchrun(
                slow, workdir, small, rows, LATENCY_CONCURRENCY, schema_args, "batchrun+schema"
            ),
            f"structured, {LATENCY_MS} ms latency",
        )
    return {"pairs": pairs, "parse_us": parse_us, "paced": paced}


_PHONE_FORMATS = (
    "+1 ({a}) 555-{n:04d}",
    "({a}) 555-{n:04d}",
    "{a}.555.{n:04d}",
    "{a}-555-{n:04d}",
    "+1 {a} 555 {n:04d}",
    "{a}555{n:04d}",
)
_AREAS = (212, 303, 312, 415, 617, 206, 512, 702)


def _luhn_complete(digits: str) -> str:
    """``digits`` with the check digit that makes it pass the Luhn check."""
    total = 0
    for i, d in enumerate(reversed(digits)):
        v = int(d) * (2 if i % 2 == 0 else 1)
        total += v - 9 if v > 9 else v
    return digits + str((10 - total % 10) % 10)


def _iban(bban: str, country: str = "DE") -> str:
    """A German IBAN with the right check digits (ISO 13616 mod 97)."""
    moved = bban + "".join(str(ord(c) - 55) for c in country) + "00"
    check = 98 - int(moved) % 97
    raw = f"{country}{check:02d}{bban}"
    return " ".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def pii_input(src: Path, dst: Path) -> Path:
    """The tickets with a contact block each, every value distinct: an e-mail
    address and a phone number (one of several formats) in every ticket, a card
    number in every third, an IBAN in every fourth, an IP address in every fifth."""
    import orjson

    with src.open("rb") as fin, dst.open("wb") as out:
        for i, line in enumerate(fin):
            row = orjson.loads(line)
            name = str(row["customer"]).split()[0].lower()
            phone = _PHONE_FORMATS[i % len(_PHONE_FORMATS)].format(
                a=_AREAS[i % len(_AREAS)], n=i % 10000
            )
            extra = [f"{name}.{i}@example.com", phone]
            if i % 3 == 0:
                card = _luhn_complete(f"4{i:014d}")
                extra.append("card " + " ".join(card[j : j + 4] for j in range(0, 16, 4)))
            if i % 4 == 0:
                extra.append("IBAN " + _iban(f"37040044{i:010d}"))
            if i % 5 == 0:
                extra.append(f"seen from 198.51.{i // 256 % 256}.{i % 256}")
            row["ticket"] = f"{row['ticket']}\n\n{row['customer']}\n" + "\n".join(extra)
            out.write(orjson.dumps(row) + b"\n")
    return dst


def bench_pii(server: MockServer, workdir: Path, tickets: Path) -> dict[str, Any] | str:
    """The same job on the same tickets (with personal data) with and without
    pii, end to end; then the scanning alone, timed over every rendered prompt."""
    check = subprocess.run(
        [PY, "-c", "import phonenumbers, stdnum"], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0:
        return (
            "skipped: phonenumbers or python-stdnum is not importable (pip install 'batchrun[pii]')"
        )
    path = pii_input(tickets, workdir / "tickets-pii.jsonl")
    args = ("--pii", PII_KINDS)
    pairs = alternate(
        PAIRS,
        lambda: run_batchrun(server, workdir, path, ROWS, 64),
        lambda: run_batchrun(server, workdir, path, ROWS, 64, args, kind="batchrun+pii"),
        "pii c=64",
    )
    run_batchrun(server, workdir, path, ROWS, 64, args, "batchrun+pii", keep_output=True)
    import orjson
    import pyarrow.parquet as pq

    from batchrun.pii import Scanner

    found = pq.read_table(workdir / "batchrun-out.parquet", columns=["pii_found"]).column(0)
    with path.open("rb") as fh:
        prompts = [TEMPLATE.format(ticket=orjson.loads(line)["ticket"]) for line in fh]
    size_kb = sum(len(p.encode()) for p in prompts) / 1024
    scanner = Scanner(PII_KINDS.split(","), {}, "US")  # fresh: nothing cached
    started = time.perf_counter()
    for prompt in prompts:
        scanner.pseudonymize([{"role": "user", "content": prompt}])
    scan_s = time.perf_counter() - started
    us_per_kb = scan_s * 1e6 / size_kb
    # The target's unit: a 1 KB ticket. Each prompt with the same values, brought
    # to 1 KB by plain text before it, through another fresh scanner.
    filler = "Please read the customer's message below and keep to its facts. " * 20
    tickets_1kb = [filler[: max(0, 1024 - len(p.encode()))] + p for p in prompts]
    scanner = Scanner(PII_KINDS.split(","), {}, "US")
    started = time.perf_counter()
    for ticket in tickets_1kb:
        scanner.pseudonymize([{"role": "user", "content": ticket}])
    us_per_ticket_1kb = (time.perf_counter() - started) * 1e6 / len(tickets_1kb)
    say(
        f"pii: scanning {us_per_kb:.1f} µs per KB ({scan_s * 1e6 / len(prompts):.1f} µs per prompt "
        f"of {size_kb * 1024 / len(prompts):,.0f} bytes), {sum(found.to_pylist()):,} values replaced"
    )
    return {
        "pairs": pairs,
        "us_per_kb": us_per_kb,
        "us_per_ticket_1kb": us_per_ticket_1kb,
        "us_per_prompt": scan_s * 1e6 / len(prompts),
        "prompt_bytes": size_kb * 1024 / len(prompts),
        "values": sum(found.to_pylist()),
    }


def bench_ray(server: MockServer, workdir: Path, tickets: Path) -> dict[str, Any] | str:
    """The Ray engine against the local engine, in alternating pairs, on the
    throughput input at concurrency 64; and one small run of each, whose CPU is
    nearly all start-up."""
    check = subprocess.run(
        [PY, "-c", "import ray; print(ray.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check.returncode != 0:
        return "skipped: `ray` is not importable (pip install 'batchrun[ray]' to include it)"
    # A Ray of its own for every run (never a cluster someone started here).
    env = {**os.environ, "RAY_ADDRESS": "local"}
    ray_args = ("--engine", "ray")

    def local(path: Path, rows: int) -> Run:
        return run_batchrun(server, workdir, path, rows, RAY_CONCURRENCY, env={**os.environ})

    def on_ray(path: Path, rows: int) -> Run:
        return run_batchrun(
            server, workdir, path, rows, RAY_CONCURRENCY, ray_args, "batchrun --engine ray", env=env
        )

    small = head_lines(tickets, workdir / f"ray-small-{RAY_SMALL_ROWS}.jsonl", RAY_SMALL_ROWS)
    on_ray(small, RAY_SMALL_ROWS)  # warm-up: page cache, .pyc files, Ray's first start here
    small_runs = {"local": local(small, RAY_SMALL_ROWS), "ray": on_ray(small, RAY_SMALL_ROWS)}
    pairs = alternate(
        PAIRS,
        lambda: local(tickets, ROWS),
        lambda: on_ray(tickets, ROWS),
        f"ray vs local c={RAY_CONCURRENCY}",
    )
    say(
        "ray small runs: "
        + ", ".join(f"{k} {r.cpu_s:.1f} s CPU, {r.wall_s:.1f} s" for k, r in small_runs.items())
    )
    return {"pairs": pairs, "small": small_runs, "ray_version": check.stdout.strip()}


def bench_memory(server: MockServer, workdir: Path, tickets: Path) -> list[Run]:
    runs = []
    for n in MEMORY_SIZES:
        path = workdir / f"big-{n}.jsonl"
        t = time.perf_counter()
        stream_big_input(tickets, path, n)
        say(
            f"memory: wrote {n:,} rows in {time.perf_counter() - t:.1f}s ({path.stat().st_size / 1e6:.0f} MB)"
        )
        run = run_batchrun(server, workdir, path, n, MEMORY_CONCURRENCY)
        path.unlink()
        runs.append(run)
        say(f"memory: {n:,} rows peak RSS {run.maxrss_mb:.0f} MB, {run.rows_per_s:,.0f} rows/s")
    return runs


def _make_outputs(*args: object) -> None:
    """``make_outputs.py`` in its own process: a child forked from this runner would
    count the runner's peak RSS as its own (ru_maxrss survives exec), so the runner
    stays small."""
    cmd = [PY, str(HERE / "make_outputs.py"), *(str(a) for a in args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"make_outputs.py {args[0]} exited {done.returncode}: {done.stderr[-2000:]}"
        )


def bench_merge(workdir: Path, tickets: Path) -> list[dict[str, Any]]:
    """``batchrun merge`` of MERGE_SHARDS shard outputs, at each of MERGE_SIZES rows
    in all: peak RSS and seconds."""
    import pyarrow.parquet as pq

    runs = []
    for n in MERGE_SIZES:
        folder = workdir / f"merge-{n}"
        folder.mkdir()
        t = time.perf_counter()
        _make_outputs("shards", folder, n, MERGE_SHARDS, tickets, TEMPLATE)
        parts = sorted(folder.glob("*.parquet"))
        size_mb = sum(p.stat().st_size for p in parts) / 1e6
        say(f"merge: made {MERGE_SHARDS} shards, {n:,} rows in {time.perf_counter() - t:.1f}s")
        merged = workdir / "merged.parquet"
        cmd = [PY, "-m", "batchrun", "merge", str(folder), "-o", str(merged), "-q"]
        proc = run_proc(cmd, cpu=CLIENT_CPU, timeout_s=_timeout_for(n, 3000.0), workdir=workdir)
        if proc.rc != 0:
            raise BenchError(f"merge exited {proc.rc}: {proc.stderr[-2000:]}")
        if pq.read_metadata(merged).num_rows != n:
            raise BenchError(f"the merged file does not hold the {n:,} rows")
        runs.append({"rows": n, "wall_s": proc.wall_s, "maxrss_mb": proc.maxrss_mb, "mb": size_mb})
        say(f"merge: {n:,} rows in {proc.wall_s:.1f}s, peak RSS {proc.maxrss_mb:.0f} MB")
        shutil.rmtree(folder)
        merged.unlink()
    return runs


def bench_rerun(workdir: Path, tickets: Path) -> dict[str, Any]:
    """A rerun of a finished job of RERUN_ROWS rows: the time and memory it takes
    to answer from the output that nothing is left to send."""
    n = RERUN_ROWS
    t = time.perf_counter()
    source = stream_big_input(tickets, workdir / f"rerun-{n}.jsonl", n)
    output = workdir / "rerun-out.parquet"
    _make_outputs("finished", source, output, n, RERUN_BASE_URL, TEMPLATE)
    setup_s = time.perf_counter() - t
    say(
        f"rerun: wrote {n:,} input rows ({source.stat().st_size / 1e9:.1f} GB) and their "
        f"finished output ({output.stat().st_size / 1e9:.1f} GB) in {setup_s:.0f}s"
    )
    cmd = [PY, "-m", "batchrun", "run", "--input", str(source), "--prompt-template", TEMPLATE]
    cmd += ["--model", MODEL, "--base-url", RERUN_BASE_URL, "--api-key-env", ""]
    cmd += ["--output", str(output)]
    before = output.stat().st_mtime_ns
    proc = run_proc(cmd, cpu=CLIENT_CPU, timeout_s=_timeout_for(n, 1000.0), workdir=workdir)
    if proc.rc not in (0, 1) or "requests    0 " not in proc.stderr:
        raise BenchError(f"the rerun exited {proc.rc}: {proc.stderr[-2000:]}")
    if f"from an earlier run {n:,}" not in proc.stderr:
        raise BenchError(
            f"the rerun did not take the {n:,} rows as finished: {proc.stderr[-2000:]}"
        )
    if "holds every row of this job" not in proc.stderr or output.stat().st_mtime_ns != before:
        raise BenchError(f"the rerun did not answer from the output: {proc.stderr[-2000:]}")
    say(
        f"rerun: {n:,} finished rows answered in {proc.wall_s:.1f}s, peak RSS {proc.maxrss_mb:.0f} MB"
    )
    source.unlink()
    output.unlink()
    return {"rows": n, "wall_s": proc.wall_s, "maxrss_mb": proc.maxrss_mb, "setup_s": setup_s}


def bench_latency(server: MockServer, workdir: Path, tickets: Path) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {"batchrun": [], "minimal": []}
    for i in range(LATENCY_RUNS):
        r = run_batchrun(server, workdir, tickets, ROWS, LATENCY_CONCURRENCY)
        runs["batchrun"].append(r)
        say(
            f"latency {LATENCY_MS} ms run {i + 1}/{LATENCY_RUNS}: batchrun {r.rows_per_s:,.0f} rows/s "
            f"end to end, {r.run_rows_per_s or 0:,.0f} rows/s in-run"
        )
    r = run_loop_script(
        "minimal_loop.py", server, workdir, tickets, ROWS, LATENCY_CONCURRENCY, "minimal"
    )
    runs["minimal"].append(r)
    say(f"latency {LATENCY_MS} ms reference: minimal {r.rows_per_s:,.0f} rows/s end to end")
    return runs


def bench_sporadic(server: MockServer, workdir: Path, tickets: Path) -> Pairs:
    """The same rows against the fault-free endpoint and one that answers 5% of
    requests with a 429 (Retry-After: 1, no budget spent) or a 503."""
    rows = SPORADIC_ROWS
    small = head_lines(tickets, workdir / f"tickets-sporadic-{rows}.jsonl", rows)
    warm = head_lines(tickets, workdir / "warmup.jsonl", 2000)
    run_batchrun(server, workdir, warm, 2000, SPORADIC_CONCURRENCY)  # discarded
    with MockServer(workdir, flags=SPORADIC_FLAGS, name="sporadic") as faulty:
        return alternate(
            PAIRS,
            lambda: run_batchrun(server, workdir, small, rows, SPORADIC_CONCURRENCY),
            lambda: run_batchrun(
                faulty, workdir, small, rows, SPORADIC_CONCURRENCY, kind="batchrun, 5% 429/503"
            ),
            f"sporadic 429/503 c={SPORADIC_CONCURRENCY}",
        )


def bench_ratelimit(server: MockServer, workdir: Path, tickets: Path) -> dict[int, list[Run]]:
    """batchrun (no rpm of its own) against an endpoint that enforces LIMIT_RPM."""
    rows = LIMIT_ROWS
    small = head_lines(tickets, workdir / f"tickets-limit-{rows}.jsonl", rows)
    out: dict[int, list[Run]] = {}
    flags = ("--rpm-limit", str(LIMIT_RPM))
    with MockServer(workdir, flags=flags, name="limit") as limited:
        for c in LIMIT_CONCURRENCY:
            out[c] = []
            for i in range(LIMIT_RUNS):
                r = run_batchrun(
                    limited, workdir, small, rows, c, kind="batchrun vs rpm limit", keep_output=True
                )
                output = workdir / "batchrun-out.parquet"
                r.extra["steady_share"] = _steady_share(output)
                output.unlink()
                out[c].append(r)
                say(
                    f"rpm limit {LIMIT_RPM:,} c={c} run {i + 1}/{LIMIT_RUNS}: "
                    f"{_limit_share(r):.1%} of the limit ({r.extra['steady_share']:.1%} steady), "
                    f"{_refused_per_row(r):.3f} 429s a row"
                )
    return out


def _limit_share(r: Run) -> float:
    """Rows / what the limit admits while sending: the refill over the sending
    span plus the one second's worth the bucket holds at the start."""
    rate = LIMIT_RPM / 60
    return r.rows / (rate * r.send_s + rate)


def _steady_share(path: Path) -> float:
    """The share of the limit between the first and the last pause (a gap of
    over half a second between rows finishing; the pauses last about 1 s): rows
    finished from the end of the first pause to the end of the last / the
    refill meanwhile. Leaves out the start (a full bucket) and the end (the
    last refill, waited for whole though the last rows need only part of it)."""
    import pyarrow.parquet as pq

    times = sorted(pq.read_table(path, columns=["finished_at"]).column(0).to_pylist())
    gaps = [b for a, b in itertools.pairwise(times) if (b - a).total_seconds() > 0.5]
    if len(gaps) < 2:
        return float("nan")
    first, last = gaps[0], gaps[-1]
    inside = sum(1 for t in times if first <= t < last)
    return inside / (LIMIT_RPM / 60 * (last - first).total_seconds())


def _refused_per_row(r: Run) -> float:
    return float(r.extra.get("outcomes", {}).get("rpm-limit", 0)) / r.rows


def bench_help(workdir: Path) -> dict[str, Any]:
    cmd = [PY, "-m", "batchrun", "--help"]
    run_proc(cmd, cpu=CLIENT_CPU, timeout_s=60, workdir=workdir)  # warm-up
    walls = []
    for _ in range(HELP_RUNS):
        p = run_proc(cmd, cpu=CLIENT_CPU, timeout_s=60, workdir=workdir)
        if p.rc != 0:
            raise BenchError(f"batchrun --help exited {p.rc}: {p.stderr[-1000:]}")
        walls.append(p.wall_s)
    bare = [
        run_proc([PY, "-c", "pass"], cpu=CLIENT_CPU, timeout_s=60, workdir=workdir).wall_s
        for _ in range(HELP_RUNS)
    ]

    def importtime(args: list[str]) -> dict[str, int]:
        p = run_proc([PY, "-X", "importtime", *args], cpu=CLIENT_CPU, timeout_s=60, workdir=workdir)
        found: dict[str, int] = {}
        for line in p.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
            if m:
                found[m.group(3)] = int(m.group(2))
        return found

    imported = importtime(cmd[1:])
    baseline = importtime(["-c", "pass"])
    top = [(us, name) for name, us in imported.items() if name not in baseline]
    heavy = ("pandas", "pyarrow", "numpy", "aiohttp")
    present = [h for h in heavy if any(n == h or n.startswith(h + ".") for n in imported)]
    return {
        "median_s": _median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "python_s": _median(bare),
        "heavy_imported": present,
        "top_imports": sorted(top, reverse=True)[:6],
    }


def bench_report(workdir: Path) -> dict[str, Any]:
    """``batchrun report`` of one REPORT_ROWS-row output, per case of REPORT_CASES:
    seconds (process start to exit) and peak RSS. The output is made in its own
    process, as the report runs in its own: a child forked from a large process
    counts that one's peak RSS as its own. stdout goes to a file, never through
    this runner."""
    output = workdir / "report-output.parquet"
    t = time.perf_counter()
    cmd = [PY, str(HERE / "report_outputs.py"), str(output), str(REPORT_ROWS)]
    made = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if made.returncode != 0:
        raise BenchError(f"report_outputs.py exited {made.returncode}: {made.stderr[-2000:]}")
    say(
        f"report: made a {REPORT_ROWS:,}-row output ({output.stat().st_size / 1e6:.0f} MB) "
        f"in {time.perf_counter() - t:.1f}s"
    )
    prices = ROOT / "jobs" / "prices.toml"
    text = workdir / "report.out"
    runs: dict[str, list[dict[str, float]]] = {}
    for label, args in REPORT_CASES:
        report_cmd = [PY, "-m", "batchrun", "report", str(output), "--prices", str(prices), *args]
        shell = f"exec {' '.join(shlex.quote(a) for a in report_cmd)} > {shlex.quote(str(text))}"
        for _ in range(REPORT_RUNS if label == REPORT_CASES[0][0] else 1):
            proc = run_proc(
                ["sh", "-c", shell],
                cpu=CLIENT_CPU,
                timeout_s=_timeout_for(REPORT_ROWS, 5000.0),
                workdir=workdir,
            )
            if proc.rc != 0:
                raise BenchError(f"report {label} exited {proc.rc}: {proc.stderr[-2000:]}")
            _check_report(text, label)
            run = {"wall_s": proc.wall_s, "cpu_s": proc.cpu_s, "maxrss_mb": proc.maxrss_mb}
            run["mb"] = text.stat().st_size / 1e6
            runs.setdefault(label, []).append(run)
            say(f"report {label}: {proc.wall_s:.1f}s, peak RSS {proc.maxrss_mb:.0f} MB")
    output.unlink()
    text.unlink()
    return {"rows": REPORT_ROWS, "runs": runs}


def _check_report(text: Path, label: str) -> None:
    """Every group is in the json and csv; the table says how many it leaves out."""
    if "--by id" not in label:
        return
    marker = {"json": b'\n    {"id": ', "csv": b"\ngroup,"}.get(label.rsplit(", ", 1)[1])
    if marker is None:
        if f"of {REPORT_ROWS:,} are shown".encode() not in text.read_bytes()[-4000:]:
            raise BenchError(f"report {label}: no note of the groups left out")
        return
    found, tail = 0, b""
    with text.open("rb") as fh:
        while block := fh.read(1 << 24):
            found += (tail + block).count(marker)
            tail = block[-(len(marker) - 1) :]
    if found != REPORT_ROWS:
        raise BenchError(f"report {label}: {found:,} groups, not {REPORT_ROWS:,}")


# ------------------------------------------------------------------------- report


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "ram": ram,
        "kernel": platform.release(),
        "load_start": load,
        "pinning": (
            f"client on CPU {CLIENT_CPU}, mock server on CPU {SERVER_CPU}"
            if CLIENT_CPU is not None
            else "none (fewer than 2 CPUs available)"
        ),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("batchrun", "aiohttp", "pyarrow", "orjson", "uvloop", "openai"):
        out[dist] = _version(dist)
    return out


def _fmt_rate(x: float | None) -> str:
    return f"{x:,.0f}" if x is not None else "n/a"


def _range(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def _cell(runs: Sequence[Run], attr: str, fmt: str = "{:,.0f}", spread: bool = False) -> str:
    values = [getattr(r, attr) for r in runs]
    values = [x for x in values if x is not None]
    if not values:
        return "n/a"
    text = fmt.format(_median(values))
    if spread and len(values) > 1:
        text += f" ({_range(values, fmt)})"
    return text


def _render_throughput(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 1. throughput
    tp: dict[int, Pairs] = report["throughput"]
    md += [
        f"## 1. Throughput, no server latency ({ROWS:,} rows)",
        "",
        "| concurrency | program | end-to-end rows/s (median, range) | in-run rows/s | sending rows/s | client CPU µs/row | peak RSS MB | server busy | other load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, pairs in tp.items():
        for runs in (pairs.a, pairs.b):
            md.append(
                f"| {c} | {runs[0].kind} | {_cell(runs, 'rows_per_s', spread=True)} | "
                f"{_cell(runs, 'run_rows_per_s')} | {_cell(runs, 'send_rows_per_s')} | "
                f"{_cell(runs, 'cpu_us_per_row')} | {_cell(runs, 'maxrss_mb')} | "
                f"{_median([r.server_busy for r in runs]):.0%} | {_cell(runs, 'other_load', '{:.2f}')} |"
            )
    md += [
        "",
        "| concurrency | batchrun / minimal, end-to-end rows/s: median of pairs (range) | best batchrun / best minimal | batchrun / minimal, client CPU per row: median (range) | pairs |",
        "|---|---|---|---|---|",
    ]
    for c, pairs in tp.items():
        ratios, cpu = pairs.ratios(), pairs.cpu_ratios()
        md.append(
            f"| {c} | **{_median(ratios):.2f}** ({_range(ratios)}) | {pairs.best_ratio():.2f} | "
            f"{_median(cpu):.2f} ({_range(cpu)}) | {len(ratios)} |"
        )
        summary.append(
            (
                f"throughput c={c}",
                f"batchrun {_cell(pairs.b, 'rows_per_s')} rows/s vs minimal "
                f"{_cell(pairs.a, 'rows_per_s')}; ratio {_median(ratios):.2f} ({_range(ratios)}), "
                f"best/best {pairs.best_ratio():.2f}; client CPU/row ratio {_median(cpu):.2f}",
                f"≥ {TARGET_THROUGHPUT_RATIO:.1f}x the minimal loop (median ratio)",
                _met(_median(ratios) >= TARGET_THROUGHPUT_RATIO),
            )
        )
    md.append("")


def _render_sdk(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    sdk = report["sdk"]
    md += [f"### openai SDK loop (concurrency 64, {SDK_ROWS:,} rows, one run each)", ""]
    if isinstance(sdk, str):
        md += [sdk, ""]
        summary.append(("SDK loop c=64", sdk, "—", "—"))
    else:
        md += [
            "| program | end-to-end rows/s | in-run rows/s | sending rows/s | client CPU µs/row | server busy | other load |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in sdk.items():
            label = (
                f"sdk (openai {r.extra.get('openai_version', '?')})" if name == "sdk" else r.kind
            )
            md.append(
                f"| {label} | {r.rows_per_s:,.0f} | {_fmt_rate(r.run_rows_per_s)} | {r.send_rows_per_s:,.0f} | "
                f"{r.cpu_us_per_row:,.0f} | {r.server_busy:.0%} | {r.other_load:.2f} |"
            )
        x = sdk["batchrun"].rows_per_s / sdk["sdk"].rows_per_s
        xs = sdk["batchrun"].send_rows_per_s / max(sdk["sdk"].send_rows_per_s, 1e-9)
        md += [
            "",
            f"batchrun is **{x:.1f}x** the SDK loop end to end ({xs:.1f}x while sending).",
            "",
        ]
        summary.append(
            (
                "SDK loop c=64",
                f"batchrun {sdk['batchrun'].rows_per_s:,.0f} rows/s vs SDK {sdk['sdk'].rows_per_s:,.0f} "
                f"= {x:.1f}x ({SDK_ROWS:,} rows)",
                "far ahead (≥ 2x)",
                _met(x >= 2.0),
            )
        )


def _render_latency(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 2. latency
    lat = report["latency"]
    limit = LATENCY_CONCURRENCY / (LATENCY_MS / 1000)
    br = lat["batchrun"]
    mini = lat["minimal"]
    send = _median([r.send_rows_per_s for r in br])
    inrun = _median([r.run_rows_per_s or 0 for r in br])
    e2e = _median([r.rows_per_s for r in br])
    md += [
        f"## 2. {LATENCY_MS} ms server latency, concurrency {LATENCY_CONCURRENCY} ({ROWS:,} rows)",
        "",
        f"Limit: {LATENCY_CONCURRENCY} / {LATENCY_MS / 1000:g} s = {limit:,.0f} rows/s. "
        f"Target: ≥ {TARGET_LATENCY_SHARE:.0%} of it while sending.",
        "",
        "| program | runs | sending rows/s (median, range) | share of limit | in-run rows/s | share | end-to-end rows/s | share | other load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in (("batchrun", br), ("minimal (reference)", mini)):
        s_ = _median([r.send_rows_per_s for r in runs])
        i_ = _median([r.run_rows_per_s or 0 for r in runs])
        e_ = _median([r.rows_per_s for r in runs])
        md.append(
            f"| {name} | {len(runs)} | {_cell(runs, 'send_rows_per_s', spread=True)} | **{s_ / limit:.1%}** | "
            f"{i_:,.0f} | {i_ / limit:.1%} | {e_:,.0f} | {e_ / limit:.1%} | {_cell(runs, 'other_load', '{:.2f}')} |"
        )
    md += [
        "",
        "In-run and end to end add batchrun's fixed costs (input scan, Parquet write; and",
        f"start-up) that a {ROWS:,}-row run at {limit:,.0f} rows/s does not amortise fully.",
        "",
    ]
    summary.append(
        (
            f"{LATENCY_MS} ms latency c={LATENCY_CONCURRENCY}",
            f"sending {send:,.0f} rows/s = {send / limit:.1%} of {limit:,.0f} "
            f"(in-run {inrun / limit:.1%}, end to end {e2e / limit:.1%})",
            f"≥ {TARGET_LATENCY_SHARE:.0%}",
            _met(send / limit >= TARGET_LATENCY_SHARE),
        )
    )


def _render_memory(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 3. memory
    mem: list[Run] = report["memory"]
    md += [
        f"## 3. Peak RSS of the batchrun process (concurrency {MEMORY_CONCURRENCY}, no latency)",
        "",
        "Inputs are written as a stream: the generated tickets cycled, every id unique.",
        "",
        "| rows | peak RSS MB | end-to-end rows/s | in-run rows/s | sending rows/s | wall s | other load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in mem:
        md.append(
            f"| {r.rows:,} | {r.maxrss_mb:.0f} | {r.rows_per_s:,.0f} | {_fmt_rate(r.run_rows_per_s)} | "
            f"{r.send_rows_per_s:,.0f} | {r.wall_s:.1f} | {r.other_load:.2f} |"
        )
    # The growth that matters is the one between the largest inputs (small runs
    # are dominated by fixed costs), so extrapolate along the last two points.
    fit = mem[-2:] if len(mem) >= 2 else mem
    a, b = _linear_fit([r.rows for r in fit], [r.maxrss_mb for r in fit])
    measured = next((r for r in mem if r.rows >= PROJECTED_ROWS), None)
    predicted = a + b * PROJECTED_ROWS
    md += [
        "",
        f"Growth between the two largest sizes: {b * 1024 * 1000:,.0f} KB per 1,000 rows "
        f"({b * 1024 * 1024:,.0f} bytes a row)"
        + (
            "."
            if measured
            else f"; along that line {PROJECTED_ROWS:,} rows would peak at about {predicted:.0f} MB "
            f"(extrapolated; `BENCH_MEM_SIZES=...,{PROJECTED_ROWS}` measures it, in half an hour "
            "or more)."
        ),
        "",
    ]
    largest = mem[-1]
    if measured:
        mem_text = (
            f"{measured.maxrss_mb:.0f} MB at {measured.rows:,} rows (measured); "
            + ", ".join(f"{r.maxrss_mb:.0f} MB at {r.rows:,}" for r in mem if r is not measured)
        )
        mem_ok = measured.maxrss_mb < TARGET_RSS_MB
        met_text = _met(mem_ok)
    else:
        mem_text = (
            ", ".join(f"{r.maxrss_mb:.0f} MB at {r.rows:,}" for r in mem)
            + f"; {b * 1024 * 1024:,.0f} bytes a row between the two largest, "
            f"~{predicted:.0f} MB at {PROJECTED_ROWS:,} along that line"
        )
        mem_ok = max(largest.maxrss_mb, predicted) < TARGET_RSS_MB
        met_text = _met(mem_ok) + " (extrapolated)"
    summary.append(
        ("peak RSS", mem_text, f"flat, < {TARGET_RSS_MB:.0f} MB at {PROJECTED_ROWS:,}", met_text)
    )


def _render_merge(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # flat memory: merge
    runs: list[dict[str, Any]] = report["merge"]
    md += [
        f"## `batchrun merge` of {MERGE_SHARDS} shards",
        "",
        "Shard outputs made without sending (`make_outputs.py`: batchrun's schema and metadata, "
        "300-character completions, 8,192 rows a row group), merged by row number.",
        "",
        "| rows in all | files MB | peak RSS MB | seconds | rows/s |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        md.append(
            f"| {r['rows']:,} | {r['mb']:.0f} | {r['maxrss_mb']:.0f} | {r['wall_s']:.1f} | "
            f"{r['rows'] / r['wall_s']:,.0f} |"
        )
    largest = runs[-1]
    ok = all(r["maxrss_mb"] < TARGET_MERGE_MB for r in runs)
    md += ["", f"Peak RSS below {TARGET_MERGE_MB:.0f} MB at every size: {_met(ok)}.", ""]
    summary.append(
        (
            f"merge, {MERGE_SHARDS} shards",
            f"{largest['rows']:,} rows: {largest['maxrss_mb']:.0f} MB peak, "
            f"{largest['wall_s']:.1f} s"
            + "".join(f"; {r['rows']:,}: {r['maxrss_mb']:.0f} MB" for r in runs[:-1]),
            f"flat, < {TARGET_MERGE_MB:.0f} MB",
            _met(ok),
        )
    )


def _render_rerun(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # flat memory: the rerun of a finished job
    r = report["rerun"]
    ok = r["wall_s"] < TARGET_RERUN_S and r["maxrss_mb"] < TARGET_RSS_MB
    md += [
        f"## A rerun of a finished job of {r['rows']:,} rows",
        "",
        "The input written as a stream and the output a finished run leaves made without "
        "sending (`make_outputs.py`: request hashes by batchrun's own request building) took "
        f"{r['setup_s']:.0f} s; then `batchrun run` with the same job: **{r['wall_s']:.1f} s**, "
        f"peak RSS **{r['maxrss_mb']:.0f} MB**, to answer from the output's metadata and "
        f"columns that nothing is left to send. Target < {TARGET_RERUN_S:.0f} s and "
        f"< {TARGET_RSS_MB:.0f} MB: {_met(ok)}.",
        "",
    ]
    summary.append(
        (
            "rerun of a finished job",
            f"{r['rows']:,} rows: {r['wall_s']:.1f} s, {r['maxrss_mb']:.0f} MB peak; nothing sent",
            f"< {TARGET_RERUN_S:.0f} s, < {TARGET_RSS_MB:.0f} MB",
            _met(ok),
        )
    )


def _render_help(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 4. help
    h = report["help"]
    heavy = h["heavy_imported"]
    bad = [x for x in heavy if x in ("pandas", "pyarrow")]
    md += [
        "## 4. `batchrun --help` start-up",
        "",
        f"Median of {HELP_RUNS} runs of `python -m batchrun --help`: **{h['median_s']:.3f} s** "
        f"(range {h['min_s']:.3f}-{h['max_s']:.3f} s; a bare `python -c pass` takes {h['python_s']:.3f} s). "
        f"Target < {TARGET_HELP_S} s: {_met(h['median_s'] < TARGET_HELP_S)}.",
        "",
        "Heavy modules imported on that path (`python -X importtime -m batchrun --help`): "
        + (
            ", ".join(f"**{x}**" for x in heavy)
            if heavy
            else "none of pandas, pyarrow, numpy, aiohttp"
        )
        + ".",
        "",
        "Slowest imports beyond the interpreter's own (cumulative µs, nested ones included): "
        + ", ".join(f"{name} {us:,}" for us, name in h["top_imports"])
        + ".",
        "",
    ]
    summary.append(
        (
            "--help start-up",
            f"{h['median_s']:.3f} s median; pandas/pyarrow imported: "
            + ("yes: " + ", ".join(bad) if bad else "no"),
            f"< {TARGET_HELP_S} s, no pandas/pyarrow",
            _met(h["median_s"] < TARGET_HELP_S and not bad),
        )
    )


def _render_pacing(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 5. pacing
    pcs: Pairs = report["pacing"]
    ratios = pcs.ratios()
    overhead = [1 - x for x in ratios]
    cpu = pcs.cpu_ratios()
    md += [
        f"## 5. `--rpm 10000000 --tpm 10000000000` vs no pacing (concurrency 64, {ROWS:,} rows)",
        "",
        "| program | end-to-end rows/s (median, range) | in-run rows/s | sending rows/s | client CPU µs/row | other load |",
        "|---|---|---|---|---|---|",
    ]
    for runs in (pcs.a, pcs.b):
        md.append(
            f"| {runs[0].kind} | {_cell(runs, 'rows_per_s', spread=True)} | {_cell(runs, 'run_rows_per_s')} | "
            f"{_cell(runs, 'send_rows_per_s')} | {_cell(runs, 'cpu_us_per_row')} | {_cell(runs, 'other_load', '{:.2f}')} |"
        )
    med = _median(overhead)
    cpu_over = _median(cpu) - 1
    if med < TARGET_PACING_OVERHEAD:
        verdict = _met(True)
    elif cpu_over < TARGET_PACING_OVERHEAD:
        # Wall-time pairs on a loaded machine can swing by tens of percent; say
        # what each measure shows rather than pick the kinder one.
        verdict = (
            f"**not met** on rows/s ({med:+.1%}, pairs spread {max(overhead) - min(overhead):.0%}); "
            f"met on CPU per row ({cpu_over:+.1%})"
        )
    else:
        verdict = _met(False)
    md += [
        "",
        f"Overhead (1 - paced / unpaced end-to-end rows/s) over {len(ratios)} alternating pairs: median "
        f"**{med:+.1%}** (range {min(overhead):+.1%} to {max(overhead):+.1%}); best paced vs best unpaced: "
        f"{1 - pcs.best_ratio():+.1%}; client CPU per row, paced / "
        f"unpaced: {_median(cpu):.3f} ({_range(cpu, '{:.3f}')}). Target < {TARGET_PACING_OVERHEAD:.0%}: "
        f"{verdict}.",
        "",
    ]
    summary.append(
        (
            "rpm/tpm overhead c=64",
            f"{med:+.1%} median rows/s ({min(overhead):+.1%} to {max(overhead):+.1%}), "
            f"best/best {1 - pcs.best_ratio():+.1%}; client CPU/row {_median(cpu) - 1:+.1%}",
            f"< {TARGET_PACING_OVERHEAD:.0%}",
            verdict,
        )
    )


def _pairs_table(pairs: Pairs) -> list[str]:
    """Both programs of alternating pairs, one line each, as a markdown table."""
    lines = [
        "| program | end-to-end rows/s (median, range) | in-run rows/s | client CPU µs/row | server busy | other load |",
        "|---|---|---|---|---|---|",
    ]
    for runs in (pairs.a, pairs.b):
        lines.append(
            f"| {runs[0].kind} | {_cell(runs, 'rows_per_s', spread=True)} | {_cell(runs, 'run_rows_per_s')} | "
            f"{_cell(runs, 'cpu_us_per_row')} | {_cell(runs, 'server_busy', '{:.0%}')} | {_cell(runs, 'other_load', '{:.2f}')} |"
        )
    return lines


def _render_structured(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 6. structured outputs
    pairs: Pairs = report["structured"]["pairs"]
    parse_us: float = report["structured"]["parse_us"]
    plain_cpu = _median([r.cpu_us_per_row for r in pairs.a])
    cost = parse_us / plain_cpu
    paced_cpu = report["structured"]["paced"].cpu_ratios()
    cpu = pairs.cpu_ratios()
    ratios = pairs.ratios()
    md += [
        f"## 6. Structured outputs (`--response-schema jobs/triage_schema.json`) vs plain text (concurrency 64, {ROWS:,} rows)",
        "",
    ]
    md += _pairs_table(pairs)
    cpu_over = _median(cpu) - 1
    verdict = _met(cost < TARGET_STRUCTURED_OVERHEAD)
    md += [
        "",
        "Parsing (fence stripping, orjson), validating (fastjsonschema; jsonschema words the errors) and typing",
        f"one answer, timed alone over the {ROWS:,} answers of the last structured run: **{parse_us:.1f} µs**, "
        f"**{cost:.1%}** of the plain run's {plain_cpu:.0f} µs of client CPU per row; target < "
        f"{TARGET_STRUCTURED_OVERHEAD:.0%}: {verdict}.",
        "",
        f"End to end the structured run costs more than that: client CPU per row {cpu_over:+.1%} "
        f"({_range([c - 1 for c in cpu], '{:+.1%}')}), rows/s {_median(ratios):.2f}x ({_range(ratios)}). The",
        "request bodies carry the schema (2.5x larger), and the endpoint takes longer to make a structured",
        "answer, so the single-core server is busier (see *server busy*), answers arrive fewer at a time and",
        "the client's event loop spends more per answer on waking up and reading; that part is the endpoint's,",
        "not the parsing's. Against an endpoint that is never the bottleneck (50 ms per answer, concurrency",
        f"{LATENCY_CONCURRENCY}, {min(ROWS, STRUCTURED_LATENCY_ROWS):,} rows), client CPU per row, schema / plain: "
        f"**{_median(paced_cpu):.3f}** ({_range(paced_cpu, '{:.3f}')}), start-up (importing and compiling the",
        "schema validators) included.",
        "",
    ]
    summary.append(
        (
            "structured outputs c=64",
            f"parse+validate+type {parse_us:.1f} µs/answer = {cost:.1%} of plain client CPU/row; "
            f"end to end client CPU/row {cpu_over:+.1%} (server-bound) / {_median(paced_cpu) - 1:+.1%} "
            f"(50 ms latency), rows/s ratio {_median(ratios):.2f}",
            f"< {TARGET_STRUCTURED_OVERHEAD:.0%} (parse+validate)",
            verdict,
        )
    )


def _render_pii(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 7. personal data
    pii = report["pii"]
    md += [
        f"## 7. Personal data (`--pii {PII_KINDS}`) vs the same job without (concurrency 64, {ROWS:,} rows)",
        "",
    ]
    if isinstance(pii, str):
        md += [pii, ""]
        summary.append(("pii c=64", pii, "—", "—"))
        return
    pairs: Pairs = pii["pairs"]
    ratios, cpu = pairs.ratios(), pairs.cpu_ratios()
    md += [
        "Input: the benchmark tickets, each with a contact block of distinct values (an e-mail address and",
        "a phone number in every ticket, a card number in every third, an IBAN in every fourth, an IP",
        f"address in every fifth): {pii['values']:,} values replaced in all, prompts of "
        f"{pii['prompt_bytes']:,.0f} bytes on average.",
        "",
    ]
    md += _pairs_table(pairs)
    met_ratio = _median(ratios) >= TARGET_PII_RATIO
    met_scan = pii["us_per_ticket_1kb"] <= TARGET_PII_US_PER_KB
    md += [
        "",
        f"rows/s with pii / without: **{_median(ratios):.2f}x** ({_range(ratios)}); client CPU per row "
        f"{_median(cpu):.2f}x ({_range(cpu)}). Scanning alone (finding, checking, replacing; timed over every",
        f"prompt with a fresh scanner, one core): **{pii['us_per_ticket_1kb']:.1f} µs per 1 KB ticket** "
        f"(the prompts' values, brought to 1 KB by plain text); {pii['us_per_kb']:.1f} µs per KB, "
        f"{pii['us_per_prompt']:.1f} µs per prompt of the dense prompts themselves. Targets: ≥ "
        f"{TARGET_PII_RATIO}x and ≤ {TARGET_PII_US_PER_KB:.0f} µs per 1 KB ticket: "
        f"{_met(met_ratio and met_scan)}.",
        "",
    ]
    summary.append(
        (
            "pii c=64",
            f"rows/s ratio {_median(ratios):.2f}x ({_range(ratios)}); scanning "
            f"{pii['us_per_ticket_1kb']:.1f} µs per 1 KB ticket",
            f"≥ {TARGET_PII_RATIO}x, ≤ {TARGET_PII_US_PER_KB:.0f} µs per 1 KB ticket",
            _met(met_ratio and met_scan),
        )
    )


def _render_sporadic(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 8. sporadic 429s and 503s
    pairs: Pairs = report["sporadic"]
    ratios = pairs.ratios()
    extra_s = [rb.wall_s - ra.wall_s for ra, rb in zip(pairs.a, pairs.b, strict=True)]
    refused = [r.extra["outcomes"] for r in pairs.b]
    n429 = _median([o.get("429", 0) for o in refused])
    n503 = _median([o.get("503", 0) for o in refused])
    md += [
        f"## 8. Sporadic 429s and 503s ({SPORADIC_ROWS:,} rows, concurrency {SPORADIC_CONCURRENCY})",
        "",
        "The endpoint answers 5% of requests (retries included) with a 429 (`Retry-After: 1`,",
        "no rate-limit header: no budget is spent) or a 503, half each; the same rows against the",
        "fault-free endpoint, in alternating pairs.",
        "",
        "| program | end-to-end rows/s (median, range) | wall s | sending rows/s | 429s | 503s |",
        "|---|---|---|---|---|---|",
    ]
    for runs in (pairs.a, pairs.b):
        outcomes = [r.extra.get("outcomes", {}) for r in runs]
        md.append(
            f"| {runs[0].kind} | {_cell(runs, 'rows_per_s', spread=True)} | {_cell(runs, 'wall_s', '{:.1f}')} | "
            f"{_cell(runs, 'send_rows_per_s')} | {_median([o.get('429', 0) for o in outcomes]):.0f} | "
            f"{_median([o.get('503', 0) for o in outcomes]):.0f} |"
        )
    extra = _median(extra_s)
    md += [
        "",
        f"Sporadic / fault-free rows/s: **{_median(ratios):.2f}** ({_range(ratios)}); the job takes "
        f"**{extra:+.1f} s** ({_range(extra_s, '{:+.1f}')}) longer, the waits of the last retried rows "
        f"(a 1 s Retry-After, twice for a row refused twice). Pausing every row for each 429 would "
        f"add about one Retry-After per 429: {n429:.0f} s here. Target: at most "
        f"{TARGET_SPORADIC_EXTRA_S:g} s longer: {_met(extra <= TARGET_SPORADIC_EXTRA_S)}.",
        "",
    ]
    summary.append(
        (
            f"sporadic 429/503 c={SPORADIC_CONCURRENCY}",
            f"{_cell(pairs.b, 'rows_per_s')} vs {_cell(pairs.a, 'rows_per_s')} rows/s fault-free = "
            f"{_median(ratios):.2f}x; {extra:+.1f} s ({n429:.0f} 429s, {n503:.0f} 503s, "
            f"{SPORADIC_ROWS:,} rows)",
            f"≤ {TARGET_SPORADIC_EXTRA_S:g} s longer than fault-free",
            _met(extra <= TARGET_SPORADIC_EXTRA_S),
        )
    )


def _render_ratelimit(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 9. an enforced rate limit
    lim: dict[int, list[Run]] = report["ratelimit"]
    rate = LIMIT_RPM / 60
    md += [
        f"## 9. A rate limit the server enforces ({LIMIT_ROWS:,} rows, `--rpm-limit {LIMIT_RPM}`)",
        "",
        f"The endpoint admits {rate:,.0f} requests a second from a bucket of one second's worth",
        "and answers the rest 429 with `x-ratelimit-remaining-requests: 0` and a Retry-After until",
        "the bucket is full again; batchrun has no `rpm` of its own. *Share of the limit, whole run*:",
        "rows / (the refill over the sending span + the full bucket at the start). *Steady*: rows",
        "finished between the end of the first pause and the end of the last / the refill meanwhile;",
        "it leaves out the end, where the job waits for a whole refill of which its last rows use",
        "only part (up to a second of a 10 s run), and carries the target.",
        "",
        "| concurrency | runs | sending rows/s | share of the limit, whole run (median, range) | steady (median, range) | 429s a row (median, range) |",
        "|---|---|---|---|---|---|",
    ]
    for c, runs in lim.items():
        shares = [_limit_share(r) for r in runs]
        steady = [r.extra["steady_share"] for r in runs]
        refused = [_refused_per_row(r) for r in runs]
        md.append(
            f"| {c} | {len(runs)} | {_cell(runs, 'send_rows_per_s')} | {_median(shares):.1%} "
            f"({_range(shares, '{:.1%}')}) | **{_median(steady):.1%}** ({_range(steady, '{:.1%}')}) | "
            f"**{_median(refused):.3f}** ({_range(refused, '{:.3f}')}) |"
        )
        judged = c == TARGET_LIMIT_CONCURRENCY
        met = _median(steady) >= TARGET_LIMIT_SHARE and _median(refused) <= TARGET_LIMIT_429S
        summary.append(
            (
                f"rpm limit {LIMIT_RPM:,} c={c}",
                f"{_median(steady):.1%} of the limit steady ({_median(shares):.1%} over the whole "
                f"run), {_median(refused):.3f} 429s a row",
                f"≥ {TARGET_LIMIT_SHARE:.0%}, ≤ {TARGET_LIMIT_429S} 429s a row" if judged else "—",
                _met(met if judged else None),
            )
        )
    md += [
        "",
        "Each time the budget runs out, the requests in flight come back 429: about one",
        "concurrency's worth per second of the limit, so more workers take more 429s a row;",
        f"the target applies at the job's default concurrency ({TARGET_LIMIT_CONCURRENCY}).",
        "",
    ]


def _render_ray(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 11. the Ray engine
    data = report["ray"]
    md += [
        f"## 11. The Ray engine vs the local engine (concurrency {RAY_CONCURRENCY}, {ROWS:,} rows)",
        "",
    ]
    if isinstance(data, str):
        md += [data, ""]
        summary.append(("Ray engine vs local", data, "—", "—"))
        return
    pairs: Pairs = data["pairs"]
    small: dict[str, Run] = data["small"]

    def beyond(runs: list[Run], kind: str) -> list[float]:
        """CPU µs per row beyond start-up: each run's CPU less the small run's, per extra row."""
        base = small[kind]
        return [(r.cpu_s - base.cpu_s) / (r.rows - base.rows) * 1e6 for r in runs]

    local_beyond, ray_beyond = beyond(pairs.a, "local"), beyond(pairs.b, "ray")
    md += [
        f"Ray {data['ray_version']}, started by the driver on this machine: its processes (GCS,",
        "raylet, the coordinator and one row sender per CPU Ray counts) inherit the client's",
        "core, as the local engine has it alone; the endpoint keeps the other. Client CPU here",
        "is the whole process tree's: the driver's own, read when it exits, and every process",
        "it started, sampled from /proc every 0.1 s (a lower bound, short of at most each",
        "process's last 0.1 s). *Beyond start-up*: less a "
        f"{RAY_SMALL_ROWS}-row run's CPU, per extra row.",
        "",
        "| program | end-to-end rows/s (median, range) | in-run rows/s | sending rows/s | client CPU µs/row | beyond start-up µs/row | driver peak RSS MB | other load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for runs, extra in ((pairs.a, local_beyond), (pairs.b, ray_beyond)):
        md.append(
            f"| {runs[0].kind} | {_cell(runs, 'rows_per_s', spread=True)} | {_cell(runs, 'run_rows_per_s')} | "
            f"{_cell(runs, 'send_rows_per_s')} | {_cell(runs, 'cpu_us_per_row')} | {_median(extra):,.0f} | "
            f"{_cell(runs, 'maxrss_mb')} | {_cell(runs, 'other_load', '{:.2f}')} |"
        )
    ratios = pairs.ratios()
    send = [b.send_rows_per_s / a.send_rows_per_s for a, b in zip(pairs.a, pairs.b, strict=True)]
    cpu = pairs.cpu_ratios()
    md += [
        "",
        f"Start-up ({RAY_SMALL_ROWS}-row runs): local {small['local'].wall_s:.1f} s and "
        f"{small['local'].cpu_s:.1f} s of CPU, Ray {small['ray'].wall_s:.1f} s and {small['ray'].cpu_s:.1f} s of CPU.",
        "",
        f"Ray / local over {len(ratios)} alternating pairs: end-to-end rows/s **{_median(ratios):.2f}** "
        f"({_range(ratios)}); sending rows/s {_median(send):.2f} ({_range(send)}); client CPU per row "
        f"{_median(cpu):.2f} ({_range(cpu)}); beyond start-up {_median(ray_beyond) / _median(local_beyond):.2f}.",
        "",
    ]
    summary.append(
        (
            f"Ray engine c={RAY_CONCURRENCY}",
            f"ray {_cell(pairs.b, 'rows_per_s')} rows/s end to end ({_cell(pairs.b, 'send_rows_per_s')} "
            f"sending) vs local {_cell(pairs.a, 'rows_per_s')} ({_cell(pairs.a, 'send_rows_per_s')}); "
            f"CPU/row {_cell(pairs.b, 'cpu_us_per_row')} vs {_cell(pairs.a, 'cpu_us_per_row')} µs, "
            f"beyond start-up {_median(ray_beyond):,.0f} vs {_median(local_beyond):,.0f} µs",
            "measured (no target)",
            "—",
        )
    )


def _render_report(
    report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]
) -> None:
    # 12. batchrun report over many groups
    data = report["report"]
    runs: dict[str, list[dict[str, float]]] = data["runs"]
    md += [
        f"## 12. `batchrun report` over {data['rows']:,} rows",
        "",
        "One output made without sending (`report_outputs.py`: batchrun's schema, every id",
        "unique, three priced models with a price change, 2% failed, 0.5% invalid, 1% reused,",
        "a third batch rows), reported with `--prices jobs/prices.toml`; seconds from process",
        "start to exit (stdout to a file), peak RSS from wait4. `--by id` makes a group of",
        "every row: json and csv list them all, the table the 1,000 costliest.",
        "",
        "| case | seconds | CPU s | peak RSS MB | output MB |",
        "|---|---|---|---|---|",
    ]
    for label, case in runs.items():
        walls = [r["wall_s"] for r in case]
        seconds = f"{_median(walls):.1f}" + (
            f" ({_range(walls, '{:.1f}')})" if len(walls) > 1 else ""
        )
        md.append(
            f"| {label} | {seconds} | {_median([r['cpu_s'] for r in case]):.1f} | "
            f"{_median([r['maxrss_mb'] for r in case]):.0f} | {case[0]['mb']:,.1f} |"
        )
    head = runs[REPORT_CASES[0][0]]
    seconds = _median([r["wall_s"] for r in head])
    ok = seconds < TARGET_REPORT_S
    md += ["", f"Target: `--by id` (json) < {TARGET_REPORT_S:.0f} s: {_met(ok)}.", ""]
    summary.append(
        (
            f"`report --by id` over {data['rows']:,} rows (seconds)",
            f"{seconds:.1f} s json, {_median([r['maxrss_mb'] for r in head]):.0f} MB peak; "
            + "; ".join(
                f"{label} {_median([r['wall_s'] for r in case]):.1f} s"
                for label, case in runs.items()
                if label != REPORT_CASES[0][0]
            ),
            f"< {TARGET_REPORT_S:.0f} s",
            _met(ok),
        )
    )


def render(report: dict[str, Any]) -> tuple[str, str]:
    """(summary table for the terminal, the whole results.md)."""
    m, v = report["machine"], report["versions"]
    summary: list[tuple[str, str, str, str]] = []
    md: list[str] = [
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs (nproc) | {m['nproc']} x {m['cpu']} |",
        f"| RAM | {m['ram']} |",
        f"| kernel | {m['kernel']} |",
        f"| pinning | {m['pinning']} |",
        f"| load average at start / end | {m['load_start']} / {m['load_end']} |",
        f"| CPU steal during the run | {report['steal_pct']:.1f}% of all CPU time |",
        f"| Python | {v['python']} |",
        f"| batchrun | {v['batchrun']} |",
        f"| aiohttp | {v['aiohttp']} |",
        f"| pyarrow | {v['pyarrow']} |",
        f"| orjson / uvloop / openai | {v['orjson']} / {v['uvloop']} / {v['openai']} |",
        "",
        "The machine is shared and noisy: comparisons are made in alternating pairs and the",
        "median ratio is reported with its range (min-max over the pairs). Rates:",
        "",
        "- *end to end*: rows / process wall time from spawn to exit (interpreter start,",
        "  imports, input read, sending, Parquet write). The ratios use this one.",
        "- *in-run*: rows / the time without interpreter start and imports: for batchrun",
        "  from its `start` log event (input scanned, journal open) to its `summary` event",
        "  (Parquet written); for the loops their own send + write time.",
        "- *sending*: rows / (last `finished_at` - first `started_at`) in the output file.",
        "",
        "*Client CPU* is the client process's user+system CPU time per row (wait4), which the",
        "noise affects much less than wall time. *Server busy* is the mock server's CPU time",
        "over the run's wall time: near 100% means the single-core endpoint, not the client,",
        "set the pace. *Other load* is the CPU (in cores, of "
        f"{m['nproc']}) used meanwhile by processes other",
        "than the client and the server: the noise from the rest of the machine.",
        "",
    ]

    for name, section in (
        ("throughput", _render_throughput),
        ("sdk", _render_sdk),
        ("latency", _render_latency),
        ("memory", _render_memory),
        ("merge", _render_merge),
        ("rerun", _render_rerun),
        ("help", _render_help),
        ("pacing", _render_pacing),
        ("structured", _render_structured),
        ("pii", _render_pii),
        ("sporadic", _render_sporadic),
        ("ratelimit", _render_ratelimit),
        ("batchapi", batch_api.render),
        ("ray", _render_ray),
        ("report", _render_report),
    ):
        if name in report:
            section(report, md, summary)

    head = [
        "# batchrun benchmarks",
        "",
        f"Generated by `python benchmarks/run.py` on {report['date']}; the whole run took "
        f"{report['total_s'] / 60:.1f} min"
        + (
            " with the 1,000,000-row memory run."
            if FULL or "memory" not in ONLY
            else " (with `BENCH_FULL=0`, so the 1,000,000-row memory run was skipped)."
        ),
        "What each benchmark measures: [`README.md`](README.md)."
        + ("" if ONLY == SECTIONS else f" Only these ran (`BENCH_ONLY`): {', '.join(ONLY)}."),
        "",
        "## Summary",
        "",
        "| benchmark | result | target | met |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary],
        "",
    ]
    text = "\n".join(head + md)

    cols = ("benchmark", "result", "target", "met")
    rows = [cols, *[tuple(x.replace("**", "") for x in row) for row in summary]]
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(s.ljust(w[i]) for i, s in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines), text


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="batchrun-bench-"))
    try:
        yield path
    finally:
        if KEEP:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    started = time.perf_counter()
    steal0 = _steal_ticks()
    if SERVER_CPU is not None:
        # The runner mostly sleeps; keep it off the client's core.
        os.sched_setaffinity(0, {SERVER_CPU})
    if "ray" in ONLY and not _set_subreaper():
        say("cannot become a subreaper: the Ray runs' CPU misses the processes Ray leaves")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": versions(),
    }
    unknown = [x for x in ONLY if x not in SECTIONS]
    if unknown:
        raise BenchError(f"BENCH_ONLY: unknown {unknown}; known: {', '.join(SECTIONS)}")
    say(
        f"{report['machine']['pinning']}; {ROWS:,} rows, {PAIRS} pairs, BENCH_FULL={int(FULL)}, "
        f"benchmarks: {', '.join(x for x in SECTIONS if x in ONLY)}"
    )
    with workspace() as workdir:
        tickets = make_inputs(workdir)
        plain = {
            "throughput": bench_throughput,
            "sdk": bench_sdk,
            "pacing": bench_pacing,
            "structured": bench_structured,
            "pii": bench_pii,
        }
        plain["memory"] = bench_memory
        plain["sporadic"] = bench_sporadic
        plain["ratelimit"] = bench_ratelimit
        plain["ray"] = bench_ray
        if any(name in ONLY for name in plain):
            with MockServer(workdir) as server:
                for name, bench in plain.items():
                    if name in ONLY:
                        report[name] = bench(server, workdir, tickets)
        if "merge" in ONLY:
            report["merge"] = bench_merge(workdir, tickets)
        if "rerun" in ONLY:
            report["rerun"] = bench_rerun(workdir, tickets)
        if "latency" in ONLY:
            with MockServer(workdir, latency_ms=LATENCY_MS) as server:
                report["latency"] = bench_latency(server, workdir, tickets)
        if "help" in ONLY:
            report["help"] = bench_help(workdir)
        if "report" in ONLY:
            report["report"] = bench_report(workdir)
        if "batchapi" in ONLY:
            with MockServer(workdir, flags=batch_api.SERVER_ARGS, name="batchapi") as server:
                report["batchapi"] = batch_api.run_section(
                    server, workdir, tickets, ROWS, run_proc, CLIENT_CPU, PY, say, BenchError
                )
    steal1 = _steal_ticks()
    total = steal1[1] - steal0[1]
    report["steal_pct"] = 100 * (steal1[0] - steal0[0]) / total if total > 0 else 0.0
    report["machine"]["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report["total_s"] = time.perf_counter() - started
    table, text = render(report)
    RESULTS.write_text(text)
    print(table)
    print(f"\nwhole run: {report['total_s']:.0f} s; results written to {RESULTS}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        say(f"FAILED: {exc}")
        raise SystemExit(1) from None
