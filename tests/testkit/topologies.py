"""Private production-like topologies for tests, on loopback and free ports (never the shared services).

* ``certificates(dir)``: a test CA, a server certificate for 127.0.0.1/localhost and a client certificate.
* ``tls_redis(certs)``: redis-server speaking TLS only (``--port 0 --tls-port``), client certificates optional or
  required.
* ``sentinel_redis()``: one master, one replica and three sentinels (``redis-server --sentinel``), quick to fail
  over (``down-after-milliseconds`` 1000); ``kill_master()`` then ``wait_for_new_master()``.
* ``rogue_sentinels(port)``: sentinels of the same service name that monitor another node (a rogue group, or one
  that was partitioned away and still names an old master): they answer ``SENTINEL master`` as confidently as the
  real ones.
* ``redis_cluster()``: three masters with one replica each (``--cluster-enabled`` + ``redis-cli --cluster
  create``); ``fail_over(slot)`` promotes the replica of the master owning a slot.
* ``postgres_pair()``: a PostgreSQL primary and a streaming replica (``initdb``, ``pg_basebackup -R``), run as the
  unprivileged ``postgres`` user when the tests run as root; ``promote()``. ``ssl=True`` turns TLS on with
  ``certificates``.

Everything is started with the OS's binaries (Debian's ``redis-server``/``redis-cli``, PostgreSQL 15 under
``/usr/lib/postgresql``) and torn down on exit, whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testkit import servers

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVICE = "modcache-test"


def wait_until(condition: Callable[[], bool], *, timeout_s: float, what: str, step_s: float = 0.05) -> None:
    """Poll ``condition`` (a server's state, which nothing announces) until it holds or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(step_s)


# -- certificates ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def certificates(directory: Path, *, owner: str | None = None) -> Certificates:
    """A CA and two leaf certificates (server: 127.0.0.1 + localhost; client: CN modcache) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modcache test CA")])
    ca = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _certificate(_cn("localhost"), server_key.public_key(), ca_name, ca_key, san=names, server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(_cn("modcache"), client_key.public_key(), ca_name, ca_key)
    paths = Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    for path, cert in ((paths.ca, ca), (paths.server_cert, server), (paths.client_cert, client)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for path, key in ((paths.server_key, server_key), (paths.client_key, client_key)):
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
    if owner is not None:
        for path in directory.iterdir():
            _chown(path, owner)
    return paths


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


# -- Redis -------------------------------------------------------------------------------------------------------


class RedisProcess:
    """One redis-server (or sentinel) of the test's own."""

    def __init__(self, args: list[str], port: int) -> None:
        self.port = port
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.wait_port(self.port)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved, no goodbye to replicas or clients."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def cli(self, *args: str, tls: Certificates | None = None) -> str:
        base = ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        if tls is not None:
            base += ["--tls", "--cacert", str(tls.ca), "--cert", str(tls.client_cert), "--key", str(tls.client_key)]
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def redis_server_args(port: int, directory: Path, *extra: str) -> list[str]:
    return [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(directory), *extra,
    ]  # fmt: skip


@dataclasses.dataclass
class TlsRedis:
    server: RedisProcess
    certs: Certificates

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.server.port}/0"


@contextlib.contextmanager
def tls_redis(certs: Certificates, *, client_certificates: str = "optional") -> Iterator[TlsRedis]:
    """TLS only (no plain port); ``client_certificates``: ``yes`` (required), ``optional`` or ``no``."""
    port = servers.free_port()
    with tempfile.TemporaryDirectory(prefix="modcache-tls-redis-") as scratch:
        args = redis_server_args(0, Path(scratch))
        args[args.index("--port") + 1] = "0"
        args += [
            "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert), "--tls-key-file",
            str(certs.server_key), "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", client_certificates,
        ]  # fmt: skip
        server = RedisProcess(args, port)
        server.start()
        try:
            yield TlsRedis(server, certs)
        finally:
            server.stop()


@dataclasses.dataclass
class Sentinel:
    """A Sentinel-monitored master/replica pair named ``SERVICE``."""

    nodes: list[RedisProcess]  # [first master, first replica]
    sentinels: list[RedisProcess]
    service: str = SERVICE

    def url(self, scheme: str = "redis+sentinel", db: int = 0, sentinels: list[RedisProcess] | None = None) -> str:
        """The URL naming ``sentinels`` (default: the topology's own three), in that order."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in (self.sentinels if sentinels is None else sentinels))
        return f"{scheme}://{hosts}/{self.service}/{db}"

    def master_port(self) -> int:
        answer = self.sentinels[0].cli("SENTINEL", "get-master-addr-by-name", self.service).split()
        return int(answer[1])

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.node(port).kill()
        return port

    def fail_over(self) -> int:
        """A planned ``SENTINEL FAILOVER`` (the master stays up and writable until the sentinels demote it, seconds
        later); returns the old master's port."""
        port = self.master_port()
        self.sentinels[0].cli("SENTINEL", "FAILOVER", self.service)
        return port

    def wait_for_new_master(self, old_port: int, *, timeout_s: float = 30.0) -> int:
        """Until every sentinel reports another master, up (flags exactly ``master``); returns its port."""
        wait_until(lambda: self._settled_master() not in (None, old_port), timeout_s=timeout_s, what="failover")
        return self.master_port()

    def _settled_master(self) -> int | None:
        ports = set()
        for sentinel in self.sentinels:
            try:
                fields = sentinel.cli("SENTINEL", "master", self.service).split("\n")
            except subprocess.CalledProcessError:
                return None
            state = dict(zip(fields[::2], fields[1::2], strict=False))
            if state.get("flags") != "master":
                return None
            ports.add(int(state["port"]))
        return ports.pop() if len(ports) == 1 else None


