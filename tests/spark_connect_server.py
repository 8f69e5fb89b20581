"""A real Apache Spark Connect server for tests, started from pyspark's own jars.

pyspark's pip package ships ``jars/spark-connect_2.13-<version>.jar``, so no Spark distribution is needed:
:func:`start_connect_server` runs

    pyspark/bin/spark-submit --master local[2] \\
        --class org.apache.spark.sql.connect.service.SparkConnectServer \\
        --packages io.delta:delta-spark_<spark>_2.13:<delta> --conf spark.sql.extensions=... \\
        --conf spark.connect.grpc.binding.address=127.0.0.1 --conf spark.connect.grpc.binding.port=<free port>

in its own process group, with the server's Python workers on this interpreter (``PYSPARK_PYTHON``) and
this repository on their ``PYTHONPATH`` (the job's ``mapInArrow`` encoder imports ``pipelines`` and
``rqvae`` there), waits until the JVM listens on that port (a server that could not bind it, because
another process took it meanwhile, is started again on another), and gives back a :class:`ConnectServer`
whose :attr:`~ConnectServer.url` a client passes as ``--remote`` / ``SparkSession.builder.remote``.
``spark-submit --packages`` fetches the Delta jars from Maven Central once (into ``~/.ivy2.5.2``); later
starts read them from there.

:func:`running_connect_server` is the same as a context manager that always stops the server (the JVM
and the Python worker daemons it forked), for a pytest fixture::

    @pytest.fixture(scope="module")
    def connect_server(tmp_path_factory):
        with running_connect_server(tmp_path_factory.mktemp("connect")) as server:
            yield server

Java 17+ is needed: :func:`ensure_java` finds it (``JAVA_HOME`` or ``PATH``) and, when it is missing and
this process is root on a machine with ``apt-get`` (CI), installs Debian's ``openjdk-17-jre-headless``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import pyspark

from pipelines.session import DELTA_EXTENSION, delta_maven_coordinate

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
SPARK_SUBMIT = Path(pyspark.__file__).parent / "bin" / "spark-submit"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
# A cold start fetches the Delta jars from Maven Central first; a warm one takes ~15 s on 2 busy cores.
START_TIMEOUT_S = 300.0
# What the server logs when it cannot bind its port (Spark Connect does not move to another port itself).
_BIND_FAILED = "Failed to bind to address"
# Small-data settings: Delta's snapshot reconstruction and shuffles otherwise run 50-200 tiny tasks. A test
# server lives a few minutes, mostly in code run once: the C1 JIT alone and the serial GC leave the CPU to the
# work (measured on 2 busy cores: start 8-16 s instead of 21 s, a first job run 58-82 s instead of 103-127 s).
TEST_CONF = {
    "spark.ui.enabled": "false",
    "spark.driver.memory": "1g",
    "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "2",
    "spark.databricks.delta.snapshotPartitions": "2",
}


class ConnectServerError(RuntimeError):
    """The server did not come up (or Java is missing); the message has the fix or the server log's tail.
    ``server``: the (stopped) server that failed to start, if one was launched."""

    def __init__(self, message: str, server: ConnectServer | None = None) -> None:
        super().__init__(message)
        self.server = server


@dataclass
class ConnectServer:
    """A running Spark Connect server process.

    Attributes:
        port: the loopback port its gRPC service listens on.
        process: the ``spark-submit`` process (it ``exec``s the JVM, so this is the driver JVM).
        log_path: the server's stdout and stderr.
    """

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _descendants: list[Any] = field(default_factory=list, repr=False)  # psutil.Process objects

    @property
    def url(self) -> str:
        """``sc://127.0.0.1:<port>``: what ``--remote`` takes."""
        return f"sc://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no server log at {self.log_path}: {e})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group (the JVM runs Spark's shutdown hooks), SIGKILL after
        ``grace_s``; then end any Python worker daemon it forked (they start process groups of their
        own) that outlived it. Idempotent."""
        self._remember_descendants()
        if self.alive():
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        _end_processes(self._descendants, grace_s=10.0)

    def leftovers(self) -> list[str]:
        """What of the server still runs (``pid cmdline`` each): its JVM, a Python worker daemon it forked,
        or any process started with its port setting. Empty after :meth:`stop`."""
        import psutil

        marker = f"spark.connect.grpc.binding.port={self.port}"
        found = {p.pid: p for p in self._descendants if _running(p)}
        if self.alive():
            found[self.process.pid] = psutil.Process(self.process.pid)
        for proc in psutil.process_iter(["cmdline"]):
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
        return [f"{pid} {' '.join(_cmdline(proc))[:200]}" for pid, proc in sorted(found.items())]

    def _remember_descendants(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        known = {p.pid for p in self._descendants}
        self._descendants += [p for p in children if p.pid not in known]


def free_port() -> int:
    """A TCP port nobody listens on at this moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_java() -> str:
    """The ``java`` binary (``helpers.ensure_java``); :class:`ConnectServerError` with the fix when missing."""
    return helpers.ensure_java(ConnectServerError)


