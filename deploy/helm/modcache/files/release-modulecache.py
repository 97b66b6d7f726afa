"""Helm pre-delete hook: delete the release's ModuleCache while its operator still runs.

``helm uninstall`` removes Deployments and RBAC before custom resources, so without this hook the ModuleCache would
be deleted after its operator is gone and hang forever on the operator's finalizer. Run first, this deletes the
ModuleCache, waits up to ``MODCACHE_CLEANUP_TIMEOUT_S`` for the operator to stop its loop and release the
finalizer, and otherwise removes the operator's finalizer itself (the operator is about to be deleted), so an
uninstall never hangs. It uses the project's image (the operator's Kubernetes adapter) and needs get/delete/patch on
one object.

Settings (environment): MODCACHE_CLEANUP_NAMESPACE, MODCACHE_CLEANUP_NAME, MODCACHE_CLEANUP_TIMEOUT_S (default 120),
MODCACHE_CLEANUP_POLL_S (default 1). In a pod it uses the in-cluster service account; elsewhere $KUBECONFIG.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from modcache_operator import credentials, kube, names


def say(message: str) -> None:
    print(f"modcache cleanup: {message}", flush=True)


async def release(api: kube.KubeApi, namespace: str, name: str) -> str:
    """Delete the object and wait for it to be gone; the outcome in words."""
    if not await api.delete_modulecache(namespace, name):
        return "nothing to delete"
    timeout_s = float(os.environ.get("MODCACHE_CLEANUP_TIMEOUT_S", "120"))
    poll_s = float(os.environ.get("MODCACHE_CLEANUP_POLL_S", "1"))
    deadline = time.monotonic() + timeout_s
    while (body := await api.read_modulecache(namespace, name)) is not None:
        if time.monotonic() >= deadline:
            return await unstick(api, namespace, name, body, timeout_s)
        await asyncio.sleep(poll_s)
    return "released by the operator"


async def unstick(api: kube.KubeApi, namespace: str, name: str, body: dict[str, Any], waited_s: float) -> str:
    """Remove the operator's finalizer (only that one), guarded by the resourceVersion we saw."""
    finalizers = list(body.get("metadata", {}).get("finalizers") or [])
    if names.FINALIZER not in finalizers:
        return f"still present after {waited_s:.0f}s, held by finalizers {finalizers} that are not the operator's"
    rest = [f for f in finalizers if f != names.FINALIZER]
    metadata: dict[str, Any] = {"finalizers": rest or None}
    if body["metadata"].get("resourceVersion"):
        metadata["resourceVersion"] = body["metadata"]["resourceVersion"]
    await api.patch_modulecache(namespace, name, {"metadata": metadata})
    return f"the operator did not release it within {waited_s:.0f}s: removed its finalizer {names.FINALIZER}"


async def main() -> int:
    namespace = os.environ["MODCACHE_CLEANUP_NAMESPACE"]
    name = os.environ["MODCACHE_CLEANUP_NAME"]
    api = kube.KubeApi(credentials=credentials.load())  # in a pod its service account, elsewhere $KUBECONFIG
    try:
        outcome = await release(api, namespace, name)
    finally:
        await api.close()
    say(f"ModuleCache {namespace}/{name}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
