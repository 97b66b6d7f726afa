"""Fixtures for the operator's tests.

* the CRD as the API server applies it (defaults, schema, CEL rules);
* ``cluster``: the operator running against kmock's emulator (see ``operatorkit``), with helpers to create
  Secrets and ModuleCaches and to wait on what the operator writes back.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import celpy
import jsonschema
import pytest
import yaml

from operatorkit.cluster import Cluster, emulated_api, running_operator

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "modulecache.yaml"


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return document


@pytest.fixture(scope="session")
def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.fixture(scope="session")
def crd_defaults(crd_schema: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Fill in schema defaults, as the API server does before validating."""

    def apply(document: dict[str, Any]) -> dict[str, Any]:
        _apply_defaults(crd_schema, document)
        return document

    return apply


@pytest.fixture(scope="session")
def crd_validator(crd_schema: dict[str, Any]) -> Callable[[dict[str, Any]], list[str]]:
    """The problems the API server would report for a ModuleCache document (empty: accepted)."""
    validator = jsonschema.Draft7Validator(crd_schema)
    cel = celpy.Environment()

    def validate(document: dict[str, Any]) -> list[str]:
        document = copy.deepcopy(document)
        _apply_defaults(crd_schema, document)
        problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        return problems or _cel_problems(cel, crd_schema, document, "")

    return validate


def _apply_defaults(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _apply_defaults(schema["items"], item)


def _cel_problems(cel: celpy.Environment, schema: dict[str, Any], value: Any, path: str) -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = cel.program(cel.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            problems.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += _cel_problems(cel, sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            problems += _cel_problems(cel, schema["items"], item, f"{path}[{n}]")
    return problems


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_api() as (emulator, url), running_operator(emulator, url) as running:
        yield running


@pytest.fixture
async def other_database_url(services: dict[str, str], pg_template: str) -> AsyncIterator[str]:
    """A second fresh, migrated database, for a second ModuleCache."""
    admin = services["postgres"]
    name = f"modcache_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}" STRATEGY FILE_COPY')
    finally:
        await conn.close()
    yield f"{admin.rpartition('/')[0]}/{name}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