@contextlib.contextmanager
def sentinel_redis(*, down_after_ms: int = 1000) -> Iterator[Sentinel]:
    with tempfile.TemporaryDirectory(prefix="modcache-sentinel-") as scratch:
        root = Path(scratch)
        master_port, replica_port = servers.free_port(), servers.free_port()
        master = RedisProcess(redis_server_args(master_port, _mkdir(root / "master")), master_port)
        replica_args = redis_server_args(
            replica_port, _mkdir(root / "replica"), "--replicaof", "127.0.0.1", str(master_port)
        )
        replica = RedisProcess(replica_args, replica_port)
        sentinels = []
        for n in range(3):
            port = servers.free_port()
            conf = _mkdir(root / f"sentinel{n}") / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 5000\nsentinel parallel-syncs {SERVICE} 1\n"
            )
            sentinels.append(RedisProcess(["redis-server", str(conf), "--sentinel"], port))
        everything = [master, replica, *sentinels]
        try:
            for process in everything:
                process.start()
            wait_until(
                lambda: "master_link_status:up" in replica.cli("INFO", "replication"), timeout_s=15, what="replica"
            )
            topology = Sentinel(nodes=[master, replica], sentinels=sentinels)
            wait_until(lambda: _sentinels_see_replica(topology), timeout_s=15, what="sentinels discover the replica")
            yield topology
        finally:
            for process in everything:
                process.kill()


@contextlib.contextmanager
def rogue_sentinels(
    port: int, *, count: int = 2, service: str = SERVICE, bind: str = "127.0.0.1", first_id: str | None = None
) -> Iterator[list[RedisProcess]]:
    """``count`` sentinels naming the node on ``port`` the master of ``service``, aware of each other (so redis-py's
    ``min_other_sentinels`` check passes for them). ``bind``: the addresses they listen on; ``first_id``: the run id
    the first one claims (``sentinel myid``: another sentinel's, to spoof it)."""
    with tempfile.TemporaryDirectory(prefix="modcache-rogue-sentinel-") as scratch:
        rogues = []
        for n in range(count):
            sentinel_port = servers.free_port()
            conf = _mkdir(Path(scratch) / f"rogue{n}") / "sentinel.conf"
            conf.write_text(
                f"port {sentinel_port}\nbind {bind}\ndir {conf.parent}\n"
                + (f"sentinel myid {first_id}\n" if first_id is not None and n == 0 else "")
                + f"sentinel monitor {service} 127.0.0.1 {port} {count}\n"
                f"sentinel down-after-milliseconds {service} 60000\n"
            )
            rogues.append(RedisProcess(["redis-server", str(conf), "--sentinel"], sentinel_port))
        try:
            for rogue in rogues:
                rogue.start()
            wait_until(lambda: all(_peers(r, service) >= count - 1 for r in rogues), timeout_s=15, what="rogues meet")
            yield rogues
        finally:
            for rogue in rogues:
                rogue.kill()


def _peers(sentinel: RedisProcess, service: str) -> int:
    fields = sentinel.cli("SENTINEL", "master", service).split("\n")
    return int(dict(zip(fields[::2], fields[1::2], strict=False)).get("num-other-sentinels", 0))


def _sentinels_see_replica(topology: Sentinel) -> bool:
    replica = str(topology.nodes[1].port)
    return all(replica in s.cli("SENTINEL", "replicas", topology.service) for s in topology.sentinels)


@dataclasses.dataclass
class Cluster:
    """Three masters, each with one replica."""

    nodes: list[RedisProcess]

    def url(self, scheme: str = "redis+cluster") -> str:
        return f"{scheme}://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def owner(self, slot: int) -> RedisProcess:
        """The master serving ``slot`` now."""
        for line in self.nodes[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return self._by_address(fields[1])
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: RedisProcess) -> RedisProcess:
        master_id = master.cli("CLUSTER", "MYID")
        for line in master.cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if fields[3] == master_id:
                return self._by_address(fields[1])
        raise LookupError(f"master {master.port} has no replica")

    def fail_over(self, slot: int) -> tuple[RedisProcess, RedisProcess]:
        """Promote the replica of ``slot``'s master (``CLUSTER FAILOVER``); returns (old, new) master."""
        old = self.owner(slot)
        new = self.replica_of(old)
        new.cli("CLUSTER", "FAILOVER")
        wait_until(lambda: self.owner(slot) is new, timeout_s=30, what=f"failover of slot {slot}")
        return old, new

    def _by_address(self, address: str) -> RedisProcess:
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        return next(n for n in self.nodes if n.port == port)


