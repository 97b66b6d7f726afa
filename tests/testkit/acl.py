"""The Redis ACL users docs/integrity.md documents, read from the doc itself (so the tests run what it says)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import redis.asyncio as aioredis

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrity.md"
PASSWORD = "s3cret-for-tests"


def documented_users() -> dict[str, list[str]]:
    """user -> the ``ACL SETUSER`` arguments as docs/integrity.md gives them (``PASSWORD`` filled in)."""
    text = DOC.read_text()
    found = {}
    for command in re.findall(r"ACL SETUSER [^`]+", text):
        words = shlex.split(command.replace("PASSWORD", PASSWORD))
        found[words[2]] = words[3:]
    return found


async def create_documented_users(admin: aioredis.Redis) -> None:
    for user, rules in documented_users().items():
        await admin.acl_setuser(user, reset=True)
        await admin.execute_command("ACL", "SETUSER", user, *rules)


def url_of(port: int, user: str) -> str:
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{port}/0"
