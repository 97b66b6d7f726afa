"""The attack matrix (issue 8): hostile workflow code of organization A, on real services.

Every test runs one attack as an org-A workflow, asserts that the attack failed, then runs a benign execution
of organization B and asserts it succeeds with B's own result (its organization, its decrypted secret, its
parameter). The database and cache attacks run against a private PostgreSQL and a private Redis that require
a password; since attack-8 F1 an execution has an empty network namespace, so not even those are reached (the
shared test services, which trust loopback, neither: test_an_execution_reaches_no_network_service).

=================================================  ===========================================================
attack                                             what stops it
=================================================  ===========================================================
every ancestor's /proc/<pid>/environ|cmdline|mem   own PID namespace and /proc (no ancestor exists), another uid
secret files                                       another uid; private /tmp, /var/tmp, /dev/shm; /root hidden
PostgreSQL with anything found                     nothing to find: no URL, password, key or client in reach
a write to the module cache                        no Redis client or credential; content verified by SHA-256
patching the runtime to spy on the next execution  every execution is a fresh process
forged or garbage result frames                    a channel per execution; FAILED with the reason
setsid() and double-fork escapes                   the PID namespace dies with the execution
memory, CPU (SIGTERM ignored), output, fork bombs  RLIMIT_AS; SIGKILL after the grace; output cap; RLIMIT_NPROC
the executor's control socket (learn, spawn)       socket directory hidden; SO_PEERCRED refuses executions
a malformed control frame                          closes that connection only, never the executor
the executor as a non-root uid                     user namespace maps written right; start-up probe runs one
one shared uid without namespaces                  refused (MODCACHE_EXECUTOR_ALLOW_SHARED_UID to allow)
executions as the consumer's own uid               refused (same switch)
TCP to Redis/PostgreSQL/RabbitMQ on 127.0.0.1      an empty network namespace per execution
SysV IPC left for the next execution               an IPC namespace per execution
nested user namespaces, mount, ptrace, bpf, ...    a seccomp filter per execution (EPERM; clone3: ENOSYS)
i386 int 0x80 or x32 system calls                  the seccomp filter kills the process (SIGSYS)
a kernel that refuses seccomp filters              the executor refuses to start
another root executor's executions on the host     a uid range per executor, locked under /run/modcache/uids
forged result values (NaN, NUL, deep, huge)        re-validated before they are recorded: FAILED, reason
a large module imported once per generation        not taught above 256 KiB; lessons, code cache bounded by bytes
a root socket executor open to any local uid       --consumer-uid required as root; timeout capped per job
=================================================  ===========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pydantic
import pytest
import redis.asyncio as aioredis

from modcache import db, embedded, engine, keys, modules, pgsource, rediscache
from modcache_consumer import executor, protocol, serving
from testkit import servers
from testkit.lifetimes import gone

PASSWORD = f"pw-{uuid.uuid4().hex}"
SECRETS_KEY = "jXf5t0ZAmBKtAMlY0n0C4bqOpTq8bQ2kz9f8sJfQy3A="  # the harness's MODCACHE_SECRETS_KEY

BENIGN = "def run(n, context):\n    return [context.organization['name'], context.get_config('api_token'), n]\n"


@dataclasses.dataclass(frozen=True)
class Orgs:
    a: uuid.UUID
    b: uuid.UUID
    a_token: str
    b_token: str
    benign: uuid.UUID


async def two_orgs(harness: Any, consumer: Any) -> Orgs:
    """Organizations A (the attacker) and B, each with a secret ``api_token`` of its own."""
    a = await consumer.configs.put_organization(f"A-{uuid.uuid4().hex[:6]}")
    b = await consumer.configs.put_organization("B")
    a_token, b_token = f"a-token-{uuid.uuid4().hex}", f"b-token-{uuid.uuid4().hex}"
    await consumer.configs.set_config("api_token", a_token, config_type="secret", organization_id=a)
    await consumer.configs.set_config("api_token", b_token, config_type="secret", organization_id=b)
    return Orgs(a=a, b=b, a_token=a_token, b_token=b_token, benign=await harness.workflow(BENIGN))


async def attack(harness: Any, orgs: Orgs, code: str, params: dict[str, Any] | None = None, **options: Any) -> Any:
    """Run ``code`` as an org-A workflow; then org B's benign execution must get exactly its own result."""
    hostile = await harness.workflow(code, **options)
    reply = await harness.call(hostile, params or {}, organization_id=orgs.a)
    await b_is_unharmed(harness, orgs)
    return reply


async def b_is_unharmed(harness: Any, orgs: Orgs) -> None:
    n = uuid.uuid4().hex
    benign = await harness.call(orgs.benign, {"n": n}, organization_id=orgs.b)
    assert (benign["status"], benign["result"]) == ("SUCCESS", ["B", orgs.b_token, n]), benign["error"]


def secrets_of(settings: Any) -> list[str]:
    """Every secret the consumer holds: its URLs (with passwords), the Fernet key, the password."""
    urls = [settings.required(name) for name in ("database_url", "redis_url", "amqp_url")]
    return [*urls, SECRETS_KEY, PASSWORD]


def assert_no_secret(found: str, settings: Any, orgs: Orgs) -> None:
    for secret in [*secrets_of(settings), orgs.b_token]:
        assert secret not in found


# -- ancestors' /proc ----------------------------------------------------------------------------------------

PROC = """
import os
def run(guesses):
    visible = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
    ancestors, pid = [], os.getpid()
    while pid > 0:
        with open(f'/proc/{pid}/status') as status:
            pid = int(next(l for l in status if l.startswith('PPid:')).split()[1])
        if pid:
            ancestors.append(pid)
    loot, failures = [], {}
    for pid in sorted(set(visible) | set(ancestors) | set(guesses)):
        for name in ('environ', 'cmdline', 'mem'):
            try:
                if name == 'mem':
                    with open(f'/proc/{pid}/maps') as maps:
                        start, end = (int(x, 16) for x in maps.readline().split()[0].split('-'))
                    with open(f'/proc/{pid}/mem', 'rb') as mem:
                        mem.seek(start)
                        loot.append(mem.read(min(end - start, 1 << 16)).decode('latin-1'))
                else:
                    with open(f'/proc/{pid}/{name}', 'rb') as f:
                        loot.append(f.read().decode('latin-1'))
            except OSError as e:
                failures[f'{pid}/{name}'] = type(e).__name__
    text = '\\n'.join(loot).replace(chr(0), ' ')[:200000]
    return {'visible': visible, 'ancestors': ancestors, 'ppid': os.getppid(), 'loot': text, 'failures': failures}
"""


async def test_ancestors_proc_environ_cmdline_and_mem_are_out_of_reach(harness) -> None:
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        guesses = [os.getpid(), consumer.executor.template_pid, 1]  # the consumer's and executor's real pids
        reply = await attack(harness, orgs, PROC, {"guesses": guesses})
    assert reply["status"] == "SUCCESS", reply["error"]
    found = reply["result"]
    assert found["visible"] == [1]  # its own PID namespace: only itself
    assert (found["ancestors"], found["ppid"]) == ([], 0)  # no ancestor exists for it
    assert_no_secret(found["loot"], harness.settings, orgs)
    assert found["failures"][f"{os.getpid()}/environ"] == "FileNotFoundError"


# -- secret files --------------------------------------------------------------------------------------------

FILES = """
def run(paths):
    outcome = {}
    for path in paths:
        try:
            with open(path) as f:
                outcome[path] = f.read().replace(chr(0), ' ')
        except OSError as e:
            outcome[path] = type(e).__name__
    return outcome
"""