def server_command(port: int, *, delta: bool = True, master: str = "local[2]",
                   conf: Mapping[str, str] | None = None) -> list[str]:
    """The ``spark-submit`` command line of a Connect server on ``127.0.0.1:port``."""
    settings = {**TEST_CONF, **(conf or {}), "spark.connect.grpc.binding.address": "127.0.0.1",
                "spark.connect.grpc.binding.port": str(port)}
    if delta:
        settings |= {"spark.sql.extensions": DELTA_EXTENSION, "spark.sql.catalog.spark_catalog": DELTA_CATALOG}
    command = [str(SPARK_SUBMIT), "--master", master, "--class", SERVER_CLASS, "--name", "csid-test-connect-server"]
    if delta:
        command += ["--packages", delta_maven_coordinate()]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    return command


def start_connect_server(log_dir: Path, *, delta: bool = True, master: str = "local[2]",
                         conf: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                         timeout_s: float = START_TIMEOUT_S, attempts: int = 3) -> ConnectServer:
    """Start a Spark Connect server on a free loopback port and wait until it listens there.

    Args:
        log_dir: where ``connect-server.log`` (the server's stdout + stderr) is written.
        delta: with the Delta jars, SQL extension and catalog (the Maven coordinate matching the installed
            pyspark and delta-spark, as ``pipelines.session.delta_maven_coordinate`` names it).
        master: the server's Spark master.
        conf: more ``--conf`` settings (override :data:`TEST_CONF`).
        env: environment overrides for the server (an empty value removes the variable, as in
            ``helpers.subprocess_env``).
        timeout_s: how long to wait until it listens, per attempt.
        attempts: a server that could not bind its port (taken meanwhile) is started again on another one.

    Raises:
        ConnectServerError: the server exited or did not listen in time; the message has the log's tail.
    """
    ensure_java()  # spark-class finds it through JAVA_HOME or PATH
    server_env = helpers.subprocess_env(PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
                                        PYSPARK_SUBMIT_ARGS="", **(env or {}))
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_path = log_dir / ("connect-server.log" if attempt == 1 else f"connect-server-{attempt}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(server_command(port, delta=delta, master=master, conf=conf), cwd=log_dir,
                                       env=server_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own process group: stop() signals all of it
        server = ConnectServer(port, process, log_path)
        try:
            _wait_until_listening(server, timeout_s)
            return server
        except ConnectServerError as e:
            server.stop()
            e.server = server
            if _BIND_FAILED not in server.log_tail(400) or attempt == attempts:
                raise
    raise AssertionError("unreachable")


@contextmanager
def running_connect_server(log_dir: Path, **kwargs: Any) -> Iterator[ConnectServer]:
    """:func:`start_connect_server` for the block; the server is stopped however the block ends."""
    server = start_connect_server(log_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def _wait_until_listening(server: ConnectServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise ConnectServerError(f"the Spark Connect server exited with code {server.process.returncode} before "
                                     f"listening on 127.0.0.1:{server.port}; last lines of {server.log_path}:\n"
                                     f"{server.log_tail()}")
        # The server's own listening sockets, not a connect: another process may hold the asked port.
        if server.port in _listening_ports(server.process.pid):
            return
        time.sleep(0.5)
    raise ConnectServerError(f"the Spark Connect server did not listen on 127.0.0.1:{server.port} within "
                             f"{timeout_s:.0f} s (a first start downloads the Delta jars from Maven Central); "
                             f"last lines of {server.log_path}:\n{server.log_tail()}")


def _listening_ports(pid: int) -> set[int]:
    import psutil

    try:
        return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


def _running(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(proc: Any) -> list[str]:
    import psutil

    try:
        return list(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ["?"]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the group start_new_session made: the JVM and anything it did not detach


def _end_processes(processes: list[Any], grace_s: float) -> None:
    """SIGTERM each psutil.Process still alive, wait up to ``grace_s``, SIGKILL what is left. (psutil refuses
    to signal a process whose pid was reused meanwhile: it raises NoSuchProcess.)"""
    import psutil

    alive = []
    for proc in processes:
        try:
            proc.terminate()
            alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for proc in left:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
