"""``tfseg plan`` itself: :func:`run_plan` fingerprints a dataset, applies the rules and writes
plan.yaml, a pipeline that ``tfseg fit --config`` and ``tfseg run`` read."""

from __future__ import annotations

import re

from tfseg.config import parse_duration
from tfseg.errors import TfsegError
from tfseg.io import fs
from tfseg.plan.fingerprint import fingerprint
from tfseg.plan.rules import DEFAULT_BUDGET, FLIP_CHOICES, make_plan


def format_table(choices) -> str:
    """The printed table: choice | value | reason."""
    rows = [("choice", "value", "reason")] + [(str(a), str(b), str(c)) for a, b, c in choices]
    w0 = max(len(r[0]) for r in rows)
    w1 = min(40, max(len(r[1]) for r in rows))
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def plan_document(fp: dict, plan: dict) -> dict:
    """plan.yaml's content: a pipeline (``dataset``, ``fit``, ``evaluate``, ``export``) plus the
    fingerprint and the reasons, so ``tfseg fit --config`` and ``tfseg run`` read it."""
    doc = {"dataset": fp["name"]}
    args = fp.get("conversion_args") or {}
    convert = dict(args.get("layout_options") or {})
    for key in ("split", "image_size", "compression"):
        if args.get(key):
            convert[key] = "x".join(map(str, args[key])) if key == "image_size" else args[key]
    if convert:  # `tfseg run plan.yaml --input RAW` converts the way this dataset was converted
        doc["convert"] = convert
    doc.update({
        "fit": plan["fit"],
        "evaluate": plan["evaluate"],
        "export": {"name": re.sub(r"[^A-Za-z0-9_.-]", "_", fp["name"] or "model") or "model"},
        "reasons": {key: reason for key, _, reason in plan["choices"]},
        "estimate": plan["estimate"],
        "fingerprint": fp,
    })
    return doc


def run_plan(data_dir: str, *, budget: str = DEFAULT_BUDGET, output: str | None = None, flips: str = "auto",
             sample: int = 64, measure: bool = True) -> dict:
    """``tfseg plan``: fingerprint, rules, plan.yaml (written when ``output`` is given).

    Returns:
      The plan document (see :func:`plan_document`) with ``table`` (the printed text).
    """
    import yaml

    parse_duration(budget)
    if flips not in FLIP_CHOICES:
        raise TfsegError(f"--flips {flips!r}: choose one of {', '.join(FLIP_CHOICES)}")
    if output and fs.normalize(output).startswith(fs.normalize(data_dir).rstrip("/") + "/"):
        raise TfsegError(f"--output {output}: inside --data {data_dir}; write the plan elsewhere")
    if output and fs.isdir(output):
        raise TfsegError(f"--output {output}: is a folder; give the plan's file name (e.g. plan.yaml)")
    fp = fingerprint(data_dir, sample=sample)
    plan = make_plan(fp, budget=budget, flips=flips, measure=measure)
    doc = plan_document(fp, plan)
    if output:
        text = ("# tfseg plan: an automatic recipe from the dataset's fingerprint (tfseg/plan/rules.py has the rules).\n"
                "# tfseg fit --config THIS --output RUN   |   tfseg run THIS --input RAW --workdir W\n"
                + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110))
        fs.atomic_write_text(output, text)
    doc["table"] = format_table(plan["choices"])
    return doc