async def test_secret_files_cannot_be_read(harness, tmp_path: Path) -> None:
    private = tmp_path / "database-url"  # a Secret file of the consumer's, mode 0600
    private.write_text(harness.settings.required("database_url"))
    private.chmod(0o600)
    shared = Path("/dev/shm") / f"modcache-test-{uuid.uuid4().hex}"  # world-readable, in a shared place
    shared.write_text(PASSWORD)
    shared.chmod(0o644)
    paths = [str(private), str(shared), "/etc/shadow", "/root/.bash_history", "/proc/1/environ"]
    try:
        async with harness.consumer() as consumer:
            orgs = await two_orgs(harness, consumer)
            reply = await attack(harness, orgs, FILES, {"paths": paths})
    finally:
        shared.unlink()
    assert reply["status"] == "SUCCESS", reply["error"]
    found = reply["result"]
    assert found[str(private)] == "FileNotFoundError"  # /tmp is the execution's own
    assert found[str(shared)] == "FileNotFoundError"  # so is /dev/shm
    assert found["/etc/shadow"] == "PermissionError"  # another uid
    assert found["/root/.bash_history"] == "FileNotFoundError"  # /root holds only the interpreter
    assert_no_secret(found["/proc/1/environ"], harness.settings, orgs)  # its own (pid 1), allow-listed


# -- PostgreSQL and Redis with a password ----------------------------------------------------------------------


@pytest.fixture
async def locked(harness: Any, tmp_path: Path, keyspace: keys.KeySpace) -> AsyncIterator[Any]:
    """The harness on a private PostgreSQL and a private Redis that both require ``PASSWORD``."""
    data = tmp_path / "pg" / "data"
    server = await asyncio.to_thread(embedded.start_postgres, data, port=embedded.free_port())
    trusted = server.url
    conn = await asyncpg.connect(trusted)
    await conn.execute(f"ALTER ROLE postgres PASSWORD '{PASSWORD}'")
    (data / "pg_hba.conf").write_text("local all all scram-sha-256\nhost all all 0.0.0.0/0 scram-sha-256\n")
    await conn.execute("SELECT pg_reload_conf()")
    await conn.close()
    pg_url = trusted.replace("postgres@", f"postgres:{PASSWORD}@")
    await db.upgrade(pg_url)
    with servers.private_redis("--requirepass", PASSWORD) as private:
        redis_url = private.url.replace("redis://", f"redis://:{PASSWORD}@")
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        source = pgsource.PgSource(engine=db.make_engine(pg_url))
        cache = rediscache.RedisCache.from_url(redis_url, keyspace=keyspace)
        update = {"database_url": pydantic.SecretStr(pg_url), "redis_url": pydantic.SecretStr(redis_url)}
        settings = harness.settings.model_copy(update=update)
        on_locked = type(harness)(
            settings=settings,
            database_url=pg_url,
            source=source,
            sync_engine=engine.Engine(source=source, cache=cache),
            redis_client=client,
        )
        on_locked.ports = {"postgres": int(trusted.rsplit(":", 1)[1].split("/")[0]), "redis": private.port}
        try:
            yield on_locked
        finally:
            await on_locked.close()
            await source.close()
            await cache.close()
            await client.aclose()
            await asyncio.to_thread(server.stop)


SEARCH = r"""
import gc, os, re, sys
PATTERN = re.compile(r'(?:postgres(?:ql)?|rediss?|amqps?)://[^\s\x00"\']+')

def _read(path, limit=1 << 20):
    try:
        with open(path, 'rb') as f:
            return f.read(limit).decode('latin-1')
    except OSError:
        return ''

def candidates():
    texts = [repr(dict(os.environ)), ' '.join(sys.argv)]
    for pid in (p for p in os.listdir('/proc') if p.isdigit()):
        texts += [_read(f'/proc/{pid}/environ'), _read(f'/proc/{pid}/cmdline')]
    for fd in os.listdir('/proc/self/fd'):
        try:
            texts.append(os.readlink(f'/proc/self/fd/{fd}'))
        except OSError:
            pass
    with open('/proc/self/maps') as maps:
        mapped = {line.split()[-1] for line in maps if '/' in line}
    texts += [_read(path, 1 << 16) for path in mapped if not path.endswith('.so') and '.so.' not in path]
    texts += [o for o in gc.get_objects() if isinstance(o, str)]
    for o in gc.get_objects():
        if isinstance(o, dict):
            texts += [v for v in o.values() if isinstance(v, str)]
    return sorted({m for text in texts for m in PATTERN.findall(text)})
"""

DATABASE = (
    SEARCH
    + """
import asyncio, asyncpg
async def _try(urls):
    outcome = {}
    for url in urls:
        try:
            conn = await asyncpg.connect(url, timeout=5)
        except Exception as e:
            outcome[url] = type(e).__name__
        else:
            outcome[url] = 'connected'
            await conn.close()
    return outcome

def run(port):
    found = candidates()
    guesses = [f'postgresql://postgres@127.0.0.1:{port}/postgres', f'postgresql://root@127.0.0.1:{port}/postgres']
    # every URL found that points at this PostgreSQL (others, e.g. docstrings' localhost, are not the platform's)
    outcome = asyncio.run(_try([u for u in found if u.startswith('postgres') and f':{port}' in u] + guesses))
    return {'found': found, 'outcome': outcome, 'guesses': guesses,
            'clients': sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'asyncpg', 'redis', 'aio_pika'})}
"""
)


async def test_no_database_connection_with_anything_found(locked) -> None:
    async with locked.consumer() as consumer:
        orgs = await two_orgs(locked, consumer)
        reply = await attack(locked, orgs, DATABASE, {"port": locked.ports["postgres"]})
    assert reply["status"] == "SUCCESS", reply["error"]
    found = reply["result"]
    assert "connected" not in found["outcome"].values()
    assert [found["outcome"][g] for g in found["guesses"]] == ["OSError"] * 2  # no network: not even reached
    assert_no_secret(repr(found["found"]), locked.settings, orgs)
    assert found["clients"] == ["asyncpg"]  # only what the attacker imported itself


CACHE = (
    SEARCH
    + """
PRELOADED = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'valkey', 'aioredis'))  # before ours
import redis
def run(port, key):
    found = candidates()
    guess = f'redis://127.0.0.1:{port}/0'
    outcome = {}
    for url in [u for u in found if u.startswith('redis') and f':{port}' in u] + [guess]:
        try:
            redis.Redis.from_url(url, socket_timeout=5).set(key, 'pwned')
            outcome[url] = 'written'
        except Exception as e:
            outcome[url] = type(e).__name__
    return {'found': found, 'outcome': outcome, 'guess': guess, 'preloaded': PRELOADED}
"""
)


async def test_the_module_cache_cannot_be_written(locked) -> None:
    await locked.module("shared/rates.py", "RATE = 3\n")
    await locked.converge()
    key = locked.keyspace.content("shared/rates.py")
    before = await locked.redis.get(key)
    async with locked.consumer() as consumer:
        orgs = await two_orgs(locked, consumer)
        reply = await attack(locked, orgs, CACHE, {"port": locked.ports["redis"], "key": key})
        reader = await locked.workflow("from shared.rates import RATE\ndef run():\n    return RATE\n")
        after = await locked.call(reader, organization_id=orgs.b)
    assert reply["status"] == "SUCCESS", reply["error"]
    found = reply["result"]
    assert "written" not in found["outcome"].values()
    assert found["outcome"][found["guess"]] == "ConnectionError"  # no network (and no credential anywhere)
    assert found["preloaded"] == []  # no Redis client library, let alone a client, in the execution
    assert await locked.redis.get(key) == before
    assert (after["status"], after["result"]) == ("SUCCESS", 3)
    assert_no_secret(repr(found["found"]), locked.settings, orgs)


# -- spying on the next execution ------------------------------------------------------------------------------

SPY = """
import builtins, os, threading, time
import modcache_consumer.runtime as runtime
import modcache_consumer.protocol as protocol
LOOT = []
def run(marker):
    real = runtime.Runner.run
    def spy(self, job):
        LOOT.append(job)
        return real(self, job)
    runtime.Runner.run = spy
    real_ask = protocol.Channel.ask
    protocol.Channel.ask = lambda self, request: LOOT.append(request) or real_ask(self, request)
    builtins.spied = LOOT
    for place in ('/tmp', '/dev/shm', '/var/tmp'):
        with open(f'{place}/{marker}', 'w') as f:
            f.write('waiting for the next execution')
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    return 'patched'
"""

