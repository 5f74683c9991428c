"""Print a pip constraints file that pins every declared dependency to its lower bound.

    python .ci/floors.py > floors.txt      # then: pip install -c floors.txt -e ".[test,plot,data]"

Reads ``pyproject.toml``'s ``dependencies`` and the optional groups named on the command line (default:
data and plot), and writes ``name==floor`` for each requirement with a ``>=`` bound. torch is left out:
CI keeps the CPU build already on disk (an older torch from the registry is a multi-gigabyte download).
"""

import re
import sys
from pathlib import Path

import tomllib

SKIP = {"torch"}


def floors(groups: list[str]) -> list[str]:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for g in groups:
        reqs += project["optional-dependencies"][g]
    pins = []
    for req in reqs:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        floor = re.search(r">=\s*([0-9][^,;\s]*)", req)
        if floor is None:
            raise SystemExit(f"{req!r} declares no lower bound; every dependency needs one")
        if name.lower() not in SKIP:
            pins.append(f"{name}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1:] or ["data", "plot"])))
