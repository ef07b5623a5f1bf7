"""The stages' typed configs (issue 25): one coercion driven by the dataclass annotations, the
same one-line messages naming the key, and each stage's entry point taking a config, a mapping
or the config's fields."""

import dataclasses

import pytest

from tfseg.config import config_from_mapping, config_to_json
from tfseg.convert.config import ConvertConfig
from tfseg.errors import TfsegError
from tfseg.evaluate import EvaluateConfig
from tfseg.export import ExportConfig


@dataclasses.dataclass(frozen=True)
class _Example:
    name: str
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    size: tuple[int, ...] | None = None
    limit: int | None = None
    options: dict | None = None
    path_or_flag: bool | str = False


def _make(**values):
    return config_from_mapping(_Example, values, what="example config")


def test_values_coerced_from_annotations():
    cfg = _make(name=7, count="3", rate="0.25", flag="yes", size=[4, "5"], limit=None, path_or_flag="cache.tfdata")
    assert cfg == _Example("7", 3, 0.25, True, (4, 5), None, None, "cache.tfdata")
    assert _make(name="a", flag="false", count=2.0, path_or_flag=True).flag is False
    assert config_to_json(_make(name="a", size=(1, 2))) == {
        "name": "a", "count": 1, "rate": 0.5, "flag": False, "size": [1, 2], "limit": None, "options": None,
        "path_or_flag": False}


@pytest.mark.parametrize("values, message", [
    (dict(name="a", count="many"), "example config: count = 'many' is not a valid integer"),
    (dict(name="a", count=1.5), "example config: count = 1.5 is not a valid integer"),
    (dict(name="a", count=True), "example config: count = True is not a valid integer"),
    (dict(name="a", flag="maybe"), "example config: flag = 'maybe' is not a valid boolean"),
    (dict(name="a", rate="fast"), "example config: rate = 'fast' is not a valid number"),
    (dict(name="a", size="4x5"), "example config: size = '4x5' is not a valid list"),
    (dict(name="a", limit="none"), "example config: limit = 'none' is not a valid integer"),
    (dict(name="a", options=[1]), "example config: options = [1] is not a valid mapping"),
    (dict(name=None), "example config: name = None is not a valid string"),
    (dict(count=2), "example config: 'name' is required"),
    (dict(name="a", colour="red"), "example config: unknown key 'colour'"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(TfsegError) as e:
        _make(**values)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_stage_configs_from_fields_or_mapping():
    a = EvaluateConfig.from_call(("RUN", "DATA", "val", "EVAL"), {"num_samples": "2", "tta": "true"})
    b = EvaluateConfig.from_call((a,), {})
    c = EvaluateConfig.from_dict({**a.to_json()})
    assert a == b == c and (a.split, a.output, a.num_samples, a.tta) == ("val", "EVAL", 2, True)
    x = ExportConfig.from_call(("RUN", "BASE", "m"), {"version": "3"})
    assert x.version == 3 and x.precision == "float32" and x.format == "savedmodel"
    cv = ConvertConfig.from_call(("folder", "RAW", "OUT"), {"image_size": [8, 8], "beam_args": ["--a=1"]})
    assert cv.image_size == (8, 8) and cv.beam_args == ("--a=1",)
    assert config_to_json(cv)["beam_args"] == ["--a=1"]
    with pytest.raises(TfsegError, match="'split' given twice"):
        EvaluateConfig.from_call(("RUN", "DATA", "val"), {"split": "test"})


def test_entry_points_check_their_config_first(tmp_path):
    from tfseg.convert.pipeline import run_convert
    from tfseg.evaluate import run_evaluate
    from tfseg.export import run_export

    with pytest.raises(TfsegError, match="evaluate: give one of --run RUN_DIR or --model"):
        run_evaluate(None, str(tmp_path), "test", str(tmp_path / "eval"))
    with pytest.raises(TfsegError, match="--tile/--tta are the export's own"):
        run_evaluate(None, str(tmp_path), "test", str(tmp_path / "eval"), tile=True, export_dir=str(tmp_path))
    with pytest.raises(TfsegError, match="evaluate config: num_samples = 'x' is not a valid integer"):
        run_evaluate(str(tmp_path), str(tmp_path), num_samples="x")
    with pytest.raises(TfsegError, match=r"export config: precision = 'float64' is not one of float32, "):
        run_export(str(tmp_path), str(tmp_path / "x"), "m", precision="float64")
    with pytest.raises(TfsegError, match=r"--name 'a/b': use letters"):
        run_export(ExportConfig(str(tmp_path), str(tmp_path / "x"), "a/b"))
    with pytest.raises(TfsegError, match="convert config: num_shards = 'two' is not a valid integer"):
        run_convert("folder", str(tmp_path), str(tmp_path / "out"), num_shards="two")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


def test_make_dataset_takes_an_input_config(tmp_path):
    pytest.importorskip("tensorflow")
    from tfseg.data import InputConfig, make_dataset

    with pytest.raises(TfsegError, match="input config: batch_size = 'two' is not a valid integer"):
        make_dataset(str(tmp_path), "train", batch_size="two", training=True)
    with pytest.raises(TfsegError, match="input config: 'training' is required"):
        make_dataset({"data_dir": str(tmp_path), "split": "train", "batch_size": 2})
    with pytest.raises(TfsegError, match="dataset.json"):  # a well-formed config: the dataset's own checks
        make_dataset(InputConfig(str(tmp_path), "train", batch_size=2, training=False))