LOOK = """
import builtins, os
import modcache_consumer.runtime as runtime
def run(marker):
    left = [p for p in ('/tmp', '/dev/shm', '/var/tmp') if os.path.exists(f'{p}/{marker}')]
    return {'left': left, 'spied': hasattr(builtins, 'spied'), 'patched': runtime.Runner.run.__name__ != 'run'}
"""


async def test_patching_the_runtime_cannot_spy_on_the_next_execution(harness) -> None:
    marker = f"spy-{uuid.uuid4().hex}"
    async with harness.consumer(consumer_concurrency=1) as consumer:  # one at a time: reuse would happen here
        orgs = await two_orgs(harness, consumer)
        hostile = await attack(harness, orgs, SPY, {"marker": marker})
        look = await harness.call(await harness.workflow(LOOK), {"marker": marker}, organization_id=orgs.a)
    assert hostile["status"] == "SUCCESS", hostile["error"]
    assert look["result"] == {"left": [], "spied": False, "patched": False}


# -- forged frames ---------------------------------------------------------------------------------------------

FORGE = """
import json, os, socket, struct, stat
def _channel():
    for fd in map(int, os.listdir('/proc/self/fd')):
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            return socket.socket(fileno=os.dup(fd))
def run(how):
    sock = _channel()
    if how == 'second result':
        body = json.dumps({'op': 'result', 'status': 'SUCCESS', 'result': 'forged', 'error': None,
                           'timings_ms': {}}).encode()
        sock.sendall(struct.pack('>I', len(body)) + body)
    elif how == 'garbage':
        sock.sendall(struct.pack('>I', 5) + b'\\x80\\x81{[(')
    elif how == 'oversized':
        sock.sendall(struct.pack('>I', 2 ** 31) + b'x' * 100)
    elif how == 'unknown op':
        body = json.dumps({'op': 'exited', 'ticket': 1, 'returncode': 0}).encode()
        sock.sendall(struct.pack('>I', len(body)) + body)
    return 'real'
"""


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("second result", "sent a 'result' frame after its result (a forged frame?)"),
        ("garbage", "undecodable frame: UnicodeDecodeError"),
        ("oversized", "frame of 2147483648 bytes exceeds 1114112"),
        ("unknown op", "an unknown 'exited' frame"),
    ],
)
async def test_a_forged_result_frame_fails_only_its_own_execution(harness, how: str, reason: str) -> None:
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, FORGE, {"how": how})
    assert reply["status"] == "FAILED"
    assert reply["error"].endswith(f"broke the protocol: {reason}")
    assert reply["result"] is None


# -- escapes ---------------------------------------------------------------------------------------------------

ESCAPE = """
import os, time
def _spawn_sleeper(seconds, double):
    if os.fork() == 0:
        if double:
            if os.fork() != 0:
                os._exit(0)  # the middle process exits: the sleeper is orphaned
        else:
            os.setsid()
        os.execvp('sleep', ['sleep', seconds])
def _cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline') as f:
            return f.read()
    except OSError:
        return ''
def run(seconds, end):
    _spawn_sleeper(seconds, double=False)
    _spawn_sleeper(seconds, double=True)
    while sum(1 for p in os.listdir('/proc') if p.isdigit() and seconds in _cmdline(p)) < 2:
        time.sleep(0.01)
    if end == 'crash':
        os._exit(9)
    if end == 'timeout':
        time.sleep(3600)
    return 'escaped?'
"""


def sleepers(seconds: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if process.info["cmdline"] == ["sleep", seconds] and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


@pytest.mark.parametrize(("end", "status"), [("success", "SUCCESS"), ("crash", "FAILED"), ("timeout", "TIMEOUT")])
async def test_setsid_and_double_forked_children_die_with_their_execution(harness, end: str, status: str) -> None:
    seconds = f"{3000 + time.time() % 600:.6f}"  # a unique command line to find them by
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, ESCAPE, {"seconds": seconds, "end": end}, timeout_seconds=2)
    assert reply["status"] == status, reply["error"]
    for pid in sleepers(seconds):  # the kernel may still be tearing them down
        assert await gone(pid), f"process {pid} outlived its execution"
    assert sleepers(seconds) == []


# -- bombs -----------------------------------------------------------------------------------------------------


async def test_a_memory_bomb_is_bounded(harness) -> None:
    bomb = "def run():\n    hoard = []\n    while True:\n        hoard.append(bytearray(64 * 1024 ** 2))\n"
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, bomb)
    assert reply["status"] == "FAILED"
    assert reply["error"].startswith("MemoryError")


async def test_a_cpu_loop_ignoring_sigterm_is_killed(harness) -> None:
    loop = (
        "import signal\ndef run():\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    while True:\n        pass\n"
    )
    async with harness.consumer(terminate_grace_s=0.5) as consumer:
        orgs = await two_orgs(harness, consumer)
        started = time.monotonic()
        reply = await attack(harness, orgs, loop, timeout_seconds=1)
    assert reply["status"] == "TIMEOUT"
    assert reply["error"].startswith("the execution exceeded its 1 s timeout")
    assert time.monotonic() - started < 20


async def test_an_output_flood_is_capped(harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modcache_consumer.executor")
    flood = "def run():\n    for _ in range(200_000):\n        print('x' * 99)\n    return 'flooded'\n"
    async with harness.consumer(max_output_bytes=64 * 1024) as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, flood)
    assert (reply["status"], reply["result"]) == ("SUCCESS", "flooded")  # 20 MB written, none of it stalled
    logged = [r.message for r in caplog.records if r.message.startswith("execution ") and r.message.endswith("x")]
    assert 0 < sum(len(m) for m in logged) <= 64 * 1024 + 100 * len(logged)
    assert any(r.message.endswith("output beyond 65536 bytes discarded") for r in caplog.records)


FORK_BOMB = """
import os, time
def run():
    children = 0
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            if os.fork() == 0:
                time.sleep(3600)
                os._exit(0)
            children += 1
        except OSError:
            break
    return children
"""


async def test_a_fork_bomb_is_bounded(harness) -> None:
    async with harness.consumer(execution_max_processes=32) as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, FORK_BOMB, timeout_seconds=10)
    assert reply["status"] == "SUCCESS", reply["error"]
    assert reply["result"] < 32  # RLIMIT_NPROC of the execution's own uid


# -- the executor's control socket (attack-8 F3, F10) ---------------------------------------------------------

