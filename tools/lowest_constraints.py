"""Prints a pip constraints file pinning every direct dependency of tfseg (setup.cfg's
``install_requires``, and the extras named as arguments) to the lowest version its bound allows.

CI installs the project with it (``pip install -c FILE -e ".[test]"``) and runs the fast tier, so
the lower bounds in setup.cfg are the tested ones; setup.cfg stays the one place they are written.

    python tools/lowest_constraints.py > lowest.txt
"""

from __future__ import annotations

import configparser
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(setup_cfg: str, extras=()) -> list[str]:
    """The requirement lines of ``install_requires`` (and ``extras``), comments dropped."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    sections = [cfg["options"]["install_requires"]]
    sections += [cfg["options.extras_require"][e] for e in extras]
    lines = []
    for text in sections:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def lowest(requirement: str) -> str | None:
    """``name>=X,<Y`` -> ``name==X`` (extras dropped: constraints take bare names); None without
    a lower bound."""
    m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", requirement)
    if not m:
        return None
    name, spec = m.group(1), m.group(3)
    low = re.search(r"(?:>=|==|~=)\s*([0-9][^,;\s]*)", spec)
    return f"{name}=={low.group(1)}" if low else None


def main(argv: list[str]) -> int:
    for req in requirements(os.path.join(HERE, "..", "setup.cfg"), argv):
        pin = lowest(req)
        if pin:
            print(pin)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
