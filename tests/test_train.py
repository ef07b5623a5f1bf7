"""Tests of the fit stage (tfseg.fit through tfseg.fit, tfseg.runtime, `tfseg fit`).

Tiny converted datasets come from tests/helpers.py (shared with the other modules that fit).
Paths that need a fresh TensorFlow (logical CPU devices, kill -9) run in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import TESTS_DIR, fit, history_rows, read_split_numpy, tiny_fit_config, write_2d_dataset, write_3d_dataset

from tfseg import runtime
from tfseg.errors import TfsegError

# --------------------------------------------------------------------------------------------
# Helpers (the datasets, configs and history readers shared with other modules: tests/helpers.py)
# --------------------------------------------------------------------------------------------


def run_script(script: str, *, env=None, timeout=240) -> subprocess.CompletedProcess:
    """Runs python code in a fresh interpreter (fresh TensorFlow) with tests/ importable."""
    full_env = dict(os.environ, PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


def numpy_binary_dice(probs: np.ndarray, masks: np.ndarray) -> float:
    pred = probs[..., 0] > 0.5
    true = masks == 1
    return float(2 * (pred & true).sum() / (pred.sum() + true.sum()))


@pytest.fixture(scope="module")
def squares_data(tmp_path_factory):
    return write_2d_dataset(str(tmp_path_factory.mktemp("squares")), {"train": 16, "val": 8})


# --------------------------------------------------------------------------------------------
# Config (no TensorFlow)
# --------------------------------------------------------------------------------------------


def test_fit_config_defaults_types_and_unknown_keys():
    from tfseg.fit import FitConfig

    cfg = FitConfig.from_dict({"fit": {"data": "d", "model": "unet", "output": "o", "epochs": "3",
                                       "image_size": "64x32", "jit_compile": "auto", "augment": '{"hflip": 0.5}'}})
    assert (cfg.epochs, cfg.image_size, cfg.augment, cfg.batch_size) == (3, (64, 32), {"hflip": 0.5}, 8)
    with pytest.raises(TfsegError, match="unknown key 'epoch'"):
        FitConfig.from_dict({"data": "d", "model": "unet", "output": "o", "epoch": 3})
    with pytest.raises(TfsegError, match="optimizer = 'rmsprop' is not one of adam, adamw, sgd, adadelta"):
        FitConfig.from_dict({"data": "d", "model": "unet", "output": "o", "optimizer": "rmsprop"})
    with pytest.raises(TfsegError, match="epochs = 'many'"):
        FitConfig.from_dict({"data": "d", "model": "unet", "output": "o", "epochs": "many"})
    with pytest.raises(TfsegError, match="'output' is required"):
        FitConfig.from_dict({"data": "d", "model": "unet"})


@pytest.mark.parametrize("values, message", [
    (dict(learning_rate=0), "fit config: learning_rate must be > 0, got 0"),
    (dict(learning_rate="nan"), "fit config: learning_rate must be a finite number, got nan"),
    (dict(ema=1.0), r"fit config: ema must be in \[0, 1\) \(0 turns it off\), got 1"),
    (dict(momentum=-0.1), r"fit config: momentum must be in \[0, 1\), got -0.1"),
    (dict(verbose=3), r"fit config: verbose must be in \[0, 2\], got 3"),
    (dict(epochs=0), r"fit config: epochs must be in \[1, 100000\], got 0"),
    (dict(batch_size=10**6), r"fit config: batch_size must be in \[1, 65536\], got 1e\+06"),
    (dict(steps_per_epoch=0), "fit config: steps_per_epoch must be >= 1, got 0"),
    (dict(peer_timeout=-1), r"fit config: peer_timeout must be > 0 \(seconds\), got -1"),
    (dict(jit_compile="maybe"), "fit config: jit_compile = 'maybe' is not one of True, False, auto"),
    (dict(schedule="linear"), "fit config: schedule = 'linear' is not one of none, cosine, plateau"),
    (dict(image_size="64"), None),  # a square size
    (dict(image_size="64xx"), "fit config: image_size: size '64xx': expected HxW with positive integers"),
    (dict(augment="{hflip"), "fit config: augment: not valid JSON"),
    (dict(augment=[1]), r"fit config: augment = \[1\] is not a valid mapping"),
    (dict(budget="soon"), "fit config: budget 'soon': expected a duration"),
])
def test_fit_config_checks_come_from_its_fields(values, message):
    from tfseg.fit import FitConfig

    base = {"data": "d", "model": "unet", "output": "o"}
    if message is None:
        assert FitConfig.from_dict({**base, **values}).image_size == (64, 64)
        return
    with pytest.raises(TfsegError, match="^" + message) as e:
        FitConfig.from_dict({**base, **values})
    assert "\n" not in str(e.value)


def test_fit_config_reads_none_as_the_default_and_lowers_names():
    from tfseg.fit import FitConfig

    cfg = FitConfig.from_dict({"data": "d", "model": "unet", "output": "o", "epochs": None, "model_kwargs": None,
                               "optimizer": "AdamW", "schedule": "Cosine", "jit_compile": "FALSE",
                               "validation_split": "", "budget": ""})
    assert (cfg.epochs, cfg.model_kwargs, cfg.optimizer, cfg.schedule, cfg.jit_compile) == (10, {}, "adamw", "cosine",
                                                                                              False)
    assert cfg.validation_split is None and cfg.budget is None
    assert FitConfig.from_dict(cfg.to_json()) == cfg


def test_build_config_precedence_file_then_options_then_set(tmp_path):
    from tfseg.fit import build_config

    path = tmp_path / "p.yaml"
    path.write_text("dataset: x\nfit:\n  model: unet\n  epochs: 5\n  batch_size: 4\n  model_kwargs: {depth: 3}\n")
    cfg = build_config(str(path), {"epochs": 7, "loss": None}, ["fit.batch_size=2", "model_kwargs.base_filters=4"])
    assert cfg == {"model": "unet", "epochs": 7, "batch_size": 2, "model_kwargs": {"depth": 3, "base_filters": 4}}
    flat = tmp_path / "f.json"
    flat.write_text(json.dumps({"model": "dense_unet", "epochs": 1}))
    assert build_config(str(flat), {}, ["epochs=9"]) == {"model": "dense_unet", "epochs": 9}


def test_precision_and_jit_selection(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu avx512f amx_bf16 amx_tile\n")
    bf16 = tmp_path / "bf16"
    bf16.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert runtime.resolve_precision("auto", num_gpus=0, cpuinfo=str(plain)) == "float32"
    assert runtime.resolve_precision("auto", num_gpus=0, cpuinfo=str(amx)) == "mixed_bfloat16"
    assert runtime.resolve_precision("auto", num_gpus=0, cpuinfo=str(bf16)) == "mixed_bfloat16"
    assert runtime.resolve_precision("auto", num_gpus=1, cpuinfo=str(plain)) == "mixed_float16"
    assert runtime.resolve_precision("float32", num_gpus=1) == "float32"
    with pytest.raises(TfsegError, match="half"):
        runtime.resolve_precision("half", num_gpus=0)
    assert runtime.resolve_jit_compile("auto", num_gpus=0) is False
    assert runtime.resolve_jit_compile("auto", num_gpus=2) is True
    assert runtime.resolve_jit_compile(True, num_gpus=0) is True


def test_chief_selection_from_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert runtime.is_chief()
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not runtime.is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert runtime.is_chief()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(TfsegError, match="TF_CONFIG"):
        runtime.tf_config()


def test_trim_history_keeps_one_row_per_finished_epoch(tmp_path):
    from tfseg.fit import trim_history

    (tmp_path / "history.csv").write_text("epoch,loss\n0,0.9\n1,0.8\n1,0.7\n2,0.6\n")
    rows = trim_history(str(tmp_path), 2)
    assert [(r["epoch"], r["loss"]) for r in rows] == [("0", "0.9"), ("1", "0.7")]
    assert (tmp_path / "history.csv").read_text() == "epoch,loss\n0,0.9\n1,0.7\n"
    assert trim_history(str(tmp_path), 0) == [] and not (tmp_path / "history.csv").exists()


def _tiny_compiled_model():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


@pytest.mark.parametrize("mode,values", [
    ("max", [0.1, 0.3, 0.2, 0.25, 0.31, 0.3, 0.29, 0.1, 0.5, 0.4]),
    ("min", [1.0, 0.8, 0.9, 0.85, 0.7, 0.7, 0.75, 0.9, 0.95, 0.6]),
])
def test_replay_patience_counts_like_keras(mode, values):
    import keras

    from tfseg.fit import replay_patience

    model = _tiny_compiled_model()
    stop = keras.callbacks.EarlyStopping(monitor="m", mode=mode, patience=100)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="m", mode=mode, patience=2, factor=0.5, verbose=0)
    for cb in (stop, plateau):
        cb.set_model(model)
        cb.on_train_begin()
    for epoch, v in enumerate(values):
        stop.on_epoch_end(epoch, {"m": v})
        plateau.on_epoch_end(epoch, {"m": v})
        assert replay_patience(values[: epoch + 1], mode, 0) == (stop.best, stop.wait), epoch
        assert replay_patience(values[: epoch + 1], mode, 2) == (plateau.best, plateau.wait), epoch


def test_resumed_early_stopping_keeps_its_patience(tmp_path):
    from tfseg.fit import FitConfig
    from tfseg.fit.callbacks import make_callbacks

    # Two epochs logged without improvement since the best (0.5): with patience 3, the first
    # non-improving epoch after the resume stops, as it would have without the restart.
    rows = [{"epoch": str(e), "val_iou": str(v)} for e, v in enumerate([0.2, 0.5, 0.4, 0.45])]
    cfg = FitConfig(early_stopping=3, tensorboard=False)
    cbs = make_callbacks(str(tmp_path), cfg, "val_iou", "max", rows, validation=True)
    stop = next(cb for cb in cbs if "EarlyStopping" in type(cb).__name__)
    model = _tiny_compiled_model()
    stop.set_model(model)
    stop.on_train_begin()
    assert (stop.best, stop.wait) == (0.5, 2)
    stop.on_epoch_end(4, {"val_iou": 0.49})
    assert model.stop_training
    # An improvement instead resets the count.
    model.stop_training = False
    stop.on_train_begin()
    stop.on_epoch_end(4, {"val_iou": 0.6})
    assert not model.stop_training and (stop.best, stop.wait) == (0.6, 0)


# --------------------------------------------------------------------------------------------
# Bad input, reported before training
# --------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_error_before_training(tmp_path, squares_data):
    out = str(tmp_path / "run")
    cases = [
        (tiny_fit_config(str(tmp_path), out), "no dataset.json"),
        (tiny_fit_config(squares_data, out, patch_size="16x16x16", image_size=None), "2D dataset"),
        (tiny_fit_config(squares_data, out, num_classes=3), "num_classes=2"),
        (tiny_fit_config(squares_data, out, image_size="30x0"), "positive integers"),
        (tiny_fit_config(squares_data, out, model="nope"), "unknown model"),
        (tiny_fit_config(squares_data, out, batch_size=32), "fewer than one global batch"),
        (tiny_fit_config(squares_data, out, validation_split="test"), "no split 'test'"),
        (tiny_fit_config(squares_data, squares_data), "same folder as --data"),
    ]
    for cfg, message in cases:
        with pytest.raises(TfsegError, match=message) as e:
            fit(cfg)
        assert "\n" not in str(e.value)
        assert not os.path.exists(out)


def test_model_of_the_wrong_dimensionality_is_refused(tmp_path):
    data = write_3d_dataset(str(tmp_path / "cubes"))
    cfg = tiny_fit_config(data, str(tmp_path / "run"), model="mobilenetv2_unet", image_size=None, patch_size="16x16x16")
    with pytest.raises(TfsegError, match="3D"):
        fit(cfg)
    assert not os.path.exists(tmp_path / "run")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_fit_writes_run_dir_then_noop_then_continues(tmp_path, squares_data, caplog):
    import logging

    import keras

    from tfseg import rundir

    out = str(tmp_path / "run")
    assert fit(tiny_fit_config(squares_data, out)) == out
    info = rundir.load_run_config(out)
    for key in ("model", "model_kwargs", "ndim", "channels", "num_classes", "binary", "class_names",
                "ignore_index", "regions", "image_size", "data_dir", "config"):
        assert key in info, key
    assert info["image_size"] == [32, 32] and info["binary"] and info["completed_epochs"] == 2
    assert info["config"]["epochs"] == 2 and info["monitor"] == "val_mean_iou"
    assert info["precision"] == runtime.resolve_precision("auto", num_gpus=0)
    assert [r["epoch"] for r in history_rows(out)] == ["0", "1"]
    for name in ("model.keras", "checkpoints/best.keras", "backup/latest.weights.h5"):
        assert os.path.isfile(os.path.join(out, name)), name
    # Each state once: the last epoch lives in the backup alone, the epoch before it is gone.
    for name in ("checkpoints/last.keras", "backup/previous.weights.h5", "backup/previous_metadata.json"):
        assert not os.path.exists(os.path.join(out, name)), name
    assert os.stat(os.path.join(out, "model.keras")).st_ino == os.stat(
        os.path.join(out, "checkpoints/best.keras")).st_ino
    # The optimizer's state lives in the backup alone: the published model holds the weights.
    import zipfile

    import h5py

    with zipfile.ZipFile(os.path.join(out, "model.keras")) as z, h5py.File(z.open("model.weights.h5"), "r") as h:
        published = set(h.keys())
    with h5py.File(os.path.join(out, "backup/latest.weights.h5"), "r") as h:
        backed_up = set(h.keys())
    assert "optimizer" in backed_up and "optimizer" not in published, (published, backed_up)
    # model.keras is the best epoch by val_mean_iou: it scores that on the val split.
    model = rundir.load_model(out)
    assert model.output_shape == (None, 32, 32, 1)
    best = max(float(r["val_mean_iou"]) for r in history_rows(out))
    x, y = read_split_numpy(squares_data, "val")
    cm = np.bincount((y.ravel() * 2 + (model.predict(x, verbose=0)[..., 0] > 0.5).ravel()), minlength=4).reshape(2, 2)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert abs(np.nanmean(iou) - best) < 1e-3
    assert keras.config.dtype_policy().name == "float32"  # the policy is restored

    mtime = os.path.getmtime(os.path.join(out, "model.keras"))
    with caplog.at_level(logging.INFO, logger="tfseg.fit"):
        fit(tiny_fit_config(squares_data, out))
    assert "nothing to do" in caplog.text
    assert os.path.getmtime(os.path.join(out, "model.keras")) == mtime

    seen = []
    recorder = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(epoch))
    fit(tiny_fit_config(squares_data, out, epochs=3), callbacks=[recorder])
    assert seen == [2]
    assert [r["epoch"] for r in history_rows(out)] == ["0", "1", "2"]
    assert rundir.load_run_config(out)["completed_epochs"] == 3

    with pytest.raises(TfsegError, match="model_kwargs"):
        fit(tiny_fit_config(squares_data, out, epochs=4, model_kwargs={"depth": 1, "base_filters": 4}))


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_short_fit_learns_squares(tmp_path):
    from tfseg import rundir

    data = write_2d_dataset(str(tmp_path / "data"), {"train": 32, "val": 8}, seed=3)
    out = fit(tiny_fit_config(data, str(tmp_path / "run"), epochs=8, steps_per_epoch=20, batch_size=8,
                              learning_rate=0.01, loss="bce_dice"))
    losses = [float(r["loss"]) for r in history_rows(out)]
    assert losses[-1] < 0.6 * losses[0]
    x, y = read_split_numpy(data, "val")
    dice = numpy_binary_dice(rundir.load_model(out).predict(x, verbose=0), y)
    assert dice > 0.9, dice


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): a 21 s fit in a GPU-only precision
def test_mixed_float16_wraps_the_optimizer_in_loss_scaling(tmp_path, squares_data):
    import keras

    found = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            found["optimizer"] = type(self.model.optimizer).__name__
            found["compute"] = self.model.layers[-2].compute_dtype

    out = str(tmp_path / "run")
    fit(tiny_fit_config(squares_data, out, epochs=1, steps_per_epoch=1, precision="mixed_float16",
                        validation_split=None), callbacks=[Probe()])
    assert found["optimizer"] == "LossScaleOptimizer"
    assert json.load(open(os.path.join(out, "run.json")))["precision"] == "mixed_float16"
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_resume_after_kill_9_continues_at_the_right_epoch(tmp_path, squares_data):
    out = str(tmp_path / "run")
    cfg = tiny_fit_config(squares_data, out, epochs=3)
    # SIGKILL in the middle of the second epoch: epoch 0 is finished and backed up.
    proc = run_script(f"""
        import os, signal, keras
        from tfseg.fit import run_fit
        class Kill(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if self.epoch == 1 and batch == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch
        run_fit({cfg!r}, callbacks=[Kill()])
    """)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["epoch"] for r in history_rows(out)] == ["0"]
    assert not os.path.exists(os.path.join(out, "model.keras"))

    import keras

    seen = []
    fit(cfg, callbacks=[keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))])
    assert seen == [1, 2]
    assert [r["epoch"] for r in history_rows(out)] == ["0", "1", "2"]
    assert os.path.isfile(os.path.join(out, "model.keras"))


@pytest.mark.slow  # ~45 s: a fresh TensorFlow with 2 logical CPUs, bf16 emulated on this CPU
def test_mirrored_two_cpu_replicas_bf16_metrics_agree_with_one_replica(tmp_path, squares_data):
    out = str(tmp_path / "run")
    cfg = tiny_fit_config(squares_data, out, epochs=1, cpu_replicas=2, precision="mixed_bfloat16")
    proc = run_script(f"""
        import json
        import keras, numpy as np, tensorflow as tf
        from tfseg.errors import TfsegError
        from tfseg.fit import run_fit
        from tfseg import rundir
        from tfseg.data import make_dataset
        from tfseg.metrics import default_metrics
        cfg = {cfg!r}
        try:
            run_fit(dict(cfg, batch_size=3))
        except TfsegError as e:
            odd = str(e)
        run_fit(cfg)
        ds = make_dataset(cfg["data"], "val", batch_size=4, training=False, image_size=(32, 32))
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
        def evaluate(scope):
            with scope:
                model = rundir.load_model(cfg["output"])
                model.compile(loss="binary_crossentropy", metrics=default_metrics(2))
            return model.evaluate(ds, return_dict=True, verbose=0), model
        two, _ = evaluate(strategy.scope())
        one, model = evaluate(tf.distribute.get_strategy().scope())
        probs = np.concatenate([model.predict(x, verbose=0) for x, _ in ds])
        print("RESULT", json.dumps({{"odd": odd, "two": two, "one": one, "replicas": strategy.num_replicas_in_sync,
                                   "probs": probs[..., 0].tolist()}}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "divisible by the 2 replicas" in result["odd"]
    info = json.load(open(os.path.join(out, "run.json")))
    assert (info["replicas"], info["strategy"], info["precision"]) == (2, "MirroredStrategy", "mixed_bfloat16")
    assert result["replicas"] == 2
    for key in ("mean_iou", "dice"):
        assert abs(result["two"][key] - result["one"][key]) < 1e-6, (key, result)
    # And both equal the numpy score of the same weights' predictions.
    _, y = read_split_numpy(squares_data, "val")
    pred = np.asarray(result["probs"]) > 0.5
    cm = np.bincount((y.ravel() * 2 + pred.ravel()), minlength=4).reshape(2, 2)
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    assert abs(result["one"]["mean_iou"] - iou.mean()) < 1e-4


def test_cli_fit_end_to_end(tmp_path, squares_data):
    from click.testing import CliRunner

    from tfseg.cli import cli

    out = str(tmp_path / "run")
    config = tmp_path / "fit.yaml"
    config.write_text("fit:\n  model: dense_unet\n  epochs: 3\n  model_kwargs: {base_filters: 4}\n")
    args = ["fit", "--data", squares_data, "--model", "unet", "--output", out, "--config", str(config),
            "--epochs", "1", "--batch-size", "4", "--image-size", "32x32", "--optimizer", "sgd",
            "--set", "model_kwargs.depth=2", "--set", "verbose=0", "--set", "tensorboard=false",
            "--set", "fit.seed=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"fit: {out}" in result.output
    info = json.load(open(os.path.join(out, "run.json")))
    assert info["model"] == "unet" and info["model_kwargs"] == {"base_filters": 4, "depth": 2}
    assert info["config"]["optimizer"] == "sgd" and info["config"]["epochs"] == 1 and info["config"]["seed"] == 2
    assert len(history_rows(out)) == 1

    bad = CliRunner().invoke(cli, ["fit", "--data", str(tmp_path), "--model", "unet", "--output", out])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "dataset.json" in bad.output
    bad = CliRunner().invoke(cli, args + ["--set", "epoch=3"])
    assert bad.exit_code == 2 and "unknown key 'epoch'" in bad.output


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_fit_3d_patches_writes_a_3d_model(tmp_path):
    from tfseg import rundir

    data = write_3d_dataset(str(tmp_path / "cubes"), n=2)
    out = fit(tiny_fit_config(data, str(tmp_path / "run"), image_size=None, patch_size="16x16x16", epochs=1,
                              batch_size=2, steps_per_epoch=2))
    info = rundir.load_run_config(out)
    assert info["patch_size"] == [16, 16, 16] and "image_size" not in info and info["loss"] == "ce_dice"
    assert rundir.load_model(out).output_shape == (None, 16, 16, 16, 3)
    assert [r["epoch"] for r in history_rows(out)] == ["0"]


class _PoisonAt:
    """Sets one weight to NaN at the start of ``epoch`` (0-based): a divergence on cue."""

    def __new__(cls, epoch: int):
        import keras

        class Poison(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if self._epoch == epoch and batch == 0:
                    w = self.model.trainable_weights[0]
                    w.assign(np.full(w.shape, np.nan, dtype=np.float32))

            def on_epoch_begin(self, e, logs=None):
                self._epoch = e

        return Poison()


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_divergence_is_not_kept_and_a_rerun_resumes_from_the_last_finite_epoch(tmp_path, squares_data):
    from tfseg import rundir
    from tfseg.fit import backup_epoch

    out = str(tmp_path / "run")
    cfg = tiny_fit_config(squares_data, out, epochs=4)
    with pytest.raises(TfsegError, match="diverged") as e:
        fit(cfg, callbacks=[_PoisonAt(2)])
    msg = str(e.value)
    assert "\n" not in msg and "after epoch 2" in msg and "nothing was published" in msg
    # Nothing marks epoch 3 as finished: two history rows, backup at 2, no model.
    assert len(history_rows(out)) == 2 and backup_epoch(out) == 2
    assert not os.path.exists(os.path.join(out, rundir.MODEL_FILE))
    for name in os.listdir(os.path.join(out, "checkpoints")):
        model = keras_load(os.path.join(out, "checkpoints", name))
        rundir.check_finite_weights(model, name)  # raises if a checkpoint kept NaN weights
    # The re-run (the poison gone: e.g. a lower learning rate) resumes after epoch 2 and publishes.
    fit(tiny_fit_config(squares_data, out, epochs=4, learning_rate=5e-4))
    assert [int(r["epoch"]) for r in history_rows(out)] == [0, 1, 2, 3]
    rundir.load_model(out)  # finite


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_a_model_with_nan_weights_is_refused_by_evaluate_and_export(tmp_path, squares_data):
    from tfseg import export, rundir

    out = str(tmp_path / "run")
    fit(tiny_fit_config(squares_data, out, epochs=1))
    model = rundir.load_model(out)
    w = model.trainable_weights[-1]
    w.assign(np.full(w.shape, np.inf, dtype=np.float32))
    model.save(os.path.join(out, rundir.MODEL_FILE))
    with pytest.raises(TfsegError, match="NaN or infinite"):
        export.run_export(out, str(tmp_path / "exports"), "m")
    assert not os.path.exists(tmp_path / "exports" / "m")
    from tfseg.evaluate import run_evaluate

    with pytest.raises(TfsegError, match="NaN or infinite"):
        run_evaluate(out, squares_data, "val", str(tmp_path / "eval"))


def keras_load(path):
    import keras

    import tfseg.models  # noqa: F401

    return keras.saving.load_model(path, compile=False)
