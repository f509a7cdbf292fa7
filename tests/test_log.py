"""Where the daemon's logs go: a size-rotated file, or stderr for the journal when systemd says stderr is it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from gitlora.daemon import log, paths
from tests.daemonutil import DaemonProcess


def run_logging(script: str, *, stderr, env: dict[str, str] | None = None) -> None:
    """Configure logging in a fresh interpreter (the root logger is process-wide) and run `script` there."""
    prelude = "from gitlora.daemon import log\n"
    subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], stderr=stderr,
                   env={**os.environ, **(env or {})}, check=True, timeout=120)


def test_log_file_rotates_at_the_size_bound(tmp_path):
    target = tmp_path / "state" / "daemon.log"
    bound = 10 * 1024 * 1024  # the promised bound: 10 MiB per file, 3 old files
    # ~4.5 bounds' worth of 200 KB events through the defaults the daemon uses
    count = int(4.5 * bound / 200_000)
    run_logging(f"""
        from pathlib import Path
        log.configure(Path({str(target)!r}), console=False)
        for i in range({count}):
            log.get().info("filler", i=i, blob="x" * 200_000)
        log.get().info("last_event")
        """, stderr=subprocess.PIPE)
    files = sorted(p.name for p in target.parent.iterdir())
    assert files == ["daemon.log", "daemon.log.1", "daemon.log.2", "daemon.log.3"]  # BACKUPS old files, no more
    for name in files:
        size = (target.parent / name).stat().st_size
        assert size <= bound, (name, size)
    assert all((target.parent / name).stat().st_size > bound - 250_000 for name in files[1:])
    newest = [json.loads(line) for line in target.read_text().splitlines()]
    assert newest[-1]["event"] == "last_event"
    older = [json.loads(line)["i"] for line in (target.parent / "daemon.log.1").read_text().splitlines()]
    assert older == list(range(older[0], older[0] + len(older)))  # whole lines, in order, nothing torn
    assert newest[0]["i"] == older[-1] + 1


def test_journal_stream_sends_the_daemons_logs_to_stderr_only_when_it_names_stderr(tmp_path):
    # A child whose stderr was redirected inherits JOURNAL_STREAM: it must keep logging to its file.
    other = tmp_path / "journal-stand-in"
    other.write_text("")
    st = os.stat(other)
    target = tmp_path / "child.log"
    with open(tmp_path / "child-stderr", "wb") as err:
        run_logging(f"""
            from pathlib import Path
            log.configure(Path({str(target)!r}), console=False)
            log.get().info("to_the_file", n=1)
            """, stderr=err, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert (tmp_path / "child-stderr").read_text() == ""
    assert json.loads(target.read_text())["event"] == "to_the_file"

    # The daemon as systemd starts it: stderr is the stream JOURNAL_STREAM names.
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        daemon = DaemonProcess(env)
        daemon.proc = subprocess.Popen([sys.executable, "-m", "gitlora.daemon", "daemon"], env=env,
                                       stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        try:
            daemon.wait_ready()
        finally:
            assert daemon.stop() == 0
    lines = err_path.read_text().splitlines()
    ready = [line for line in lines if line.startswith("<6>daemon_ready ")]
    assert len(ready) == 1 and f"pid={daemon.proc.pid}" in ready[0]
    assert "<6>daemon_stopped" in lines
    assert not any(line.startswith("{") for line in lines)  # no JSON, no timestamp: the journal stamps lines
    assert not (paths.state_home() / "daemon.log").exists()


def test_journal_line_is_one_line_with_the_priority():
    def line(**event) -> str:
        return log.journal_line(None, "info", {"timestamp": "t", **event})

    assert line(level="info", event="repo_added", repo="demo", n=3) == "<6>repo_added repo=demo n=3"
    assert line(level="warning", event="slow", why="two words") == '<4>slow why="two words"'
    assert line(level="error", event="failed", exception='Traceback\n  File "x"\nValueError: bad') == \
        '<3>failed exception="Traceback\\n  File \\"x\\"\\nValueError: bad"'
    assert line(level="debug", event="x", empty="", none=None, flag=True, d={"a": 1}) == \
        '<7>x empty="" none= flag=true d="{\\"a\\":1}"'
    assert line(level="critical", event="multi\nline") == "<2>multi\\nline"
