"""What CI runs is what a newcomer is told to run (issue 30): the README's quick start, read from
the README itself, and the lowest versions setup.cfg allows, derived from setup.cfg itself."""

import configparser
import os
import subprocess
import sys

from packaging.requirements import Requirement

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "tools"))

from lowest_constraints import lowest, requirements  # noqa: E402
from readme_commands import quick_start_commands  # noqa: E402


def test_ci_runs_the_readmes_two_commands_as_they_stand():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = quick_start_commands(f.read())
    assert len(commands) == 2
    demo, tests = commands
    assert demo.startswith("pip install -e .") and demo.endswith("tfseg demo")
    assert tests.startswith('pip install -e ".[test]"') and "python -m pytest" in tests and '"not slow"' in tests
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "tools/readme_commands.py README.md" in ci
    assert 'bash -c "${quick[0]}"' in ci and 'bash -c "${quick[1]}"' in ci
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "readme_commands.py"),
                          os.path.join(ROOT, "README.md")], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == commands


def test_lowest_constraints_pin_every_lower_bound_of_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    reqs = [Requirement(line.split("#")[0].strip())
            for line in cfg["options"]["install_requires"].splitlines() if line.split("#")[0].strip()]
    pins = dict(p.split("==") for p in map(lowest, requirements(os.path.join(ROOT, "setup.cfg"))) if p)
    assert set(pins) == {r.name for r in reqs}
    for r in reqs:
        (low,) = [s.version for s in r.specifier if s.operator in (">=", "==", "~=")]
        assert pins[r.name] == low
        assert r.specifier.contains(low), f"{r}: its own lower bound is outside it"
    assert lowest("keras>=3.12,<3.16") == "keras==3.12" and lowest("apache-beam[tfrecord]>=2.69") == "apache-beam==2.69"
    assert lowest("pytest") is None