LAUNCH_AS = """
import os, sys
from modcache_consumer import runtime, sandbox
uid = int(sys.argv[1])
if uid:  # what the chart's executor container is: another uid; /root (mode 700) hidden but the interpreter
    sandbox.hide_private_trees(sandbox.needed_trees([os.path.dirname(os.path.dirname(runtime.__file__))]))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@contextlib.asynccontextmanager
async def socket_executor(
    *args: str, uid: int = 0, pid_namespace: bool = False
) -> AsyncIterator[tuple[Path, asyncio.subprocess.Process]]:
    """``modcache executor --socket`` in a directory of /run (not one of the executions' scratch mounts), as
    ``uid`` (in a PID namespace of its own, as in a container, with ``pid_namespace``); yields the socket path
    and the process."""
    directory = Path("/run") / f"modcache-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(directory, 0o755)
    os.chown(directory, uid, uid)
    path = directory / "executor.sock"
    container = ["unshare", "--pid", "--fork", "--mount-proc"] if pid_namespace else []
    if uid == 0 and "--consumer-uid" not in args:
        args = (*args, "--consumer-uid", "0")  # a root executor on a socket requires it (attack-8c C2)
    process = await asyncio.create_subprocess_exec(
        *container, sys.executable, "-c", LAUNCH_AS, str(uid), "-m", "modcache_consumer.template",
        "--socket", str(path), *args,
    )  # fmt: skip
    try:
        yield path, process
    finally:
        with contextlib.suppress(psutil.Error):  # unshare(1) forwards no signal; its child changed uid
            for child in psutil.Process(process.pid).children(recursive=True) if pid_namespace else ():
                child.terminate()
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        shutil.rmtree(directory, ignore_errors=True)


CONTROL = """
import json, os, socket, struct

def _frame(op):
    body = json.dumps(op).encode()
    return struct.pack('>I', len(body)) + body

def run(paths):
    outcome = {}
    for path in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            hello = s.recv(65536)
            if hello:  # the template's hello: it would obey
                s.sendall(_frame({'op': 'learn', 'generation': 1 << 60, 'lookups': []}) + _frame({'op': 'spawn'}))
            outcome[path] = 'read ' + repr(hello[:40])
        except OSError as e:
            outcome[path] = type(e).__name__
        finally:
            s.close()
    return outcome
"""


async def test_an_execution_cannot_reach_or_control_its_executor(harness) -> None:
    """F3: the socket directory is hidden in executions; and when an execution reaches the socket anyway
    (here a hard link outside that directory), the executor refuses it (SO_PEERCRED: one of its own
    executions), so no ``learn`` or ``spawn`` frame of it is ever read."""
    async with socket_executor() as (path, process), harness.consumer(executor_socket=str(path)) as consumer:
        orgs = await two_orgs(harness, consumer)
        linked = Path(f"{path.parent}-link")
        os.mkdir(linked, 0o755)
        try:
            os.link(path, linked / "executor.sock")
            reply = await attack(harness, orgs, CONTROL, {"paths": [str(path), str(linked / "executor.sock")]})
        finally:
            shutil.rmtree(linked)
        assert process.returncode is None
    assert reply["status"] == "SUCCESS", reply["error"]
    assert reply["result"] == {str(path): "FileNotFoundError", str(linked / "executor.sock"): "read b''"}


async def test_a_malformed_control_frame_closes_its_connection_not_the_executor(harness) -> None:
    """F10: ``{"op": "spawn"}``, a ``run`` without its ticket, an unknown op: that connection is closed, the
    executor and the consumer's own connection carry on."""
    async with socket_executor() as (path, process), harness.consumer(executor_socket=str(path)) as consumer:
        orgs = await two_orgs(harness, consumer)
        for bad in (
            {"op": "spawn"},
            {"op": "run", "pid": 1},
            {"op": "learn"},
            {"op": "stop", "ticket": []},
            {"op": "run", "pid": 1, "ticket": 1, "timeout_s": "nan", "grace_s": 1},
        ):
            reader, writer = await asyncio.open_unix_connection(str(path))
            hello = await reader.readexactly(4)
            await reader.readexactly(int.from_bytes(hello, "big"))
            writer.write(protocol.encode(bad))
            await writer.drain()
            while await reader.read(1 << 16):  # spares offered to it, then the close
                pass
            writer.close()
        assert process.returncode is None
        await b_is_unharmed(harness, orgs)


# -- the executor as a non-root uid: the chart's layout (attack-8 F4, F5, F6) ---------------------------------

EXECUTOR_UID = 54_321  # owns nothing on this machine


async def test_a_non_root_executor_runs_executions_in_a_user_namespace(harness) -> None:
    """F4: the uid maps are written from the uid read before the clone, while dumpable; the consumer's start-up
    probe ran a real execution through it. Org A's and org B's executions then run with their own results."""
    async with socket_executor(uid=EXECUTOR_UID) as (path, _), harness.consumer(executor_socket=str(path)) as consumer:
        assert consumer.executor.isolation == (
            "PID+mount+network+IPC namespaces in a user namespace, uid 54321, seccomp filter"
        )
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, "import os\ndef run():\n    return os.getuid()\n")
    assert (reply["status"], reply["result"]) == ("SUCCESS", 0), reply["error"]  # root of its user namespace only


async def test_the_charts_layout_an_executor_in_a_pid_namespace_of_its_own_serves_its_consumer(harness) -> None:
    """attack-8b A9: the chart's consumer is in another PID namespace than its executor, so SO_PEERCRED shows
    it as pid 0; that is no execution of the executor (those are all visible to it), and the uid check decides."""
    async with (
        socket_executor("--consumer-uid", "0", uid=EXECUTOR_UID, pid_namespace=True) as (path, process),
        harness.consumer(executor_socket=str(path)) as consumer,
    ):
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, "def run():\n    return 'in the chart'\n")
        assert process.returncode is None
    assert (reply["status"], reply["result"]) == ("SUCCESS", "in the chart"), reply["error"]


async def test_a_shared_uid_without_namespaces_is_refused(harness) -> None:
    """F5: executions that would all be one uid with no PID namespace (each could read another's memory) are
    refused by the executor itself and, if it was told to allow them, by the consumer."""
    async with socket_executor("--no-namespaces", uid=EXECUTOR_UID) as (_, process):
        assert await process.wait() == 78
    async with socket_executor("--no-namespaces", "--allow-shared-uid", uid=EXECUTOR_UID) as (path, _):
        with pytest.raises(executor.ExecutorUnavailable, match="no namespaces: each could read the others' memory"):
            async with harness.consumer(executor_socket=str(path)):
                pass


AS_CONSUMER = """
import asyncio
from modcache_consumer import executor

async def main():
    the_executor = executor.Executor(socket_path=%r, start_timeout_s=20)
    try:
        await the_executor.start()
        print('started')
    except executor.ExecutorUnavailable as e:
        print(e)
    finally:
        await the_executor.close()

asyncio.run(main())
"""


async def test_executions_as_the_consumers_own_uid_are_refused() -> None:
    """F6: a consumer whose executions would run as its own uid (a non-root laptop) refuses to start: they
    could read its secret files and rewrite its code."""
    async with socket_executor(uid=EXECUTOR_UID) as (path, _):
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LAUNCH_AS, str(EXECUTOR_UID), "-c", AS_CONSUMER % str(path),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        said, _ = await consumer.communicate()
    assert said.decode().startswith("executions would run as this consumer's own uid 54321"), said


# -- the host's network and SysV IPC (attack-8 F1, F7) ---------------------------------------------------------

NETWORK = """
import socket

def run(ports):
    outcome = {}
    for port in ports:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=3).close()
            outcome[str(port)] = 'connected'
        except OSError as e:
            outcome[str(port)] = type(e).__name__
    return outcome
"""


async def test_an_execution_reaches_no_network_service(harness) -> None:
    """F1: Redis, PostgreSQL, RabbitMQ (and this test's own, unauthenticated ones) on 127.0.0.1 are out of
    reach: each execution has an empty network namespace (a loopback that is down)."""
    ports = sorted(
        {6379, 5432, 5672}
        | {urllib.parse.urlsplit(harness.settings.required(url)).port or 0 for url in ("redis_url", "database_url")}
    )
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, NETWORK, {"ports": ports})
    assert reply["status"] == "SUCCESS", reply["error"]
    assert set(reply["result"].values()) == {"OSError"}, reply["result"]  # ENETUNREACH: not even refused


SYSV = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)

def run(mode):
    if mode == 'plant':  # a world-readable SysV segment, the way attack-8 left one for the next execution
        return libc.shmget(0xa8a8, 4096, 0o1000 | 0o666) >= 0
    with open('/proc/sysvipc/shm') as f:
        return [line.split()[0] for line in f.readlines()[1:]]
"""


async def test_sysv_ipc_left_behind_is_not_seen_by_the_next_execution(harness) -> None:
    """F7: each execution has its own IPC namespace; what one creates is gone with it."""
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        planted = await attack(harness, orgs, SYSV, {"mode": "plant"})
        look = await harness.workflow(SYSV)
        seen = await harness.call(look, {"mode": "look"}, organization_id=orgs.b)
    assert (planted["status"], planted["result"]) == ("SUCCESS", True), planted["error"]
    assert (seen["status"], seen["result"]) == ("SUCCESS", []), seen["error"]


async def test_the_host_network_is_an_explicit_choice(harness) -> None:
    """MODCACHE_EXECUTION_NETWORK=host (workflows that call APIs) gives the executor's network back: the same
    workflow then reaches the test PostgreSQL's port."""
    port = urllib.parse.urlsplit(harness.settings.required("database_url")).port or 5432
    async with harness.consumer(execution_network="host") as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, NETWORK, {"ports": [port]})
    assert (reply["status"], reply["result"]) == ("SUCCESS", {str(port): "connected"}), reply["error"]


# -- system calls no workflow needs (attack-8 F9a) --------------------------------------------------------------

