"""The fit's tf.data inputs: the endless training dataset and the validation dataset repeated one
pass per epoch (:func:`validation_plan` rounds the pass for several replicas), sharded by data
for multi-worker runs. TensorFlow is imported inside.
"""

from __future__ import annotations

from tfseg.fit.checks import FitPlan
from tfseg.fit.config import FitConfig


def validation_plan(count: int, global_batch: int, replicas: int) -> tuple[int, int]:
    """(examples per validation pass, validation batch) for a split of ``count`` examples.

    On one replica: every example once, in global batches. On several, every batch must be a
    multiple of the replicas: Keras averages the first validation batch over the replicas to
    build the model (unequal shares fail), and a replica handed an empty share of the last batch
    fails inside the convolution kernels. The pass is therefore rounded up to a multiple of the
    replicas by cycling from the first example (at most replicas - 1 examples counted twice).
    """
    if replicas <= 1:
        return count, global_batch
    total = max(replicas, -(-count // replicas) * replicas)
    return total, min(global_batch, total)


def make_datasets(cfg: FitConfig, plan: FitPlan, global_batch: int, multi_worker: bool,
                  val_plan: tuple[int, int] = (0, 0)):
    """(train, validation or None): batched, endless tf.data datasets of (images, masks).

    ``val_plan`` is :func:`validation_plan`'s (examples per pass, batch) for the validation split.
    """

    from tfseg.data import make_dataset
    from tfseg.data.input import shard_across_workers
    from tfseg.rundir import size_key

    common = {size_key(plan.info.ndim): plan.size}
    train = make_dataset(
        cfg.data,
        "train",
        batch_size=global_batch,
        training=True,
        augment=cfg.augment,
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        cache=cfg.cache,
        repeat=-1,
        **common,
    )
    val = None
    if plan.validation_split:
        # Repeated after batching, with validation_steps = one pass: Keras keeps one validation
        # iterator for the whole fit, and a finite one ran dry at the third epoch on several
        # replicas (StopIteration from input_lib). Each epoch now validates on exactly one pass.
        count = int(plan.info.splits[plan.validation_split].get("count", 0))
        total, val_batch = val_plan
        if total != count:  # several replicas: a pass rounded up to a multiple of them (see validation_plan)
            val = make_dataset(cfg.data, plan.validation_split, batch_size=1, training=False, **common)
            val = val.unbatch().repeat().take(total).batch(val_batch).repeat()
        else:
            val = make_dataset(
                cfg.data, plan.validation_split, batch_size=val_batch, training=False, **common
            ).repeat()
    if multi_worker:
        train = shard_across_workers(train)
        val = shard_across_workers(val) if val is not None else None
    return train, val
