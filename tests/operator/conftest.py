"""Fixtures for the operator's tests.

* the CRD as the API server applies it (defaults, schema, CEL rules);
* ``cluster``: the operator running against kmock's emulator (see ``operatorkit``), with helpers to create
  Secrets and ModuleCaches and to wait on what the operator writes back;
* ``changes``: awaits a state of the test's keys in Redis (every key under the test's scope), no polling.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from modcache import keys
from operatorkit.cluster import Cluster, emulated_api, running_operator
from operatorkit.keychanges import KeyChanges, key_changes
from testkit import crdkit, databases

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
        crdkit.apply_defaults(crd_schema, document)
        return document

    return apply


@pytest.fixture(scope="session")
def crd_validator(crd_schema: dict[str, Any]) -> Callable[[dict[str, Any]], list[str]]:
    """The problems the API server would report for a ModuleCache document (empty: accepted)."""
    validator = jsonschema.Draft7Validator(crd_schema)
    cel = celpy.Environment()

    def validate(document: dict[str, Any]) -> list[str]:
        document = copy.deepcopy(document)
        crdkit.apply_defaults(crd_schema, document)
        problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        return problems or crdkit.cel_problems(cel, crd_schema, document, "")

    return validate


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_api() as (emulator, url), running_operator(emulator, url) as running:
        yield running


@pytest.fixture
async def other_database_url(services: dict[str, str], pg_template: str) -> AsyncIterator[str]:
    """A second fresh, migrated database, for a second ModuleCache."""
    async with databases.copy_of(services["postgres"], pg_template) as url:
        yield url


@pytest.fixture
async def changes(redis_url: str, keyspace: keys.KeySpace) -> AsyncIterator[KeyChanges]:
    """Changes to any key of this test's scope (``t<id>:``, whatever prefix follows) in the shared Redis."""
    async with key_changes(redis_url, keyspace.prefix.split(":", 1)[0] + ":") as watching:
        yield watching
