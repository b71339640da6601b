"""Start and stop ``vllm serve`` subprocesses on loopback (tests, load benchmark, examples).

The server gets exactly the engine arguments ``massv_vllm.engine.engine_kwargs`` gives the
offline ``LLM`` (CPU-safe flags on a machine without a GPU), translated to CLI flags, so an
offline run and a served run of the same target/drafter are configured alike. Each server runs
in its own process group: ``stop()`` ends the API server *and* the engine-core processes it
spawned, and a server that fails to start raises with the tail of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from massv_vllm.engine import engine_kwargs

HOST = "127.0.0.1"
# argparse flags that exist only as ``--flag`` (store_true) and whose default is False; every
# other boolean engine argument is a BooleanOptionalAction (``--flag`` / ``--no-flag``).
_STORE_TRUE_ONLY = {"disable_log_stats"}


class ServerError(RuntimeError):
    """The server did not come up (or died); the message ends with its log tail."""


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cli_args(kwargs: Mapping[str, Any]) -> list[str]:
    """Translate ``engine_kwargs`` output to ``vllm serve`` / api_server arguments."""
    args: list[str] = []
    for key, value in kwargs.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
            elif key not in _STORE_TRUE_ONLY:
                args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def log_tail(path: Path, n_lines: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n_lines:])


class Server:
    """A running ``vllm serve`` process; a context manager that stops it on exit."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, model: str, argv: list[str]):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.model = model  # the served model name (what requests put in "model")
        self.argv = argv

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI client base URL."""
        return self.url + "/v1"

    def alive(self) -> bool:
        # Never reaps the process: while its zombie exists, its pid (= the process group id that
        # stop() signals) cannot be reused by an unrelated process.
        return self.proc.returncode is None and not _exited_unreaped(self.proc.pid)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
        """One HTTP request; returns (status, parsed JSON or text). 4xx/5xx are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            return self.request("GET", "/health", timeout=timeout)[0] == 200
        except OSError:
            return False

    def metrics_text(self) -> str:
        status, text = self.request("GET", "/metrics", timeout=30)
        if status != 200:
            raise ServerError(f"GET /metrics returned {status}: {str(text)[:200]}")
        return text if isinstance(text, str) else json.dumps(text)

    def chat(self, messages: list[dict[str, Any]], timeout: float = 300.0, **params: Any) -> tuple[int, Any]:
        """POST /v1/chat/completions (non-streaming)."""
        return self.request(
            "POST",
            "/v1/chat/completions",
            {"model": self.model, "messages": messages, **params},
            timeout=timeout,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT the process group (vLLM's graceful shutdown), SIGKILL it if still up after ``timeout``."""
        if self.proc.returncode is None:
            if not _exited_unreaped(self.proc.pid):
                _signal_group(self.proc, signal.SIGINT)
                if not _wait_exit_unreaped(self.proc.pid, timeout):
                    _signal_group(self.proc, signal.SIGKILL)
                    _wait_exit_unreaped(self.proc.pid, 30)
            # The leader is a zombie now, so the group id is still ours: end any engine process
            # left in it, then reap the leader.
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exited_unreaped(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _wait_exit_unreaped(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited_unreaped(pid):
            return True
        time.sleep(0.1)
    return _exited_unreaped(pid)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The group of *our* child (start_new_session=True): the server and its engine processes only.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def start_server(
    target: str | os.PathLike,
    speculative_config: dict[str, Any] | None = None,
    *,
    port: int | None = None,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    served_model_name: str | None = None,
    startup_timeout: float = 600.0,
    **engine_overrides: Any,
) -> Server:
    """Start ``vllm serve`` for ``target`` (optionally with a speculative config) and wait for /health.

    ``engine_overrides`` go through ``engine_kwargs`` (e.g. ``max_model_len``, ``max_images``,
    ``dtype``, ``max_num_seqs``); ``extra_args`` are appended verbatim (last flag wins).
    Raises ``ServerError`` with the log tail if the process exits or is not healthy in time.
    """
    kw = engine_kwargs(str(target), speculative_config, **engine_overrides)
    # The api_server module rather than the ``vllm`` launcher: a launcher script without a
    # __main__ guard breaks when vLLM spawns engine processes (seen with the GPU kit's launcher).
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *cli_args(kw)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return start_command(
        argv + list(extra_args),
        model=served_model_name or str(target),
        port=port,
        env=env,
        log_path=log_path,
        startup_timeout=startup_timeout,
    )


def start_command(
    argv: list[str],
    *,
    model: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    startup_timeout: float = 600.0,
) -> Server:
    """Run a server command line as given (``--host``/``--port`` appended) and wait for /health.

    ``model`` is the name requests use (the served model name). Used by ``start_server`` and by
    tests that run a command exactly as the README shows it."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
        os.close(fd)
        log_path = name
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    # A port picked by free_port() can be taken before the server binds it: retry on a new one.
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        p = port if port is not None else free_port()
        full = [*argv, "--host", HOST, "--port", str(p)]
        with open(log, "ab") as fh:
            fh.write(f"\n$ {' '.join(full)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                full, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        server = Server(proc, p, log, model, full)
        try:
            _wait_healthy(server, startup_timeout)
            return server
        except BaseException as e:  # KeyboardInterrupt included: never leave a server behind
            server.stop(timeout=10)
            port_taken = isinstance(e, ServerError) and "address already in use" in log_tail(log).lower()
            if not (port_taken and attempt + 1 < attempts):
                raise
    raise AssertionError("unreachable")


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            server.stop(timeout=10)  # reaps it (exit code) and ends engine processes it left
            raise ServerError(
                f"vllm serve exited with code {server.proc.returncode} before becoming healthy "
                f"(log {server.log_path}):\n{log_tail(server.log_path)}"
            )
        if server.healthy(timeout=2):
            return
        time.sleep(0.5)
    raise ServerError(
        f"vllm serve not healthy after {timeout:.0f} s (log {server.log_path}):\n{log_tail(server.log_path)}"
    )
