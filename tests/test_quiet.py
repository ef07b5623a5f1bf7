"""Quiet by default: TensorFlow's C++ start-up lines are hidden unless `tfseg -v`."""

import os
import subprocess
import sys
import textwrap

import pytest

from tfseg.cli import quiet

NOISE_MARKERS = ("absl::InitializeLog", "oneDNN", "cuInit", "cudart", "cpu_feature_guard",
                 "Could not find cuda drivers", "rebuild TensorFlow")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(extra)
    return env


def test_filter_keeps_real_lines_and_drops_noise(tmp_path):
    """A stand-in tensorflow package writes noise and a real warning to fd 2 on import."""
    pkg = tmp_path / "tensorflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on.\\n")
        os.write(2, b"a real warning the user must see\\n")

        class config:  # the GPU platform starts on the first device listing
            @staticmethod
            def list_physical_devices(kind):
                os.write(2, b"E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n")
                return []
    """))
    code = "from tfseg.cli import quiet; quiet.import_tensorflow(); import sys; print('after', file=sys.stderr)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["a real warning the user must see", "after"]


def test_is_noise():
    assert quiet.is_noise("I0000 00:00:1 cudart_stub.cc:31] Could not find cuda drivers on your machine")
    assert not quiet.is_noise("error: RUN/run.json: missing 'ndim'")


@pytest.mark.slow
@pytest.mark.parametrize("level", [None, "2"])
def test_cli_stderr_has_no_tensorflow_startup_lines(tmp_path, level):
    """A command that imports TensorFlow and builds a model prints none of the start-up lines,
    also with TF_CPP_MIN_LOG_LEVEL=2 set (as .ci/run does), where cuInit's ERROR line got through."""
    import json

    import keras

    run = str(tmp_path / "run")
    os.makedirs(run)
    inp = keras.Input((16, 16, 3))
    keras.Model(inp, keras.layers.Conv2D(3, 1, activation="softmax")(inp)).save(os.path.join(run, "model.keras"))
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump({"ndim": 2, "channels": 3, "num_classes": 3, "image_size": [16, 16]}, f)
    cmd = [sys.executable, "-m", "tfseg.cli", "export", "--run", run, "--output", str(tmp_path / "exports"),
           "--name", "m"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(**({"TF_CPP_MIN_LOG_LEVEL": level} if level else {})))
    assert out.returncode == 0, out.stderr
    noisy = [line for line in out.stderr.splitlines() if any(m in line for m in NOISE_MARKERS)]
    assert noisy == []
    assert "exported m version 1" in out.stdout


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_fit_writes_one_line_per_epoch_into_a_pipe(tmp_path):
    """Keras's progress bar redraws with ANSI escapes; into a pipe or log file fit prints plain
    per-epoch lines instead (the bar stays on a terminal)."""
    from helpers import write_2d_dataset

    data = write_2d_dataset(str(tmp_path / "data"), {"train": 8, "val": 4}, size=16)
    cmd = [sys.executable, "-m", "tfseg.cli", "fit", "--data", data, "--model", "unet", "--output",
           str(tmp_path / "run"), "--epochs", "3", "--batch-size", "4", "--image-size", "16x16",
           "--set", "model_kwargs={depth: 2, base_filters: 4}", "--set", "tensorboard=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\x1b[" not in out.stdout and "\r" not in out.stdout
    epoch_lines = [line for line in out.stdout.splitlines() if "val_loss" in line]
    assert len(epoch_lines) == 3, out.stdout


def test_filtered_stderr_drops_only_the_matching_c_lines(capfd):
    """What C++ writes straight to fd 2 inside the block (the LiteRT int8 quantizer's settings
    line) is dropped when it matches, and everything else on fd 2 comes back, in order."""
    import os

    from tfseg import runtime

    with runtime.filtered_stderr(lambda line: line.startswith("fully_quantize:")):
        os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8\n")
        os.write(2, b"a real warning\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err == "a real warning\nafter\n"


def test_a_decoder_error_is_its_own_line():
    """Eager TensorFlow errors wrap the decoder's message in the function node and the op name;
    predict reports the message alone (a truncated JPEG)."""
    from tfseg.predict.base import graph_error_line

    eager = ("{{function_node __wrapped__DecodeImage_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
             "jpeg::Uncompress failed. Invalid JPEG data or crop window. [Op:DecodeImage] name: ")
    assert graph_error_line(eager) == "jpeg::Uncompress failed. Invalid JPEG data or crop window."
    graph = ("Graph execution error:\n\nDetected at node decode/Assert defined at (most recent call last):\n"
             "<stack traces unavailable>\nassertion failed: [image too large] [Condition x (bool) = ] [0]\n"
             "\t [[{{node decode/Assert}}]]")
    assert graph_error_line(graph) == "[image too large]"
