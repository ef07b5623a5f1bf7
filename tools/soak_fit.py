"""Soak benchmark: fits killed with SIGKILL at random moments and re-run until done (issue 19.7).

Each of N fits (tiny U-Net, the Carvana sample) is started as a user starts it, ``tfseg fit ...
--output RUN_i``, and killed with SIGKILL after a random delay drawn uniformly from 0 to the
wall time of an uninterrupted fit measured first in the same invocation (start-up, training,
backups and publishing all fall in that range). The same command is then run again; each re-run
is itself killed at a random moment with probability ``--rekill``, otherwise left to finish.

Every fit must end with:

- a re-run that exits 0 with no traceback in its output;
- ``RUN_i/model.keras`` published, loadable, every weight finite;
- ``history.csv`` holding exactly one row per epoch (0 .. E-1), and run.json ``completed_epochs = E``;
- no lock, staging folder or temporary file of tfseg left in the work folder.

Where each kill landed is read from the run folder it left (nothing yet, an epoch under way, a
backup's temporary files, the model published); the lines a re-run prints when it falls back on
an older backup or starts over are counted. The table gives, per fit: kills, re-runs, where the
kills landed, fallbacks, the fit's total wall time and its ratio to the uninterrupted fit.

Usage::

    python tools/soak_fit.py                       # 20 fits, 3 epochs, seed 0
    python tools/soak_fit.py --fits 5 --epochs 2 --rekill 0.3 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FIT = ["--model", "unet", "--batch-size", "4", "--image-size", "32x32", "--set", "model_kwargs.base_filters=4",
       "--set", "model_kwargs.depth=2", "--set", "verbose=0", "--set", "tensorboard=false"]
LEFTOVER_PREFIXES = (".tfseg-lock-", ".tfseg-staging-", ".tfseg-tmp-", ".tfseg-model.")


def tfseg(*argv: str) -> list[str]:
    return [sys.executable, "-m", "tfseg.cli", *argv]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TFSEG_TEST_") and k != "TF_CONFIG"}
    e["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return e


def run_once(argv: list[str], kill_after: float | None, log) -> tuple[str, float, str]:
    """Runs ``argv``; kills it with SIGKILL after ``kill_after`` s unless it ended first.

    Returns:
      ("killed" | "exit N", wall seconds, its output).
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    try:
        out, _ = proc.communicate(timeout=kill_after)
        outcome = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        outcome = "killed"
    wall = time.monotonic() - start
    log.write(f"$ {' '.join(argv)}  # {outcome} after {wall:.1f} s\n{out}\n")
    return outcome, wall, out


def history_epochs(run_dir: str) -> list[int]:
    path = os.path.join(run_dir, "history.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def where_killed(run_dir: str, epochs: int) -> str:
    """What the run folder a kill left says about the moment it hit."""
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        return "start-up"
    if os.path.isfile(os.path.join(run_dir, "model.keras")):
        completed = json.load(open(os.path.join(run_dir, "run.json"))).get("completed_epochs")
        return "after publishing" if completed == epochs else "model.keras published, run.json not yet"
    tmp = [n for sub in ("backup", "checkpoints") if os.path.isdir(os.path.join(run_dir, sub))
           for n in os.listdir(os.path.join(run_dir, sub)) if n.startswith(".tfseg-tmp-")]
    if tmp:
        return "writing a backup/checkpoint"
    if any(n.startswith(".tfseg-model.") for n in os.listdir(run_dir)):
        return "publishing"
    done = len(history_epochs(run_dir))
    return "publishing" if done >= epochs else f"epoch {done + 1}"


def leftovers(root: str) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if n.startswith(LEFTOVER_PREFIXES)]