SYSCALLS = """
import ctypes, errno, multiprocessing, os, subprocess, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    args = [ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_long(a) for a in args]
    result = libc.syscall(nr, *args)
    if result == 0 and nr == 56:  # a clone that worked: this is the child
        os._exit(0)
    return 'ok' if result >= 0 else errno.errorcode[ctypes.get_errno()]

def persona(value):
    return 'ok' if libc.personality(value) >= 0 else errno.errorcode[ctypes.get_errno()]

def run():
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    buffer = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), 8)
    ns = os.open('/proc/self/ns/net', os.O_RDONLY)
    tried = {
        'unshare(CLONE_NEWUSER)': call(272, 0x10000000),
        'unshare(CLONE_NEWNS)': call(272, 0x20000),
        'clone(CLONE_NEWUSER)': call(56, 0x10000000 | 17, 0, 0, 0, 0),
        'clone(CLONE_NEWNET|CLONE_NEWPID)': call(56, 0x60000000 | 17, 0, 0, 0, 0),
        'clone3': call(435, 0, 0),
        'setns': call(308, ns, 0),
        'mount': call(165, b'none', b'/tmp', b'tmpfs', 0, 0),
        'umount2': call(166, b'/proc', 2),
        'pivot_root': call(155, b'/tmp', b'/tmp'),
        'ptrace(PTRACE_ATTACH)': call(101, 16, child, 0, 0),
        'process_vm_readv': call(310, child, ctypes.addressof(local), 1, ctypes.addressof(local), 1, 0),
        'keyctl': call(250, 0, -3, 1),
        'add_key': call(248, b'user', b'k', b'v', 1, -3),
        'request_key': call(249, b'user', b'k', 0, 0),
        'bpf': call(321, 0, 0, 0),
        'perf_event_open': call(298, 0, 0, -1, -1, 0),
        'userfaultfd': call(323, 0),
        'kexec_load': call(246, 0, 0, 0, 0),
        'init_module': call(175, 0, 0, b''),
        'finit_module': call(313, ns, b'', 0),
        'open_by_handle_at': call(304, ns, 0, 0),
        'io_uring_setup': call(425, 1, ctypes.addressof(ctypes.create_string_buffer(120))),
        'personality(ADDR_NO_RANDOMIZE)': persona(0x0040000),
        'personality(query)': persona(0xffffffff),
    }
    os.kill(child, 9)
    os.waitpid(child, 0)
    nested = subprocess.run(['unshare', '--user', '--map-root-user', 'id', '-u'], capture_output=True, text=True)
    threads = []
    thread = threading.Thread(target=lambda: threads.append('thread ran'))
    thread.start()
    thread.join()
    with multiprocessing.get_context('fork').Pool(2) as pool:
        squares = pool.map(abs, [-2, -3])
    works = {
        'subprocess': subprocess.run(['true']).returncode,
        'shell': subprocess.run(['sh', '-c', 'echo $((6 * 7))'], capture_output=True, text=True).stdout.strip(),
        'threads': threads,
        'multiprocessing': squares,
    }
    return {'tried': tried, 'nested': [nested.returncode, nested.stdout.strip()], 'works': works}
"""


async def test_nested_namespaces_and_dangerous_system_calls_are_refused(harness) -> None:
    """F9a: a seccomp filter, installed just before the job runs, refuses every namespace, mount, ptrace,
    keyring, eBPF, perf, userfaultfd, io_uring, kexec and module call (EPERM; clone3 ENOSYS, so glibc falls back
    to clone, which the filter can inspect); fork, threads, subprocess and multiprocessing keep working."""
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, SYSCALLS, timeout_seconds=30)
    assert reply["status"] == "SUCCESS", reply["error"]
    tried = reply["result"]["tried"]
    assert tried.pop("clone3") == "ENOSYS"
    assert tried.pop("personality(query)") == "ok"
    assert tried == dict.fromkeys(tried, "EPERM"), tried
    assert reply["result"]["nested"][0] != 0  # unshare(1) cannot make a user namespace: no capability anywhere
    assert reply["result"]["works"] == {
        "subprocess": 0,
        "shell": "42",
        "threads": ["thread ran"],
        "multiprocessing": [2, 3],
    }


FOREIGN_ABI = """
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def run(abi):
    if abi == 'i386':  # int 0x80 from a 64-bit process: i386 numbers (20 = getpid there; 26 = ptrace)
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(bytes.fromhex('b8 14 00 00 00 cd 80 c3'))  # mov eax, 20; int 0x80; ret
        code = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        return code()
    return libc.syscall(0x40000000 | 39)  # x32 getpid
"""


@pytest.mark.parametrize("abi", ["i386", "x32"])
async def test_system_calls_of_another_abi_kill_the_execution(harness, abi: str) -> None:
    """F9a: system-call numbers of another ABI (i386 ``int 0x80``, x32) name other calls than the filter's
    rules, so the filter kills the process (SIGSYS) instead of judging them: FAILED with that reason."""
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, FOREIGN_ABI, {"abi": abi})
    assert reply["status"] == "FAILED"
    assert reply["error"].endswith("was killed by SIGSYS during the execution"), reply["error"]


NO_SECCOMP = """
import errno, os, sys
from modcache_consumer import sandbox
# what a kernel without CONFIG_SECCOMP_FILTER answers: prctl(PR_SET_SECCOMP) and seccomp(2) fail with EINVAL
sandbox.install_filter(sandbox.assemble([
    (0x20, 0, None, None),
    (0x15, 317, "refuse", None),
    (0x15, 157, "prctl", None),
    (0x06, 0x7FFF0000, None, None),
    "prctl",
    (0x20, 16, None, None),
    (0x15, 22, "refuse", None),
    (0x06, 0x7FFF0000, None, None),
    "refuse",
    (0x06, 0x00050000 | errno.EINVAL, None, None),
]))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


async def test_an_executor_whose_kernel_refuses_seccomp_does_not_start(tmp_path: Path) -> None:
    """F9a: where executions cannot be filtered, the executor says so at start-up and exits 78 instead of
    running them unfiltered (as it does without namespaces)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", NO_SECCOMP, "-m", "modcache_consumer.template", "--socket", str(tmp_path / "x.sock"),
        "--consumer-uid", "0", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, said = await process.communicate()
    assert process.returncode == 78, said
    assert "executions cannot be given their system-call filter here (the kernel refused a seccomp filter" in (
        said.decode()
    )


async def test_a_consumer_refuses_an_executor_that_filters_nothing(tmp_path: Path) -> None:
    """F9a, the consumer's side: an executor whose hello does not say its executions are filtered (another
    version, or one that lies) is refused at start, as one without namespaces is."""

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(protocol.encode({"op": "hello", "pid": 1, "isolation": "PID+mount namespaces, uid 1+slot",
                                      "namespaces": True, "execution_uid": None}))  # fmt: skip
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(hello, path=str(tmp_path / "executor.sock"))
    async with server:
        the_executor = executor.Executor(socket_path=str(tmp_path / "executor.sock"), start_timeout_s=5)
        with pytest.raises(executor.ExecutorUnavailable, match="gives its executions no seccomp filter"):
            await the_executor.start()
        await the_executor.close()


# -- forged result values (attack-8 F9b) ------------------------------------------------------------------------

