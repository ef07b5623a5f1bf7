"""The weights' exponential moving average (``fit.ema``): what validation, checkpoints and
backups see, against an average computed independently in numpy from the raw weights."""

import keras
import numpy as np
import pytest

from tfseg.fit.callbacks import ema_callbacks


class _Record(keras.callbacks.Callback):
    def __init__(self, log, hook):
        super().__init__()
        self.log, self.hook = log, hook

    def _take(self, *_, **__):
        self.log.append([v.numpy().copy() for v in self.model.trainable_variables])

    def __getattribute__(self, name):
        if name == object.__getattribute__(self, "hook"):
            return object.__getattribute__(self, "_take")
        return object.__getattribute__(self, name)


def test_validation_and_checkpoints_see_the_average_and_the_backup_the_raw_weights():
    keras.utils.set_random_seed(0)
    momentum = 0.8
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=momentum), loss="mse")
    x = np.random.default_rng(0).normal(size=(24, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(24, 2)).astype("float32")
    raw_steps, at_test, at_checkpoint, at_backup = [], [], [], []
    ema_in, ema_out = ema_callbacks()
    callbacks = [ema_in, _Record(at_test, "on_test_begin"), _Record(raw_steps, "on_train_batch_end"),
                 _Record(at_checkpoint, "on_epoch_end"), ema_out, _Record(at_backup, "on_epoch_end")]
    model.fit(x, y, batch_size=8, epochs=3, validation_data=(x, y), callbacks=callbacks, verbose=0, shuffle=False)

    # Keras's EMA: the average starts at the first step's weights, then avg = m avg + (1 - m) w.
    average, expected = None, []
    for step, weights in enumerate(raw_steps):
        average = [w.copy() for w in weights] if average is None else [
            momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
        if (step + 1) % 3 == 0:  # 3 steps an epoch
            expected.append(average)
    assert len(at_test) == len(at_checkpoint) == len(at_backup) == 3
    for epoch in range(3):
        for got, want in zip(at_test[epoch], expected[epoch]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(at_checkpoint[epoch], expected[epoch]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        raw = raw_steps[3 * epoch + 2]
        for got, want in zip(at_backup[epoch], raw):  # Keras swaps by adding and subtracting
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(at_backup[epoch][0], at_checkpoint[epoch][0])


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): a 2-epoch fit, 9 s
def test_an_ema_run_without_validation_publishes_its_last_average_once(tmp_path):
    """Without validation an EMA run publishes its last epoch's average: `checkpoints/last.keras`,
    which model.keras links to; the backup keeps the raw weights it resumes from."""
    import os

    from helpers import fit, tiny_fit_config, write_2d_dataset

    from tfseg import rundir

    data = write_2d_dataset(str(tmp_path / "sq"), {"train": 8})
    out = fit(tiny_fit_config(data, str(tmp_path / "run"), validation_split="", ema=0.5, epochs=2))
    last = os.path.join(out, "checkpoints", "last.keras")
    assert os.stat(os.path.join(out, "model.keras")).st_ino == os.stat(last).st_ino
    published = rundir.load_model(out)
    raw = rundir.load_model(out)
    raw.load_weights(os.path.join(out, "backup", "latest.weights.h5"))
    kernels = [(p, r) for p, r in zip(published.trainable_weights, raw.trainable_weights) if "kernel" in p.path]
    assert kernels and any(not np.allclose(np.asarray(p), np.asarray(r)) for p, r in kernels)
    assert not os.path.exists(os.path.join(out, "checkpoints", "best.keras"))
