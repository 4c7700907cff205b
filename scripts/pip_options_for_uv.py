"""Print, one per line, the uv options that carry over pip's find-links and constraint settings.

Why: a machine may keep wheels pip knows about through its configuration (`pip config`, PIP_* variables),
for example a CPU build of torch in a local folder, while PyPI's torch of the same version is the
multi-GB CUDA build. uv ignores pip's configuration, so scripts/setup.sh passes these on. Entries that
name a local path which does not exist are dropped (pip only warns about them; uv would stop).
"""

from __future__ import annotations

import os
import subprocess
import sys


def pip_settings() -> dict[str, list[str]]:
    """find-links and constraint values from `pip config list` and the PIP_* environment."""
    out: dict[str, list[str]] = {"find-links": [], "constraint": []}
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                 text=True, check=False).stdout
    except OSError:
        listing = ""
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in out:
            out[name] += value.strip().strip("'\"").split()
    for name, var in (("find-links", "PIP_FIND_LINKS"), ("constraint", "PIP_CONSTRAINT")):
        out[name] += os.environ.get(var, "").split()
    return out


def usable(value: str) -> bool:
    """A URL is kept as given; a local path only if it exists."""
    if "://" in value and not value.startswith("file://"):
        return True
    return os.path.exists(value.removeprefix("file://"))


def main() -> None:
    for name, values in pip_settings().items():
        for value in dict.fromkeys(values):          # unique, in order
            if usable(value):
                print(f"--{name}")
                print(value)


if __name__ == "__main__":
    main()