FORGED_VALUE = """
import json, os, socket, stat, struct

def _channel():
    for fd in map(int, os.listdir('/proc/self/fd')):
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            return socket.socket(fileno=os.dup(fd))

def _frame(kind):
    result, error, status = None, None, 'SUCCESS'
    if kind == 'long error':
        error, status = 'x' * 200_000, 'FAILED'
    elif kind == 'deep':
        result = '[' * 200 + ']' * 200
    elif kind == 'digits':
        result = 10 ** 150
    elif kind == 'too large':  # under the frame's limit, over the result's
        result = 'x' * (1024 ** 2 + 1000)
    body = json.dumps({'op': 'result', 'status': status, 'result': result, 'error': error, 'timings_ms': {}})
    if kind == 'deep':
        body = body.replace(json.dumps(result), result)
    literals = {'NaN': 'NaN', 'Infinity': '-Infinity', '1e999': '[1e999]', 'NUL': '"a\\\\u0000b"',
                'surrogate': '{"k": "\\\\ud800"}', 'NUL error': None}
    if kind in literals and literals[kind]:
        body = body.replace('"result": null', '"result": ' + literals[kind])
    if kind == 'NUL error':
        body = body.replace('"error": null', '"error": "boom\\\\u0000"').replace('SUCCESS', 'FAILED')
    return body.encode()

def run(kind):
    body = _frame(kind)
    sock = _channel()
    sock.sendall(struct.pack('>I', len(body)) + body)  # the one result of this execution, forged
    sock.shutdown(socket.SHUT_WR)
    os._exit(0)
"""


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("NaN", "the result holds NaN, which is not JSON and which PostgreSQL cannot store"),
        ("Infinity", "the result holds -Infinity, which is not JSON and which PostgreSQL cannot store"),
        ("1e999", "the result holds Infinity, which is not JSON and which PostgreSQL cannot store"),
        ("NUL", "the result holds a NUL character (\\u0000), which PostgreSQL cannot store"),
        ("surrogate", "the result holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode"),
        ("long error", "its error is 200000 characters, over 4000"),
        ("deep", "the result nests arrays/objects deeper than 32 levels (MODCACHE_MAX_MESSAGE_DEPTH)"),
        ("digits", "the result holds a number of more than 100 digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)"),
        ("too large", "the result is 1049578 bytes, over the 1048576-byte limit (MODCACHE_MAX_RESULT_BYTES)"),
    ],
)
async def test_a_forged_result_value_fails_only_its_own_execution(harness, kind: str, reason: str) -> None:
    """F9b: a well-formed result frame whose value PostgreSQL or a reply cannot carry (written by workflow code
    on its own channel, past the runtime's checks) makes only that execution FAILED with the reason; what was
    forged reaches neither the database nor the reply, and the consumer carries on."""
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        hostile = await harness.workflow(FORGED_VALUE)
        request = harness.request(hostile, {"kind": kind}, organization_id=orgs.a)
        caller = await harness.caller()
        await caller.publish(request)
        reply = await caller.result(request.execution_id, timeout_s=60)
        await b_is_unharmed(harness, orgs)
    assert (reply["status"], reply["result"]) == ("FAILED", None)
    assert reply["error"].endswith(f"sent a result that cannot be recorded: {reason}"), reply["error"]
    row = await harness.execution(request.execution_id)
    assert row is not None
    assert (row["status"], row["result"], row["error"]) == ("FAILED", None, reply["error"])


# -- two root executors on one host (attack-8 F7) ---------------------------------------------------------------

HOARD = """
import os, time
def run(seconds):
    children = 0
    while True:
        try:
            pid = os.fork()
        except OSError:  # RLIMIT_NPROC of this execution's uid
            break
        if pid == 0:
            time.sleep(seconds)
            os._exit(0)
        children += 1
    time.sleep(seconds)
    return [os.getuid(), children]
"""
FORKS = "import os, subprocess\ndef run(n):\n    return [os.getuid(), subprocess.run(['true']).returncode, n]\n"


def _others_clones(the_executor: executor.Executor) -> int:
    """The template's clones under an execution uid that are neither this consumer's spares nor its executions
    (the start-up probe ending, or a fresh spare on its way, at most; a squatter's clones otherwise)."""
    ours = the_executor.spare_pids | the_executor.running_pids
    count = 0
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(the_executor.template_pid).children():
            with contextlib.suppress(psutil.Error):
                count += process.uids().real != 0 and process.pid not in ours
    return count


def _execution_processes(the_executor: executor.Executor) -> int:
    """Processes of the executions running now, theirs and their descendants (not the spares waiting for a job)."""
    count = 0
    for pid in the_executor.running_pids:
        with contextlib.suppress(psutil.Error):
            count += 1 + len(psutil.Process(pid).children(recursive=True))
    return count


async def test_two_root_executors_on_one_host_never_share_execution_uids(executors) -> None:
    """F7: two executors started at once claim disjoint uid ranges (a lock per range under /run/modcache/uids),
    so one consumer's execution that takes every process its uid may have leaves another consumer's execution
    its own: that one still forks, as a uid of another range."""
    a, b = await asyncio.gather(executors.start(processes=16), executors.start(processes=16))
    hoard = asyncio.create_task(executors.run(a, HOARD, {"seconds": 6}))
    deadline = time.monotonic() + 20
    while _execution_processes(a) < 16 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # the hoarder's forks, seen from outside: nothing to await
    n = uuid.uuid4().hex
    benign = await executors.run(b, FORKS, {"n": n})
    hoarded = await hoard
    assert (hoarded.status, hoarded.result[1]) == ("SUCCESS", 15), hoarded.error  # the execution + 15 = 16
    assert (benign.status, benign.result[1:]) == ("SUCCESS", [0, n]), benign.error
    assert hoarded.result[0] // 4096 != benign.result[0] // 4096  # disjoint ranges of 4096 uids


async def test_an_explicit_uid_base_is_locked_too_and_a_clash_is_a_start_up_error(executors) -> None:
    """F7: MODCACHE_EXECUTION_UID_BASE is honoured and its range locked; a second executor whose range overlaps
    it does not start, and says which setting to change."""
    base = 5_000_000 + 4096 * random.randrange(1000)
    first = await executors.start(uid_base=base)
    outcome = await executors.run(first, "import os\ndef run():\n    return os.getuid()\n")
    assert outcome.status == "SUCCESS", outcome.error
    assert base <= outcome.result < base + 4096
    with pytest.raises(executor.ExecutorUnavailable, match=f"MODCACHE_EXECUTION_UID_BASE={base + 100}: execution"):
        await executors.start(uid_base=base + 100)
    again = await executors.run(first, "import os\ndef run():\n    return os.getuid()\n")
    assert again.status == "SUCCESS", again.error


# -- what the template learns (attack-8b A1, A2) ----------------------------------------------------------------

SLOW = "import time\ndef run(n, context):\n    time.sleep(3)\n    return [context.organization['name'], n]\n"
IMPORTS = """
def run(names):
    outcome = {}
    for name in names:
        try:
            __import__(name)
            outcome[name] = 'imported'
        except BaseException as e:
            outcome[name] = type(e).__name__
    return outcome
"""


async def test_a_module_that_does_not_compile_harms_no_other_execution(harness) -> None:
    """A1: a workspace module with a typo, and one whose compile raises RecursionError, imported by org A: the
    template learns them after A's execution without closing a connection or dying, so org B's execution in
    flight meanwhile finishes with its own result, and the next one runs."""
    await harness.module("typo.py", "def oops(:\n    pass\n")
    await harness.module("deep.py", "x = " + "+".join(["1"] * 16_000) + "\n")  # RecursionError in compile()
    await harness.converge()
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        slow = await harness.workflow(SLOW)
        n = uuid.uuid4().hex
        in_flight = asyncio.create_task(harness.call(slow, {"n": n}, organization_id=orgs.b))
        reply = await attack(harness, orgs, IMPORTS, {"names": ["typo", "deep"]})
        victim = await in_flight
        again = await attack(harness, orgs, IMPORTS, {"names": ["typo", "deep"]})  # now from the template's memory
    assert reply["status"] == "SUCCESS", reply["error"]
    assert reply["result"] == {"typo": "SyntaxError", "deep": "RecursionError"}
    assert (again["status"], again["result"]) == ("SUCCESS", reply["result"]), again["error"]
    assert (victim["status"], victim["result"]) == ("SUCCESS", ["B", n]), victim["error"]


