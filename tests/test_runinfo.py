"""RunInfo: the typed run facts fit writes and evaluate, export and predict read."""

import json

import pytest

from tfseg import rundir, schema
from tfseg.errors import TfsegError
from tfseg.rundir import RunInfo


def _old_run_json(**changes):
    # run.json as tfseg wrote it before RunInfo (no head, no training_flip_axes, monitor "auto"
    # in the config and the resolved one at the top level).
    d = {"model": "unet", "model_kwargs": {"depth": 2}, "ndim": 2, "channels": 3, "num_classes": 2,
         "binary": True, "class_names": ["background", "car"], "ignore_index": None, "regions": {},
         "modalities": [], "image_size": [32, 48], "data_dir": "/d", "loss": "bce_dice",
         "precision": "mixed_bfloat16", "monitor": "val_mean_iou",
         "config": {"monitor": "auto", "augment": {"hflip": 0.5, "vflip": 0.0}}}
    d.update(changes)
    return d


def test_reads_an_older_run_json():
    r = RunInfo.from_json(_old_run_json())
    assert (r.ndim, r.channels, r.num_classes, r.size) == (2, 3, 2, (32, 48))
    assert r.head == "sigmoid" and r.binary
    assert r.monitor == "val_mean_iou"  # the resolved one, not the config's "auto"
    assert r.precision == "mixed_bfloat16"
    assert r.flip_axes == (1,)  # hflip only; vflip 0.0 is off
    assert r.class_names == ("background", "car")
    assert r.normalization == rundir.NORMALIZATION[2]


def test_head_from_the_binary_key_and_from_two_classes():
    assert RunInfo.from_json(_old_run_json(num_classes=3, binary=False, class_names=["a", "b", "c"])).head == "softmax"
    d = _old_run_json()
    del d["binary"]
    assert RunInfo.from_json(d).binary
    # The recorded head wins over the class count.
    assert not RunInfo.from_json(_old_run_json(head="softmax")).binary


def test_round_trip_and_3d_keys():
    d = {"ndim": 3, "channels": 4, "num_classes": 4, "patch_size": [16, 16, 16], "class_names": ["a", "b"],
         "regions": {"WT": [1, 2, 3]}, "config": {"augment": {"flip3d": True}}}
    r = RunInfo.from_json(d)
    assert r.class_names == ("class_0", "class_1", "class_2", "class_3")  # wrong count: defaults
    assert r.flip_axes == (0, 1, 2) and r.size_key == "patch_size" and r.head == "softmax"
    j = r.to_json()
    assert j["patch_size"] == [16, 16, 16] and j["training_flip_axes"] == [0, 1, 2] and "image_size" not in j
    assert RunInfo.from_json(json.loads(json.dumps(j))) == r


def test_from_dataset_matches_dataset_info():
    info = schema.DatasetInfo(name="x", ndim=2, channels=1, num_classes=5, class_names=list("abcde"), ignore_index=255)
    r = RunInfo.from_dataset(info, (8, 8), model="unet", flip_axes=(0, 1))
    assert r.binary is info.binary is False
    assert r.ignore_index == 255 and r.size == (8, 8) and r.flip_axes == (0, 1)


@pytest.mark.parametrize("drop, match", [("ndim", "ndim"), ("image_size", "image_size"), ("num_classes", "num_classes")])
def test_missing_keys_are_one_line_errors(drop, match):
    d = _old_run_json()
    del d[drop]
    if drop == "num_classes":
        d["class_names"] = []
    with pytest.raises(TfsegError, match=match):
        RunInfo.from_json(d, "RUN/run.json")


def test_fit_writes_run_info_keys(tmp_path):
    from tfseg.fit.checks import FitPlan
    from tfseg.fit.config import FitConfig
    from tfseg.fit.run import _run_record

    info = schema.DatasetInfo(name="x", ndim=2, channels=3, num_classes=3, class_names=["a", "b", "c"])
    cfg = FitConfig.from_dict({"data": str(tmp_path), "output": str(tmp_path / "run"), "model": "unet",
                               "augment": {"vflip": 0.5, "hflip": 0.5}})
    plan = FitPlan(info=info, size=(32, 32), loss="ce", class_weights=None, validation_split=None, train_steps=1)
    record = _run_record(cfg, plan)
    assert record["head"] == "softmax" and record["training_flip_axes"] == [0, 1]
    assert record["image_size"] == [32, 32] and record["loss"] == "ce"
    assert RunInfo.from_json(record).flip_axes == (0, 1)


def test_run_facts_carry_the_datasets_class_colours():
    """RunInfo.from_dataset always recorded None: class_colors was no field of DatasetInfo."""
    from tfseg import rundir, schema

    base = dict(name="folder", ndim=2, channels=3, num_classes=3, class_names=["a", "b", "c"])
    given = schema.DatasetInfo(**base, class_colors=[[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert rundir.RunInfo.from_dataset(given, (32, 32)).class_colors == ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    # A folder layout's palette, keyed by colour: class 2 is (0, 255, 0) however the keys are ordered.
    palette = schema.DatasetInfo(**base, label_mapping={"palette": {"0,255,0": {"id": 2}, "255,0,0": {"id": 1}}})
    colors = rundir.RunInfo.from_dataset(palette, (32, 32)).class_colors
    assert colors[1] == (255, 0, 0) and colors[2] == (0, 255, 0)
    # Read back from dataset.json.
    again = schema.DatasetInfo.from_dict(json.loads(given.to_json()))
    assert again.class_colors == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
