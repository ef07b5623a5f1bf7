"""``tfseg plan``: a dataset fingerprint and rules that turn it into a training recipe.

One job a module:
  fingerprint  what a converted dataset looks like: sizes, intensities, classes, objects, symmetry;
  rules        make_plan: each choice derived from the fingerprint with its reason (the rules are
               described there);
  run          run_plan: fingerprint, rules, plan.yaml.

Command line::

    tfseg plan --data DATA [--budget 30m] [--output plan.yaml] [--flips auto]
    tfseg fit --config plan.yaml --output RUN
"""

from tfseg.plan.fingerprint import fingerprint  # noqa: F401
from tfseg.plan.rules import (  # noqa: F401
    DEFAULT_BUDGET,
    FLIP_CHOICES,
    TARGET_EPOCHS,
    choose_flips,
    depth_for,
    make_plan,
    receptive_field,
)
from tfseg.plan.run import format_table, plan_document, run_plan  # noqa: F401