LESSONS = """
import itertools, json, os, socket, struct

def _ask(sock, frame):
    body = json.dumps(frame).encode()
    sock.sendall(struct.pack('>I', len(body)) + body)
    header = b''
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    (length,) = struct.unpack('>I', header)
    data = b''
    while len(data) < length:
        data += sock.recv(length - len(data))
    return json.loads(data)

def run(paths, rounds):
    sock = socket.socket(fileno=os.dup(3))  # this execution's channel, under the runtime's feet
    twice = _ask(sock, {'op': 'lookup', 'paths': [paths[0]] * 63 + ['nothere.py']})
    long_rel = _ask(sock, {'op': 'directory', 'rel': 'd' * 1_000_000, 'generation': 1})
    found = 0
    for order in itertools.islice(itertools.permutations(paths), rounds):  # a new candidate tuple each time
        answer = _ask(sock, {'op': 'lookup', 'paths': list(order)})
        found += sum(entry['content'] is not None for entry in answer['entries'])
    return {'twice': twice.get('error'), 'long rel': long_rel.get('error')[-25:], 'found': found}
"""


async def test_lessons_an_execution_chooses_stay_bounded(harness) -> None:
    """A2: lookups an execution chooses (the same path 63 times; a new ordering of 6 large modules 300 times,
    about 108 MB of content) and 1 MB directory names made the lesson to the template exceed the control frame's
    limit (the connection closed, every execution of the consumer killed) and grew the consumer without bound.
    Duplicates and non-directory names are refused; what is remembered for the template stays under a budget."""
    paths = [f"big{i}.py" for i in range(6)]
    for n, path in enumerate(paths):
        await harness.module(path, f"# {n}\n" + "X = '" + "x" * 60_000 + "'\n")
    await harness.converge()
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        slow = await harness.workflow(SLOW)
        n = uuid.uuid4().hex
        in_flight = asyncio.create_task(harness.call(slow, {"n": n}, organization_id=orgs.b))
        reply = await attack(harness, orgs, LESSONS, {"paths": paths, "rounds": 300})
        victim = await in_flight
        lesson_bytes = consumer.modules.lesson_bytes
    assert reply["status"] == "SUCCESS", reply["error"]
    assert reply["result"] == {"twice": "InputError: 'paths': a path is named twice",
                               "long rel": "not a workspace directory", "found": 1800}  # fmt: skip
    assert (victim["status"], victim["result"]) == ("SUCCESS", ["B", n]), victim["error"]
    assert lesson_bytes <= serving.MAX_LESSON_BYTES


def _rss_mb(pid: int | None) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 1024**2


async def test_a_large_module_imported_each_generation_does_not_grow_or_stall_the_template(harness) -> None:
    """C1 (attack-8c): org A re-puts a 1.3 MB module of 50,000 small functions and imports it once per
    generation. The template compiled every lesson in its only loop and kept the code across generations
    (by count, not bytes): a stall of seconds each time and about 90 MB more per generation, which every clone
    inherits against its memory limit. Now no module above MAX_TAUGHT_MODULE_BYTES is taught (the execution
    that imports it gets it over its channel and compiles it itself), so the template does not grow, and org
    B's execution, including one allocating 50 MB, runs as before."""
    big = "import bigmod\ndef run(i):\n    return bigmod.f49999() + i\n"
    allocates = "def run(n, context):\n    block = bytearray(50 * 1024**2)\n    return [len(block), n]\n"
    harness.source.max_module_bytes = modules.DEFAULT_MAX_MODULE_BYTES  # production's 8 MiB, not the tests' 64 KiB
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        hostile, allocating = await harness.workflow(big), await harness.workflow(allocates)
        await b_is_unharmed(harness, orgs)
        before = _rss_mb(consumer.executor.template_pid)
        for generation in range(3):
            text = f"# generation {generation}\n" + "".join(f"def f{i}():\n    return {i}\n" for i in range(50_000))
            assert len(text) > 1_000_000
            await harness.module("bigmod.py", text)
            reply = await harness.call(hostile, {"i": generation}, organization_id=orgs.a)
            assert (reply["status"], reply["result"]) == ("SUCCESS", 49_999 + generation), reply["error"]
            await b_is_unharmed(harness, orgs)  # cloned after the template handled A's lesson
        grown = _rss_mb(consumer.executor.template_pid) - before
        n = uuid.uuid4().hex
        allocated = await harness.call(allocating, {"n": n}, organization_id=orgs.b)
    assert grown < 40, f"the template grew by {grown:.0f} MB"
    assert (allocated["status"], allocated["result"]) == ("SUCCESS", [50 * 1024**2, n]), allocated["error"]


# -- who may drive a root socket executor, and for how long (attack-8c C2) ------------------------------------

SQUAT = """
import json, os, socket, struct, sys
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # nobody: a local user, no consumer
held = []
for _ in range(20):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    sock.settimeout(5)
    try:
        data = sock.recv(1 << 16)
    except OSError:
        data = b''
    held.append(sock)
    print('hello' if data else 'refused', flush=True)
sys.stdin.read()  # holds its connections (and any spares) until the test ends
"""


async def test_a_root_socket_executor_requires_its_consumers_uid(harness, tmp_path: Path) -> None:
    """C2: a root ``modcache executor --socket`` without ``--consumer-uid`` served any local uid: ``nobody``
    opened 20 connections and got 40 execution processes (2048 connections exhaust the slots of every
    consumer), runnable with any timeout. It now refuses to start, naming the option; started with it, the
    squatter is turned away before any hello or spare, and org B's executions run as before."""
    environment = {k: v for k, v in os.environ.items() if k != "MODCACHE_EXECUTOR_CONSUMER_UID"}
    template = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modcache_consumer.template", "--socket", str(tmp_path / "t.sock"),
        stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    cli = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "modcache"), "executor", "--socket", str(tmp_path / "c.sock"),
        stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):  # without the check both would serve until killed
            (_, said_template), (_, said_cli) = await asyncio.gather(template.communicate(), cli.communicate())
    finally:
        for process in (template, cli):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    assert template.returncode == 78, said_template
    assert "a root executor on a socket needs --consumer-uid (MODCACHE_EXECUTOR_CONSUMER_UID)" in said_template.decode()
    assert cli.returncode == 2, said_cli
    assert "--consumer-uid (MODCACHE_EXECUTOR_CONSUMER_UID) is required" in said_cli.decode()
    async with socket_executor() as (path, process), harness.consumer(executor_socket=str(path)) as consumer:
        orgs = await two_orgs(harness, consumer)
        os.chmod(path.parent, 0o755)
        squatter = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SQUAT, str(path), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            said = [(await squatter.stdout.readline()).decode().strip() for _ in range(20)]  # type: ignore[union-attr]
            assert said == ["refused"] * 20
            assert _others_clones(consumer.executor) <= 2  # no squatter got a clone (the probe may be ending)
            await b_is_unharmed(harness, orgs)
        finally:
            squatter.kill()
            await squatter.wait()


async def test_no_job_holds_an_execution_past_the_executors_maximum_timeout(executors) -> None:
    """C2: a connection could ``run`` its spares with any finite ``timeout_s`` (1e9 s) and hold execution
    processes for good. The template caps every job at its ``--max-timeout-s`` and ``--max-grace-s`` (the
    consumer's MODCACHE_EXECUTION_TIMEOUT_S and MODCACHE_TERMINATE_GRACE_S; a child executor gets the
    consumer's): the sleeper ends TIMEOUT after the cap, and the next execution runs."""
    async with socket_executor("--max-timeout-s", "1", "--max-grace-s", "0.5") as (path, _):
        the_executor = await executors.start(socket_path=str(path))
        started = time.monotonic()
        async with asyncio.timeout(30):
            held = await executors.run(the_executor, "import time\ndef run():\n    time.sleep(3600)\n", timeout_s=1e9)
        took = time.monotonic() - started
        n = uuid.uuid4().hex
        benign = await executors.run(the_executor, "def run(n):\n    return n\n", {"n": n})
    assert held.status == "TIMEOUT", held.error
    assert took < 20
    assert (benign.status, benign.result) == ("SUCCESS", n), benign.error


ROGUE = """
import hashlib, json, socket, struct, sys
path, generation, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import os
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)  # a local user: not root, not an execution uid, no descendant of the executor
code = "def greet():\\n    return 'FORGED by a local user'\\n"
entry = {"path": "greet.py", "content": code, "hash": hashlib.sha256(code.encode()).hexdigest(),
         "manifest_generation": generation, "manifest_hash": None, "indexed": True}
lesson = {"op": "learn", "generation": generation, "lookups": [[["greet.py", "greet/__init__.py"], [entry]]]}
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
hello = sock.recv(1 << 16)
body = json.dumps(lesson).encode()
sock.sendall(struct.pack('>I', len(body)) + body)
print('taught' if hello else 'refused', flush=True)
sys.stdin.read()  # stays connected until the test ends
"""


