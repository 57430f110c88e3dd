"""Subprocesses for the tests that run ``batchrun`` (or a mock server) as a program.

``Procs`` starts them with their output going to files (never pipes, which fill
up and stall a long run), waits for them with a timeout that fails the test with
what they printed, and kills whatever is left when the test ends (the ``procs``
fixture). Files that need more (a hook that stops the CLI at a chosen point)
subclass it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import pytest


@dataclass
class Proc:
    """A started subprocess and the files its output goes to."""

    popen: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    files: list[IO[bytes]]
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        for f in self.files:
            f.flush()
        return (
            self.out_path.read_text(errors="replace"),
            self.err_path.read_text(errors="replace"),
        )


@dataclass
class Done:
    """How a subprocess ended: exit code, output and seconds since it started."""

    rc: int
    out: str
    err: str
    wall_s: float

    @property
    def text(self) -> str:
        return self.out + self.err


class Procs:
    """Starts subprocesses (output to files, never pipes) and kills what is left at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Proc] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> Proc:
        n = len(self.started)
        out_path = self.folder / f"proc-{n}.out"
        err_path = self.folder / f"proc-{n}.err"
        out, err = out_path.open("wb"), err_path.open("wb")
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env if env is not None else os.environ.copy(),
            cwd=self.folder,
        )
        proc = Proc(popen, out_path, err_path, [out, err])
        self.started.append(proc)
        return proc

    def wait(self, proc: Proc, timeout: float = 60.0) -> Done:
        """Its end, within ``timeout`` seconds (else it is killed and the test fails)."""
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
            out, err = proc.output()
            pytest.fail(f"{proc.popen.args!r} did not finish within {timeout}s\n{out}\n{err}")
        out, err = proc.output()
        return Done(rc, out, err, time.monotonic() - proc.started)

    def run(
        self, args: list[str], timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> Done:
        return self.wait(self.start(args, env), timeout)

    def close(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                proc.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)
            for f in proc.files:
                f.close()


P = TypeVar("P", bound=Procs)


@contextlib.contextmanager
def procs_in(folder: Path, kind: type[P]) -> Iterator[P]:
    """A ``kind`` of Procs working in ``folder`` (made), closed at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    p = kind(folder)
    try:
        yield p
    finally:
        p.close()