def verify(run_dir: str, epochs: int) -> list[str]:
    """Everything wrong with a finished run folder ([] when it is whole)."""
    import numpy as np

    problems = []
    path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(path):
        return ["no model.keras"]
    import keras

    import tfseg.models  # noqa: F401 - registers tfseg's layers for loading

    model = keras.saving.load_model(path, compile=False)
    bad = [w.path for w in model.weights if not np.isfinite(np.asarray(w)).all()]
    if bad or not model.weights:
        problems.append(f"non-finite weights: {bad[:3]}")
    seen = history_epochs(run_dir)
    if seen != list(range(epochs)):
        problems.append(f"history.csv epochs {seen}, expected 0..{epochs - 1}")
    completed = json.load(open(os.path.join(run_dir, "run.json"))).get("completed_epochs")
    if completed != epochs:
        problems.append(f"run.json completed_epochs {completed}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rekill", type=float, default=0.5, help="chance that a re-run is killed too")
    parser.add_argument("--max-attempts", type=int, default=12, help="per fit; the last one is never killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="a new or empty folder, kept (default: a temporary folder, removed "
                                          "at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    if args.workdir and os.path.isdir(args.workdir) and os.listdir(args.workdir):
        # Another soak may be running there: its runs, its log are not ours to touch.
        parser.error(f"--workdir {args.workdir}: not empty; choose a new or empty folder")
    work = args.workdir or tempfile.mkdtemp(prefix="tfseg-soak-")
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, "soak.log"), "x")
    data = os.path.join(work, "data")
    try:
        for cmd in (tfseg("sample", "--dataset", "carvana", "--output", os.path.join(work, "raw"), "--count", "16"),
                    tfseg("convert", "--dataset", "carvana", "--input", os.path.join(work, "raw"), "--output", data)):
            subprocess.run(cmd, check=True, capture_output=True, env=env())

        def command(run_dir: str) -> list[str]:
            return tfseg("fit", "--data", data, "--output", run_dir, *FIT, "--epochs", str(args.epochs))

        # The baseline: one uninterrupted fit; its wall time is the range of the kill delays.
        baseline_dir = os.path.join(work, "baseline")
        outcome, baseline, out = run_once(command(baseline_dir), None, log)
        if outcome != "exit 0" or verify(baseline_dir, args.epochs):
            print(f"the uninterrupted fit failed ({outcome}): {verify(baseline_dir, args.epochs)}\n{out}")
            return 1
        print(f"uninterrupted fit: {baseline:.1f} s wall; kills drawn uniformly in [0, {baseline:.1f}] s")
        print(f"{'fit':>3} | {'kills':>5} | {'re-runs':>7} | {'fallbacks':>9} | {'time s':>6} | {'x uninterrupted':>15} |"
              f" where the kills landed | result")
        print("|".join(["-" * 4, "-" * 7, "-" * 9, "-" * 11, "-" * 8, "-" * 17, "-" * 24, "-" * 10]))

        rows, failures = [], 0
        started_all = time.monotonic()
        for i in range(1, args.fits + 1):
            run_dir = os.path.join(work, f"run-{i:02d}")
            kills, reruns, fallbacks, landed, problems = 0, 0, 0, [], []
            t0 = time.monotonic()
            attempt = 0
            while attempt < args.max_attempts:
                last = attempt == args.max_attempts - 1
                kill = attempt == 0 or (not last and rng.random() < args.rekill)
                delay = rng.uniform(0, baseline) if kill else None
                outcome, _, out = run_once(command(run_dir), delay, log)
                if attempt == 0 and outcome == "exit 0":
                    # It finished before its kill: this fit starts again, to be killed once at least.
                    shutil.rmtree(run_dir)
                    continue
                if attempt:
                    reruns += 1
                    fallbacks += len(re.findall(r"backup cannot be read", out))
                    if outcome != "killed" and "Traceback" in out:
                        problems.append(f"a traceback in re-run {reruns}")
                attempt += 1
                if outcome == "killed":
                    kills += 1
                    landed.append(where_killed(run_dir, args.epochs))
                    continue
                if outcome != "exit 0":
                    problems.append(f"{outcome}: {[x for x in out.splitlines() if x.startswith('error:')][:1]}")
                break
            problems += verify(run_dir, args.epochs)
            problems += [f"left {p}" for p in leftovers(work)]
            wall = time.monotonic() - t0
            failures += bool(problems)
            result = "ok" if not problems else "FAIL: " + "; ".join(problems)
            landing = ", ".join(landed)
            rows.append((kills, reruns, fallbacks, wall))
            print(f"{i:>3} | {kills:>5} | {reruns:>7} | {fallbacks:>9} | {wall:>6.1f} | {wall / baseline:>15.2f} |"
                  f" {landing} | {result}", flush=True)
        total = time.monotonic() - started_all
        kills = sum(r[0] for r in rows)
        reruns = sum(r[1] for r in rows)
        fallbacks = sum(r[2] for r in rows)
        print(f"total: {kills} kills, {reruns} re-runs, {fallbacks} backup fallback line(s), {total:.0f} s "
              f"({total / len(rows) / baseline:.2f}x the uninterrupted fit per fit)")
        verdict = ("PASS" if not failures else "FAIL")
        print(f"verdict: {verdict}: {len(rows) - failures}/{len(rows)} fits killed at random moments ended with a "
              f"published model.keras, finite weights and one history row per epoch ({args.epochs})")
        return 1 if failures else 0
    finally:
        log.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work} (log: {os.path.join(work, 'soak.log')})")


if __name__ == "__main__":
    sys.exit(main())