@contextlib.contextmanager
def redis_cluster(*, node_timeout_ms: int = 2000) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="modcache-cluster-") as scratch:
        nodes = []
        for n in range(6):
            port = servers.free_port()
            directory = _mkdir(Path(scratch) / f"node{n}")
            args = redis_server_args(
                port, directory, "--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(servers.free_port()),
            )  # fmt: skip
            nodes.append(RedisProcess(args, port))
        try:
            for node in nodes:
                node.start()
            addresses = [f"127.0.0.1:{n.port}" for n in nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            ok = lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes)  # noqa: E731
            wait_until(ok, timeout_s=30, what="cluster state ok")
            linked = lambda: all(  # noqa: E731 -- a manual failover needs its replica in sync
                "master_link_status:up" in n.cli("INFO", "replication")
                for n in nodes
                if "role:slave" in n.cli("INFO", "replication")
            )
            wait_until(linked, timeout_s=30, what="cluster replicas in sync")
            yield Cluster(nodes)
        finally:
            for node in nodes:
                node.kill()


# -- PostgreSQL --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PostgresNode:
    data: Path
    port: int
    user: str | None  # the OS user the server runs as (None: ourselves)

    def url(self, database: str = "postgres", **query: str) -> str:
        suffix = ("?" + "&".join(f"{k}={v}" for k, v in query.items())) if query else ""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}{suffix}"

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _as(self.user, [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args], check=check)

    def start(self) -> None:
        self.pg_ctl("-l", str(self.data / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop", check=False)

    def promote(self) -> None:
        self.pg_ctl("promote")

    def promote_on_its_own(self) -> None:
        """Start this (stopped) node as a standby with no upstream and promote it: a branch of its own, with the next
        timeline number, as a second failover manager or an operator promoting a stale node does (attack-11b T3)."""
        self.stop()
        signal = self.data / "standby.signal"
        signal.touch()
        if self.user is not None:
            _chown(signal, self.user)
        self.start()
        self.promote()


@dataclasses.dataclass
class PostgresPair:
    primary: PostgresNode
    replica: PostgresNode

    def url(self, database: str = "postgres") -> str:
        """A multi-host URL that always reaches whichever node is writable."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.replica.port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: then it runs as the ``postgres`` OS user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and no unprivileged user to run PostgreSQL as")


def _as(user: str | None, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = argv if user is None else ["runuser", "-u", user, "--", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)


@contextlib.contextmanager
def postgres_pair(*, ssl: bool = False, replica: bool = True) -> Iterator[PostgresPair]:
    """A primary (trust auth on loopback, ``wal_level=replica``) and, unless ``replica=False``, a streaming replica.
    With ``ssl``, both serve TLS with the certificates in ``<primary>/certs`` (``certificates``)."""
    user = _server_user()
    scratch = Path(tempfile.mkdtemp(prefix="modcache-pg-"))
    scratch.chmod(0o755)
    if user is not None:
        _chown(scratch, user)
    primary = PostgresNode(scratch / "primary", servers.free_port(), user)
    standby = PostgresNode(scratch / "replica", servers.free_port(), user)
    started: list[PostgresNode] = []
    try:
        _as(
            user,
            [str(PG_BIN / "initdb"), "-D", str(primary.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"],
        )
        settings = [
            f"port = {primary.port}", "listen_addresses = '127.0.0.1'", "unix_socket_directories = ''",
            "wal_level = replica", "max_wal_senders = 5", "hot_standby = on", "fsync = off",
        ]  # fmt: skip
        if ssl:
            certs = certificates(primary.data / "certs", owner=user)
            settings += [
                "ssl = on", f"ssl_cert_file = '{certs.server_cert}'", f"ssl_key_file = '{certs.server_key}'",
                f"ssl_ca_file = '{certs.ca}'",
            ]  # fmt: skip
        _append(primary.data / "postgresql.conf", settings, user)
        _append(primary.data / "pg_hba.conf", ["host replication all 127.0.0.1/32 trust"], user)
        primary.start()
        started.append(primary)
        if replica:
            _as(user, [
                str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                "-D", str(standby.data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
            ])  # fmt: skip
            _append(standby.data / "postgresql.conf", [f"port = {standby.port}"], user)
            standby.start()
            started.append(standby)
        yield PostgresPair(primary, standby)
    finally:
        for node in started:
            node.stop("immediate")
        shutil.rmtree(scratch, ignore_errors=True)


def _append(path: Path, lines: list[str], user: str | None) -> None:
    with path.open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    if user is not None:
        _chown(path, user)


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