async def test_a_local_user_cannot_teach_an_executor_code_for_other_consumers(harness) -> None:
    """A5: a root executor's socket is reachable by another uid allowed to connect (another consumer, or a local
    user where ``--consumer-uid`` names it); what that connection teaches reaches only the clones handed to it,
    never another consumer's executions (the lesson memory is per connection), so org B still imports the
    module's real content."""
    await harness.module("greet.py", "def greet():\n    return 'genuine'\n")
    await harness.converge()
    greets = "from greet import greet\ndef run(n, context):\n    return [context.organization['name'], greet(), n]\n"
    other = ("--consumer-uid", "0", "--consumer-uid", "65534")  # since C2 a root executor names its consumers
    async with socket_executor(*other) as (path, _), harness.consumer(executor_socket=str(path)) as consumer:
        os.chmod(path.parent, 0o755)
        orgs = await two_orgs(harness, consumer)
        workflow = await harness.workflow(greets)
        first = await harness.call(workflow, {"n": 0}, organization_id=orgs.b)  # the consumer taught its lesson
        generation = int(await harness.redis.get(harness.keyspace.generation))
        rogue = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ROGUE, str(path), str(generation), "65534",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert rogue.stdout is not None
        said = await rogue.stdout.readline()
        try:
            replies = [await harness.call(workflow, {"n": n}, organization_id=orgs.b) for n in range(1, 5)]
        finally:
            rogue.kill()
            await rogue.wait()
    assert said == b"taught\n"  # it was let in: another allowed consumer uid
    for n, reply in enumerate([first, *replies]):
        assert (reply["status"], reply["result"]) == ("SUCCESS", ["B", "genuine", n]), reply["error"]


ENVIRON = "def run():\n    with open('/proc/self/environ', 'rb') as f:\n        return f.read().decode().split('\\0')\n"


async def test_modcache_executor_passes_executions_no_variable_of_its_shell(harness) -> None:
    """A6: ``modcache executor`` started from a shell that exported the consumer's settings (a CI job, a
    laptop) runs the template with the allow-listed environment only: an execution's ``/proc/self/environ``
    (the template's block, which ``os.environ.clear()`` in the clone did not change) holds none of them."""
    directory = Path("/run") / f"modcache-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(directory, 0o755)
    path = directory / "executor.sock"
    secrets = {"MODCACHE_DATABASE_URL": harness.settings.required("database_url"), "MODCACHE_SECRETS_KEY": SECRETS_KEY,
               "PGPASSWORD": PASSWORD}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "modcache"), "executor", "--socket", str(path), "--consumer-uid", "0",
        env={**os.environ, **secrets},
    )  # fmt: skip
    try:
        async with harness.consumer(executor_socket=str(path)) as consumer:
            orgs = await two_orgs(harness, consumer)
            reply = await attack(harness, orgs, ENVIRON)
    finally:
        process.terminate()
        await process.wait()
        shutil.rmtree(directory, ignore_errors=True)
    assert reply["status"] == "SUCCESS", reply["error"]
    assert_no_secret("\n".join(reply["result"]), harness.settings, orgs)
    assert not [v for v in reply["result"] if v.startswith(("MODCACHE_", "PG"))], reply["result"]


LINGER = """
import json, os, socket, struct, subprocess, time
def run(seconds):
    subprocess.Popen(['sleep', seconds])
    body = json.dumps({'op': 'result', 'status': 'SUCCESS', 'result': 'done (or so it says)', 'error': None,
                       'timings_ms': {}}).encode()
    sock = socket.socket(fileno=os.dup(3))
    sock.sendall(struct.pack('>I', len(body)) + body)
    sock.shutdown(socket.SHUT_WR)  # the consumer has one result and EOF: the execution is over, for it
    time.sleep(600)
"""


async def test_an_execution_that_sends_its_own_result_does_not_outlive_it(harness) -> None:
    """A7: a workflow that writes its own result frame and shuts its channel got SUCCESS recorded and its
    consumer slot freed while it (and what it started) ran on until the deadline. Its process is stopped the
    moment its result is taken, so the concurrency limit keeps bounding what runs."""
    seconds = f"{3600 + time.time() % 600:.6f}"
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, LINGER, {"seconds": seconds}, timeout_seconds=600)
        deadline = time.monotonic() + 10
        while sleepers(seconds) and time.monotonic() < deadline:  # noqa: ASYNC110 -- the kernel tears it down
            await asyncio.sleep(0.02)
        left = sleepers(seconds)
    assert (reply["status"], reply["result"]) == ("SUCCESS", "done (or so it says)"), reply["error"]
    assert left == []


LEFTOVERS = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)

def run(mode, name):
    if mode == 'plant':
        with open(f'/run/lock/{name}', 'w') as f:  # world-writable, on the host's /run: it would stay
            f.write("org A's note")
        key = libc.syscall(248, b'user', name.encode(), b'tok_live_AAAA', 13, ctypes.c_long(-4))  # add_key @u
        return ['planted', errno.errorcode.get(ctypes.get_errno()) if key < 0 else 'key added']
    try:
        with open(f'/run/lock/{name}') as f:
            return ['found', f.read()]
    except OSError as e:
        return [type(e).__name__]
"""


async def test_nothing_an_execution_leaves_in_shared_places_reaches_the_next(harness) -> None:
    """A12: ``/run/lock`` (world-writable, on the host) and the per-uid kernel keyring outlived executions and,
    with slot uids reused, reached later executions of other organizations. Every world-writable directory
    found at start gets a private tmpfs in each execution, and the keyring calls are refused (seccomp)."""
    name = f"modcache-test-{uuid.uuid4().hex[:8]}"
    async with harness.consumer() as consumer:
        orgs = await two_orgs(harness, consumer)
        planted = await attack(harness, orgs, LEFTOVERS, {"mode": "plant", "name": name})
        look = await harness.workflow(LEFTOVERS)
        seen = [await harness.call(look, {"mode": "look", "name": name}, organization_id=orgs.b) for _ in range(3)]
    assert (planted["status"], planted["result"]) == ("SUCCESS", ["planted", "EPERM"]), planted["error"]
    assert [(r["status"], r["result"]) for r in seen] == [("SUCCESS", ["FileNotFoundError"])] * 3
    assert not await asyncio.to_thread(os.path.exists, f"/run/lock/{name}")  # nothing reached the host's directory


WRITE = """
import errno
def run(path):
    try:
        with open(path, 'w') as f:
            f.write('left behind')
        return 'written'
    except OSError as e:
        return errno.errorcode[e.errno]
"""


@pytest.mark.parametrize("layout", ["root", "user namespace"])
async def test_an_execution_writes_nowhere_but_its_own_scratch(harness, layout: str) -> None:
    """Beyond the scan of A12: a world-writable directory made after the executor started (so no scan found it),
    and owned by the executor's uid (which a user-namespace execution is, outside): every mount of the
    execution's namespace is read-only but its own tmpfs mounts, so the write fails with EROFS."""
    target = Path("/var/lib") / f"modcache-test-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        socket = None
        if layout == "user namespace":
            path, _ = await stack.enter_async_context(socket_executor(uid=EXECUTOR_UID))
            socket = str(path)
        consumer = await stack.enter_async_context(harness.consumer(executor_socket=socket))
        os.mkdir(target)
        stack.callback(shutil.rmtree, target, ignore_errors=True)
        os.chown(target, EXECUTOR_UID, EXECUTOR_UID)
        os.chmod(target, 0o1777)
        orgs = await two_orgs(harness, consumer)
        reply = await attack(harness, orgs, WRITE, {"path": str(target / "note")})
        left = await asyncio.to_thread(os.listdir, target)
    assert (reply["status"], reply["result"]) == ("SUCCESS", "EROFS"), reply["error"]
    assert left == []
