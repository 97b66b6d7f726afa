"""CRD checks shared by the operator and chart tests: what the API server does before admitting a custom resource
(schema defaults, then the CRD's CEL ``x-kubernetes-validations`` rules)."""

from __future__ import annotations

import copy
from typing import Any

import celpy


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(schema["items"], item)


def cel_problems(cel: celpy.Environment, schema: dict[str, Any], value: Any, path: str) -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = cel.program(cel.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            problems.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += cel_problems(cel, sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            problems += cel_problems(cel, schema["items"], item, f"{path}[{n}]")
    return problems
