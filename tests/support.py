"""Assertions and subprocess set-ups shared by the tests."""

from __future__ import annotations


BUILDING = "localora: building the tiny models once"
TINY_NOTE = "note: tiny profile:"  # a tiny-profile run's first line (localora.tiny.NOTE), before any error


def one_error_line(result, *fragments: str) -> None:
    """A user error: non-zero exit, exactly one line 'error: ...' naming the fragments, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    # The first use of a tiny profile in a fresh home says, before the error, that it builds the
    # tiny models (cli/options.announce_tiny_build): true, and no part of the error.
    # A run on a tiny profile first says what tiny models are (its note), true as well.
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith((BUILDING, TINY_NOTE))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


# Runs `localora ARGS` in a fresh interpreter, then reports which heavy libraries the command loaded.
_PROBE = """
import json, runpy, sys
sys.argv = ["localora", *sys.argv[1:]]
try:
    runpy.run_module("localora", run_name="__main__")
except SystemExit as e:
    code = e.code
print("\\n" + json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
"""
HEAVY = ("torch", "diffusers", "transformers")


def heavy_imports(*args, env: dict | None = None) -> tuple[int, list[str], str]:
    """(exit code, heavy modules loaded, stdout) of `localora ARGS` run in a subprocess."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{_PROBE}", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], proc.stdout


def ctrl_c_works() -> None:
    """preexec_fn of a CLI subprocess that a test stops with SIGINT: Ctrl-C's default action in it,
    even when pytest runs with SIGINT ignored (a background job of a non-interactive shell does:
    Python then leaves it ignored in every child, and the test's SIGINT would do nothing)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

# ------------------------------------------------------------------ no network

# Put first on PYTHONPATH, this makes every TCP/UDP connect of the process fail and be recorded.
# AF_UNIX sockets (local IPC, never the network) are let through; nothing in the demo uses them today.
NO_NETWORK = '''
import os
import socket

_LOG = os.environ["NO_NETWORK_LOG"]
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _refuse(what):
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(what + "\\n")
    return OSError(101, "network blocked by tests/support.py: " + what)


def _local(sock):
    return hasattr(socket, "AF_UNIX") and sock.family == socket.AF_UNIX


def connect(self, address):
    if _local(self):
        return _connect(self, address)
    raise _refuse("connect %r" % (address,))


def connect_ex(self, address):
    if _local(self):
        return _connect_ex(self, address)
    raise _refuse("connect_ex %r" % (address,))


def create_connection(address, *args, **kwargs):
    raise _refuse("create_connection %r" % (address,))


socket.socket.connect, socket.socket.connect_ex, socket.create_connection = connect, connect_ex, create_connection
'''


def no_network_env(site, log, env: dict | None = None) -> dict:
    """`env` (default: os.environ) for a Python subprocess whose TCP/UDP connects fail and are
    appended to `log`: NO_NETWORK as sitecustomize.py in the folder `site`, first on PYTHONPATH;
    HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE left out (the libraries must not need them to stay off
    the network)."""
    import os
    from pathlib import Path

    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    base = dict(os.environ if env is None else env)
    out = {k: v for k, v in base.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out.update(NO_NETWORK_LOG=str(log), PYTHONPATH=os.pathsep.join([str(site), *filter(None, [base.get("PYTHONPATH")])]))
    return out


# Beside the conftest demo's home: where its runs' refused connections, the second run's config
# folder (config.toml: out = "demo-runs") and that run's working folder are.
DEMO_NETWORK_LOG, DEMO_CONFIG, DEMO_CWD = "network.log", "demo-config", "demo-cwd"


def signal_after(proc, lines: int, sig) -> None:
    """Send `sig` to `proc` (a `--plain` localora run, stdout piped as text) once it has printed
    `lines` event lines (those starting with "["), then wait for it to end."""
    seen = 0
    for line in proc.stdout:
        if line.startswith("["):
            seen += 1
            if seen == lines:
                proc.send_signal(sig)
                break
    proc.communicate(timeout=120)
