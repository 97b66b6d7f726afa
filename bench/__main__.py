"""Run a benchmark by module name: ``python -m bench NAME [args]`` (``all`` runs each in turn)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main() -> None:
    names = available()
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    if wanted not in [*names, "all"]:
        print("benchmarks:", ", ".join(names) or "(none yet)", "| usage: ./dev bench NAME|all")
        sys.exit(2)
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    for name in names if wanted == "all" else [wanted]:
        print(f"== bench {name} ==", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
