"""tfseg's Keras callbacks as classes of their own (issue 31 item 5), each against a hand-computed
expectation, and the public layer walk that replaced Keras's private ``_flatten_layers``."""

import math
import os

import keras
import numpy as np
import pytest

from tfseg.fit.backup import AtomicCheckpoint, CrashSafeBackup
from tfseg.fit.callbacks import HealthGuard, ResumableEarlyStopping, SetLearningRate, TrainingDiverged
from tfseg.fit.history import HistoryWriter, read_csv_rows
from tfseg.models import MODELS, build_model
from tfseg.models.norm import all_layers, batch_norm_layers, is_batch_norm


def _tiny_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


@pytest.mark.parametrize("mode,values,saved_at", [
    ("min", [3.0, 2.0, 2.5, 1.0, 1.0], [0, 1, 3]),  # strictly better only
    ("max", [0.1, 0.3, 0.2, 0.4], [0, 1, 3]),
])
def test_atomic_checkpoint_writes_the_best_epochs_whole(tmp_path, mode, values, saved_at):
    model = _tiny_model()
    path = str(tmp_path / "best.keras")
    cb = AtomicCheckpoint(path, monitor="val_x", mode=mode, save_best_only=True)
    cb.set_model(model)
    written = []
    for epoch, value in enumerate(values):
        model.layers[-1].kernel.assign(np.full((4, 1), epoch, np.float32))  # the epoch's weights
        before = os.path.getmtime(path) if os.path.exists(path) else None
        cb.on_epoch_end(epoch, {"val_x": value})
        if os.path.exists(path) and os.path.getmtime(path) != before:
            written.append(epoch)
            saved = keras.saving.load_model(path, compile=False)
            assert float(saved.layers[-1].kernel.numpy()[0, 0]) == epoch
    assert written == saved_at
    assert os.listdir(tmp_path) == ["best.keras"]  # no temporary file left


def test_atomic_checkpoint_resumes_from_a_threshold_and_every_epoch_without_best_only(tmp_path):
    model = _tiny_model()
    cb = AtomicCheckpoint(str(tmp_path / "best.keras"), monitor="val_x", mode="min", save_best_only=True,
                          initial_value_threshold=1.5)
    cb.set_model(model)
    cb.on_epoch_end(0, {"val_x": 2.0})  # worse than the resumed run's best
    assert not os.path.exists(tmp_path / "best.keras")
    last = AtomicCheckpoint(str(tmp_path / "last.keras"))
    last.set_model(model)
    last.on_epoch_end(0, {})
    assert os.path.exists(tmp_path / "last.keras")


def test_history_writer_rewrites_every_row(tmp_path):
    path = str(tmp_path / "history.csv")
    writer = HistoryWriter(path, [{"epoch": "0", "loss": "1.0"}])
    writer.on_epoch_end(1, {"loss": 0.5, "val_mean_iou": 0.25})
    rows = read_csv_rows(path)
    assert rows == [{"epoch": "0", "loss": "1.0", "val_mean_iou": ""},
                    {"epoch": "1", "loss": "0.5", "val_mean_iou": "0.25"}]


def test_health_guard_stops_on_the_first_non_finite_value():
    guard = HealthGuard()
    guard.set_model(_tiny_model())
    guard.on_epoch_begin(2)
    guard.on_train_batch_end(0, {"loss": 1.0})
    with pytest.raises(TrainingDiverged, match="loss nan at step 4 of epoch 3"):
        guard.on_train_batch_end(3, {"loss": math.nan})
    with pytest.raises(TrainingDiverged, match="val_loss inf at the end of epoch 3"):
        guard.on_epoch_end(2, {"val_loss": math.inf})


def test_resumable_early_stopping_starts_from_the_replayed_patience():
    cb = ResumableEarlyStopping(state=(0.5, 2), monitor="val_loss", mode="min", patience=3)
    model = _tiny_model()
    cb.set_model(model)
    cb.on_train_begin()
    assert (cb.best, cb.wait) == (0.5, 2)
    cb.on_epoch_end(5, {"val_loss": 0.6})  # a third epoch without improvement: patience spent
    assert model.stop_training


def test_backup_and_learning_rate_callbacks_restore_state(tmp_path):
    from tfseg.fit.backup import save

    model = _tiny_model()
    model.fit(np.ones((4, 4)), np.ones((4, 1)), epochs=1, verbose=0)
    trained = [w.copy() for w in model.get_weights()]
    save(model, str(tmp_path / "backup"), 1)
    fresh = _tiny_model()
    fresh.optimizer.build(fresh.trainable_variables)
    backup = CrashSafeBackup(str(tmp_path / "backup"))
    backup.set_model(fresh)
    backup.on_train_begin()
    for a, b in zip(fresh.get_weights(), trained):
        np.testing.assert_array_equal(a, b)
    lr = SetLearningRate(0.01)
    lr.set_model(fresh)
    lr.on_train_begin()
    assert float(fresh.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_public_layer_walk_finds_what_keras_private_walk_finds(name):
    """all_layers (each model's public ``layers``, nested models included) against Keras's private
    ``_flatten_layers``, on every architecture: the batch-norm and dropout layers bnstats needs."""
    shape = (32, 32, 3) if name != "unet" else (16, 16, 16, 1)
    if name == "mobilenetv2_unet":
        shape = (32, 32, 3)
    model = build_model(name, input_shape=shape, num_classes=3)
    ours = {id(layer) for layer in all_layers(model)}
    keras_own = {id(layer) for layer in model._flatten_layers(include_self=False)}  # the oracle, in a test only
    assert ours == keras_own
    assert len(batch_norm_layers(model)) == sum(is_batch_norm(layer) for layer in model._flatten_layers())


def test_a_keras_outside_the_supported_range_is_refused_in_one_line():
    """The one private Keras internal left (the multi-worker trainer patch, tfseg/runtime.py) is
    guarded by the range setup.cfg allows, read from the installed metadata."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    from tfseg import runtime
    from tfseg.errors import TfsegError

    (spec,) = [Requirement(r).specifier for r in requires("tfseg") if Requirement(r).name == "keras"]
    runtime.check_keras_version()  # the installed Keras is in range
    assert keras.__version__ in spec
    with pytest.raises(TfsegError, match=r"keras 3\.16\.0: multi-worker training .* keras<3\.16,>=3\.12"):
        runtime.check_keras_version("3.16.0")
    with pytest.raises(TfsegError):
        runtime.check_keras_version("3.11.3")
