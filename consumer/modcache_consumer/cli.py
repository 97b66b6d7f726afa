"""The consumer's commands: ``modcache consumer``, ``modcache executor``, ``modcache workflows put | ls``,
``modcache run``.

Settings come from ``MODCACHE_*`` variables (flags override some); a bad one exits 2 with the variable named.
``run --wait`` prints the execution's reply as JSON and exits 1 unless it succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from modcache import errors, wiring
from modcache_consumer import amqp, consumer, database, executor, loops, messages, settings, workflows


class ExecutionFailed(errors.ModcacheError):
    """``run --wait`` saw the execution end in FAILED or TIMEOUT (already printed)."""


@click.command("consumer")
@click.option("--concurrency", type=click.IntRange(min=1), help="Executions at once (MODCACHE_CONSUMER_CONCURRENCY).")
@click.option("--queue", "queue_name", help="Queue to consume (MODCACHE_QUEUE_NAME).")
@click.option("--health-port", type=click.IntRange(0, 65535), help="/healthz, /readyz; 0: any (MODCACHE_HEALTH_PORT).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="/metrics on its own port (MODCACHE_METRICS_PORT).")
def consumer_command(
    concurrency: int | None, queue_name: str | None, health_port: int | None, metrics_port: int | None
) -> None:
    """Run workflow executions from RabbitMQ until SIGTERM or Ctrl-C (then drain and stop)."""
    the_settings = settings.ConsumerSettings.from_env(
        consumer_concurrency=concurrency, queue_name=queue_name, health_port=health_port, metrics_port=metrics_port
    )
    loops.run(_serve(the_settings), loop=the_settings.event_loop)


async def _serve(the_settings: settings.ConsumerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with consumer.WorkflowExecutionConsumer(settings=the_settings) as running:
        listeners = "".join(
            f", {what} on {the_settings.health_host}:{port}"
            for what, port in (("health", running.health_port), ("metrics", running.metrics_port))
            if port
        )
        click.echo(f"modcache consumer: consuming {the_settings.queue_name}{listeners}", err=True)
        await stop.wait()
        click.echo("modcache consumer: stopping (draining in-flight executions)", err=True)


@click.command("executor")
@click.option("--socket", "socket_path", required=True, help="Unix socket the consumer connects to.")
@click.option("--uid-base", type=click.IntRange(min=1), default=None, envvar="MODCACHE_EXECUTION_UID_BASE",
              help="Under root, executions run as this uid + a slot (default: a free range of this host).")  # fmt: skip
@click.option("--consumer-uid", "consumer_uids", type=int, multiple=True, envvar="MODCACHE_EXECUTOR_CONSUMER_UID",
              help="Only this uid may connect (repeatable; required as root; else: not execution uids).")  # fmt: skip
@click.option("--allow-shared-uid", is_flag=True, envvar="MODCACHE_EXECUTOR_ALLOW_SHARED_UID",
              help="UNSAFE for more than one tenant: one uid for every execution.")  # fmt: skip
@click.option("--execution-network", type=click.Choice(["none", "host"]), default="none", show_default=True,
              envvar="MODCACHE_EXECUTION_NETWORK", help="none: an empty network namespace per execution.")  # fmt: skip
@click.option("--max-timeout-s", type=click.FloatRange(min=0, min_open=True, max=1e9), default=1800.0,
              show_default=True, envvar="MODCACHE_EXECUTION_TIMEOUT_S",
              help="No execution runs longer than this (the consumer's MODCACHE_EXECUTION_TIMEOUT_S).")  # fmt: skip
@click.option("--max-grace-s", type=click.FloatRange(min=0, max=1e9), default=5.0, show_default=True,
              envvar="MODCACHE_TERMINATE_GRACE_S",
              help="Nor is given more grace after SIGTERM (the consumer's MODCACHE_TERMINATE_GRACE_S).")  # fmt: skip
def executor_command(
    socket_path: str,
    uid_base: int | None,
    consumer_uids: tuple[int, ...],
    allow_shared_uid: bool,
    execution_network: str,
    max_timeout_s: float,
    max_grace_s: float,
) -> None:
    """Run workflow code for a consumer: one fresh, isolated process per execution (needs no secret)."""
    if os.geteuid() == 0 and not consumer_uids:
        raise click.UsageError(
            "as root, --consumer-uid (MODCACHE_EXECUTOR_CONSUMER_UID) is required: the uid of the consumer allowed "
            "to connect; without it any local user could run code in this executor"
        )
    argv = [sys.executable, "-m", "modcache_consumer.template", "--socket", socket_path]
    argv += ["--max-timeout-s", repr(max_timeout_s), "--max-grace-s", repr(max_grace_s)]
    argv += ["--uid-base", str(uid_base)] if uid_base is not None else []
    argv += [arg for uid in consumer_uids for arg in ("--consumer-uid", str(uid))]
    argv += ["--allow-shared-uid"] if allow_shared_uid else []
    argv += ["--execution-network", execution_network]
    # A clean interpreter with an allow-listed environment (as the consumer gives its child-mode executor): an
    # execution's /proc/self/environ is the template's, so nothing exported in this shell may reach it (A6).
    os.execve(sys.executable, argv, executor.executor_environment())


@click.group("workflows")
def workflows_group() -> None:
    """Workflows the consumer can run."""


@workflows_group.command("put")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--function", "function_name", required=True, help="The function to call.")
@click.option("--timeout-s", type=click.IntRange(min=1), default=workflows.DEFAULT_TIMEOUT_S, show_default=True)
@click.option("--path", "workflow_path", help="Path shown in tracebacks (default: FILE's name).")
@click.option("--organization", type=click.UUID, help="Restrict the workflow to one organization.")
@click.option(
    "--retries-on-crash",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run an execution again (at most this often) when its consumer died mid-run; 0: it fails.",
)
def put_command(
    name: str,
    file: Path,
    function_name: str,
    timeout_s: int,
    workflow_path: str | None,
    organization: uuid.UUID | None,
    retries_on_crash: int,
) -> None:
    """Create or update workflow NAME from FILE."""
    try:
        code = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise errors.InputError(str(file), f"cannot read: {errors.describe(e)}") from e
    try:
        compile(code, workflow_path or file.name, "exec")
    except SyntaxError as e:
        raise errors.InputError(str(file), f"{e.msg} (line {e.lineno})") from None

    async def put(store: workflows.Workflows) -> uuid.UUID:
        return await store.put(
            name,
            code,
            function_name=function_name,
            path=workflow_path or file.name,
            timeout_seconds=timeout_s,
            organization_id=organization,
            retries_on_crash=retries_on_crash,
        )

    click.echo(asyncio.run(_with_workflows(put)))


@workflows_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def ls_command(as_json: bool) -> None:
    """List workflows."""

    async def rows(store: workflows.Workflows) -> list[workflows.WorkflowRow]:
        return list(await store.list())

    for row in asyncio.run(_with_workflows(rows)):
        if as_json:
            click.echo(json.dumps({k: str(v) if isinstance(v, uuid.UUID) else v for k, v in vars(row).items()}))
        else:
            state = "" if row.is_active else "  (inactive)"
            click.echo(f"{row.id}  {row.name}  {row.function_name}()  timeout {row.timeout_seconds}s{state}")


@click.command("run")
@click.argument("workflow")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A parameter; VALUE is JSON or text.")
@click.option("--organization", type=click.UUID, help="Run for this organization.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True)
def run_command(
    workflow: str, params: tuple[str, ...], organization: uuid.UUID | None, wait: bool, timeout_s: float
) -> None:
    """Publish an execution of WORKFLOW (a name or an id); prints its execution id, or with --wait its reply."""
    parameters = _parameters(params)
    the_settings = settings.ConsumerSettings.from_env()
    reply = asyncio.run(_run(the_settings, workflow, parameters, organization, wait=wait, timeout_s=timeout_s))
    if reply is None:
        return
    click.echo(json.dumps(reply, indent=2))
    if reply["status"] != messages.Status.SUCCESS:
        raise ExecutionFailed(f"execution {reply['execution_id']} ended {reply['status']}")


async def _run(
    the_settings: settings.ConsumerSettings,
    workflow: str,
    parameters: dict[str, Any],
    organization: uuid.UUID | None,
    *,
    wait: bool,
    timeout_s: float,
) -> messages.RawReply | None:
    workflow_id = await _with_workflows(lambda store: _resolve(store, workflow), the_settings)
    request = messages.ExecutionRequest(
        execution_id=messages.ExecutionId(uuid.uuid4()),
        workflow_id=messages.WorkflowId(workflow_id),
        organization_id=messages.OrganizationId(organization) if organization else None,
        parameters=parameters,
    )
    async with amqp.caller(the_settings.required("amqp_url"), queue=the_settings.queue_name) as client:
        await client.publish(request, wait=wait)
        if not wait:
            click.echo(str(request.execution_id))
            return None
        try:
            return await client.result(request.execution_id, timeout_s=timeout_s)
        except TimeoutError:
            raise errors.TransientError(f"no result for {request.execution_id} within {timeout_s:g} s") from None


async def _resolve(store: workflows.Workflows, workflow: str) -> uuid.UUID:
    try:
        return uuid.UUID(workflow)
    except ValueError:
        return await store.id_by_name(workflow)


async def _with_workflows(work: Any, the_settings: settings.ConsumerSettings | None = None) -> Any:
    the_settings = the_settings or settings.ConsumerSettings.from_env()
    url = wiring.database_dsn(the_settings, the_settings.required("database_url"))
    db = database.Database(url=url, pool_size=1, application_name="modcache-cli")
    try:
        return await work(workflows.Workflows(database=db))
    finally:
        await db.close()


def _parameters(pairs: tuple[str, ...]) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        try:
            parameters[key] = json.loads(raw)
        except ValueError:
            parameters[key] = raw
    return parameters
