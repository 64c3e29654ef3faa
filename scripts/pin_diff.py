"""`make test-latest`: which installed versions differ from the pins in constraints.txt.

Run with the interpreter of the environment to compare (e.g. ``.venv-latest/bin/python``). Prints one
line per package whose installed version is not the pinned one (the pins to move if the suite passes
there), and the installed packages that have no pin. Exit code 0 always: it informs, the suite decides.
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name -> version`` of each ``name==version`` line (comments and blank lines skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """``name -> version`` of every distribution in this environment, except pare itself."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) not in ("pare", "pip", "setuptools", "wheel"):
            found[_canonical(name)] = dist.version
    return found


def _base(version: str) -> str:
    return version.split("+", 1)[0]  # torch 2.13.0+cpu is the pinned 2.13.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("constraints", type=Path, nargs="?", default=Path("constraints.txt"))
    args = parser.parse_args()
    pins, have = read_pins(args.constraints), installed()
    moved = sorted((n, pins[n], v) for n, v in have.items() if n in pins and _base(v) != _base(pins[n]))
    new = sorted((n, v) for n, v in have.items() if n not in pins)
    if not moved and not new:
        print(f"every installed version matches {args.constraints}")
        return 0
    if moved:
        print(f"installed versions that differ from {args.constraints} (if the suite passed, move these pins):")
        width = max(len(n) for n, _, _ in moved)
        for name, pinned, version in moved:
            print(f"  {name:<{width}}  pinned {pinned:<14} installed {version}")
    if new:
        print(f"installed packages with no pin in {args.constraints} (add them):")
        for name, version in new:
            print(f"  {name}=={version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
