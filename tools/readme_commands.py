"""Prints the commands of the README's "Quick start" block, one a line, comments dropped: what
`.ci/run` runs, so that CI runs exactly what a newcomer is told to (tests/test_ci.py checks it).

    python tools/readme_commands.py README.md
"""

from __future__ import annotations

import sys


def quick_start_commands(readme_text: str) -> list[str]:
    """The lines of the first fenced block under the ``## Quick start`` heading, comments dropped."""
    section = readme_text.split("\n## Quick start", 1)[1]
    block = section.split("```", 2)[1]
    lines = block.splitlines()[1:]  # the first line is the fence's language
    return [line.split("  #", 1)[0].strip() for line in lines if line.strip() and not line.startswith("#")]


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "README.md") as f:
        print("\n".join(quick_start_commands(f.read())))
