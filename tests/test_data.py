"""The tf.data input pipeline on tiny record sets written here (independent of the converter)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from tfseg import schema
from tfseg.errors import TfsegError

tf = pytest.importorskip("tensorflow")

from tfseg import data  # noqa: E402


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write(tmp_path, split_records, info_kwargs, *, shards=1, compression=""):
    """Writes ``{split: [serialized, ...]}`` as shards plus dataset.json; returns the dir."""
    root = str(tmp_path)
    os.makedirs(root, exist_ok=True)
    splits = {}
    ext = ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"
    for split, records in split_records.items():
        files = []
        for i in range(shards):
            name = f"{split}-{i:05d}-of-{shards:05d}{ext}"
            with tf.io.TFRecordWriter(os.path.join(root, name), options=compression or None) as w:
                for rec in records[i::shards]:
                    w.write(rec)
            files.append(name)
        splits[split] = {"count": len(records), "files": files}
    info = schema.DatasetInfo(splits=splits, compression=compression, **info_kwargs)
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


def _records_2d(images, masks):
    out = []
    for k, (im, m) in enumerate(zip(images, masks)):
        out.append(
            schema.encode_example_2d(
                image_bytes=_png(im), image_format="png", height=im.shape[0], width=im.shape[1],
                channels=im.shape[2], mask_png=None if m is None else _png(m), source_id=f"c{k}",
            )
        )
    return out


def _info_2d(num_classes=3, ignore_index=255, channels=3, size=None):
    kw = dict(
        name="t", ndim=2, channels=channels, num_classes=num_classes,
        class_names=[f"k{i}" for i in range(num_classes)], ignore_index=ignore_index, image_format="png",
    )
    if size is not None:
        kw["size_summary"] = {
            "train": {"height": {"min": size[0], "max": size[0]}, "width": {"min": size[1], "max": size[1]}}
        }
    return kw


def _random_2d(n, h=32, w=32, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    masks = [rng.integers(0, num_classes, (h, w), dtype=np.uint8) for _ in range(n)]
    for k, m in enumerate(masks):
        m[k % h, :3] = 255  # ignore pixels must survive untouched
    return images, masks


def _blocks(n, seed=0):
    """Masks of 8x8 class blocks with images that are a function of the mask (value * 60)."""
    rng = np.random.default_rng(seed)
    masks = [np.kron(rng.integers(0, 4, (4, 4)), np.ones((8, 8), int)).astype(np.uint8) for _ in range(n)]
    images = [np.repeat((m * 60)[..., None], 3, axis=2).astype(np.uint8) for m in masks]
    return images, masks


def _batches(ds, n=None):
    out = []
    for k, (x, y) in enumerate(ds):
        if n is not None and k >= n:
            break
        out.append((x.numpy(), y.numpy()))
    return out


# ---------------------------------------------------------------- 2D


def test_2d_round_trip_is_exact_without_augmentation(tmp_path):
    images, masks = _random_2d(5)
    root = _write(tmp_path, {"train": _records_2d(images, masks)}, _info_2d(size=(32, 32)), compression="GZIP")
    ds = data.make_dataset(root, "train", batch_size=2, training=False, deterministic=True)
    got = _batches(ds)
    assert [x.shape for x, _ in got] == [(2, 32, 32, 3), (2, 32, 32, 3), (1, 32, 32, 3)]
    x = np.concatenate([b[0] for b in got])
    y = np.concatenate([b[1] for b in got])
    assert x.dtype == np.float32 and y.dtype == np.int32 and y.shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(x, np.stack(images).astype(np.float32))
    np.testing.assert_array_equal(y[..., 0], np.stack(masks).astype(np.int32))
    assert (y == 255).sum() == 5 * 3


def test_2d_training_batches_are_static_and_drop_the_remainder(tmp_path):
    images, masks = _random_2d(5)
    root = _write(tmp_path, {"train": _records_2d(images, masks)}, _info_2d(), shards=2)
    ds = data.make_dataset(root, "train", batch_size=2, training=True, image_size="16x24", seed=1,
                           augment={"hflip": 0.5, "rotate": 10})
    assert ds.element_spec[0].shape.as_list() == [2, 16, 24, 3]
    assert ds.element_spec[1].shape.as_list() == [2, 16, 24, 1]
    assert ds.element_spec[1].dtype == tf.int32
    assert len(_batches(ds)) == 2 == data.steps_per_epoch(root, "train", batch_size=2, training=True)
    assert data.steps_per_epoch(root, "train", batch_size=2, training=False) == 3
    assert len(_batches(data.make_dataset(root, "train", batch_size=2, training=True, repeat=3))) == 7


def test_2d_evaluation_resize_is_bilinear_for_images_and_nearest_for_masks(tmp_path):
    # 2x2-constant blocks: a half-pixel-centred 2x downsample samples between two equal pixels,
    # so both bilinear and nearest give back the block values exactly.
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (2, 16, 16, 3))
    small_mask = rng.choice([0, 1, 2, 255], (2, 16, 16))
    up = lambda a: np.kron(a, np.ones((2, 2, 1), int) if a.ndim == 3 else np.ones((2, 2), int))  # noqa: E731
    images = [up(s).astype(np.uint8) for s in small]
    masks = [up(s).astype(np.uint8) for s in small_mask]
    root = _write(tmp_path, {"val": _records_2d(images, masks)}, _info_2d())
    (x, y), = _batches(data.make_dataset(root, "val", batch_size=2, training=False, image_size=(16, 16),
                                         deterministic=True))
    np.testing.assert_allclose(x, small, atol=1e-4)
    np.testing.assert_array_equal(y[..., 0], small_mask)


def test_2d_augmentation_keeps_labels_and_image_mask_geometry(tmp_path):
    images, masks = _blocks(4)
    root = _write(tmp_path, {"train": _records_2d(images, masks)}, _info_2d(num_classes=4))
    augment = {"hflip": 0.5, "vflip": 0.5, "rotate": 30, "shift": 0.1, "scale": [0.8, 1.2]}
    ds = data.make_dataset(root, "train", batch_size=4, training=True, augment=augment, seed=5, repeat=3)
    checked = 0
    for x, y in _batches(ds):
        m = y[..., 0]
        assert set(np.unique(m)) <= {0, 1, 2, 3, 255}
        # Away from label edges and the padding, the image is still 60 * label everywhere.
        for b in range(m.shape[0]):
            p = np.pad(m[b], 1, mode="edge")
            flat = np.ones_like(m[b], bool)
            for dy in range(3):
                for dx in range(3):
                    flat &= p[dy:dy + 32, dx:dx + 32] == m[b]
            inside = flat & (m[b] != 255)
            inside[[0, -1], :] = inside[:, [0, -1]] = False
            np.testing.assert_allclose(x[b][inside], (60.0 * m[b][inside])[:, None].repeat(3, 1), atol=1e-3)
            checked += inside.sum()
    assert checked > 3 * 4 * 32 * 32 * 0.3


def test_2d_padding_fills_masks_with_ignore_index_or_background(tmp_path):
    images, masks = _blocks(2)
    for ignore, fill in [(255, 255), (None, 0)]:
        root = _write(tmp_path / str(ignore), {"train": _records_2d(images, masks)},
                      _info_2d(num_classes=4, ignore_index=ignore))
        # Zooming out by 2 leaves a border of 8 px around the content.
        ds = data.make_dataset(root, "train", batch_size=2, training=True, augment={"scale": [0.5, 0.5]}, seed=0)
        (x, y), = _batches(ds)
        ring = np.ones((32, 32), bool)
        ring[8:24, 8:24] = False
        assert (y[:, ring, 0] == fill).all() and (x[:, ring] == 0).all()
        assert set(np.unique(y[:, 9:23, 9:23])) <= {0, 1, 2, 3}


def test_2d_deterministic_mode_replays_batches_and_epochs_differ(tmp_path):
    images, masks = _random_2d(6)
    root = _write(tmp_path, {"train": _records_2d(images, masks)}, _info_2d(), shards=3)
    augment = {"hflip": 0.5, "vflip": 0.5, "rotate": 15, "shift": 0.1, "scale": [0.9, 1.1], "hue": 0.05,
               "saturation": 0.2, "brightness": 0.2, "contrast": 0.2, "noise": 5.0, "blur": 0.5}

    def run(seed):
        ds = data.make_dataset(root, "train", batch_size=2, training=True, augment=augment, seed=seed,
                               deterministic=True, image_size=(24, 24))
        return _batches(ds), _batches(ds)

    (a1, a2), (b1, _), (c1, _) = run(7), run(7), run(8)
    for (xa, ya), (xb, yb) in zip(a1, b1):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a1[0][0], a2[0][0])  # the second pass draws new augmentations
    assert not np.array_equal(a1[0][0], c1[0][0])


def test_2d_unlabelled_records_are_skipped_and_read_examples_keeps_sizes(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, 20, 3), dtype=np.uint8) for h in (10, 14, 12)]
    masks = [np.full((10, 20), 1, np.uint8), None, np.full((12, 20), 2, np.uint8)]
    root = _write(tmp_path, {"train": _records_2d(images, masks)}, _info_2d())
    got = _batches(data.make_dataset(root, "train", batch_size=1, training=False, deterministic=True))
    assert [y[0, 0, 0, 0] for _, y in got] == [1, 2]
    examples = list(data.read_examples(root, "train"))
    assert [e["image"].shape[0] for e in examples] == [10, 14, 12]
    assert [bool(e["has_mask"]) for e in examples] == [True, False, True]
    np.testing.assert_array_equal(examples[1]["image"].numpy(), images[1])
    assert examples[2]["source_id"].numpy() == b"c2"


def test_bad_input_raises_one_line_errors(tmp_path):
    with pytest.raises(TfsegError, match="dataset.json"):
        data.make_dataset(str(tmp_path), "train", batch_size=2, training=True)
    images, masks = _random_2d(2, h=8, w=8)
    images.append(np.zeros((10, 8, 3), np.uint8))
    masks.append(np.zeros((10, 8), np.uint8))
    info = _info_2d()
    info["size_summary"] = {"train": {"height": {"min": 8, "max": 10}, "width": {"min": 8, "max": 8}}}
    root = _write(tmp_path, {"train": _records_2d(images, masks)}, info)
    for kwargs, match in [
        (dict(split="test"), "no split"),
        (dict(patch_size="8x8x8"), "patch_size is for 3D"),
        (dict(augment={"zoom": 2}), "augment.zoom"),
        (dict(augment={"rotate": "a lot"}), "augment: rotate = .a lot. is not a valid number"),
        (dict(image_size=None), "set image_size"),
        (dict(batch_size=0), "batch_size"),
    ]:
        args = dict(split="train", batch_size=2, training=True, image_size=(8, 8))
        args.update(kwargs)
        with pytest.raises(TfsegError, match=match):
            data.make_dataset(root, args.pop("split"), **args)
    os.remove(os.path.join(root, "train-00000-of-00001.tfrecord"))
    with pytest.raises(TfsegError, match="missing"):
        data.make_dataset(root, "train", batch_size=2, training=True, image_size=(8, 8))


# ---------------------------------------------------------------- 3D


def _records_3d(volumes, labels):
    return [
        schema.encode_example_3d(volume=v, label=l, spacing=(1.0, 1.0, 1.0), source_id=f"v{k}")
        for k, (v, l) in enumerate(zip(volumes, labels))
    ]


def _info_3d(ignore_index=None, channels=2):
    return dict(name="t3", ndim=3, channels=channels, num_classes=4, class_names=["bg", "a", "b", "c"],
                ignore_index=ignore_index, regions={"WT": [1, 2, 3]})


def test_3d_training_patches_have_static_shapes(tmp_path):
    rng = np.random.default_rng(0)
    vols = [rng.integers(-3, 4, (16, 16, 16, 2)).astype(np.float32) for _ in range(3)]
    labs = [rng.integers(0, 4, (16, 16, 16)).astype(np.uint8) for _ in range(3)]
    root = _write(tmp_path, {"train": _records_3d(vols, labs)}, _info_3d(), shards=2)
    ds = data.make_dataset(root, "train", batch_size=2, training=True, patch_size="8x8x12", seed=0,
                           patches_per_volume=2, augment={"flip3d": True, "rot90": True, "intensity": 0.1})
    assert ds.element_spec[0].shape.as_list() == [2, 8, 8, 12, 2]
    assert ds.element_spec[1].shape.as_list() == [2, 8, 8, 12, 1]
    got = _batches(ds)
    assert len(got) == 3 == data.steps_per_epoch(root, "train", batch_size=2, training=True, patches_per_volume=2)
    assert all(x.dtype == np.float32 and y.dtype == np.int32 for x, y in got)
    # Without augmentation a patch is an exact crop of one of the volumes.
    ds = data.make_dataset(root, "train", batch_size=1, training=True, patch_size=(8, 8, 8), seed=0)
    x, y = _batches(ds, 1)[0]
    found = False
    for v, l in zip(vols, labs):
        for z in range(9):
            for r in range(9):
                for c in range(9):
                    if np.array_equal(l[z:z + 8, r:r + 8, c:c + 8], y[0, ..., 0]) and np.array_equal(
                        v[z:z + 8, r:r + 8, c:c + 8], x[0]
                    ):
                        found = True
    assert found


@pytest.mark.parametrize("ignore_index,fill", [(255, 255), (None, 0)])
def test_3d_small_volumes_are_padded_evenly(tmp_path, ignore_index, fill):
    rng = np.random.default_rng(1)
    vol = rng.integers(1, 5, (4, 6, 8, 2)).astype(np.float32)  # no zeros, so padding is visible
    lab = np.zeros((4, 6, 8), np.uint8)
    root = _write(tmp_path, {"val": _records_3d([vol], [lab])}, _info_3d(ignore_index))
    (x, y), = _batches(data.make_dataset(root, "val", batch_size=1, training=False, patch_size=(8, 8, 8)))
    assert x.shape == (1, 8, 8, 8, 2)
    np.testing.assert_array_equal(x[0, 2:6, 1:7], vol)
    np.testing.assert_array_equal(y[0, 2:6, 1:7, :, 0], lab)
    pad = np.ones((8, 8, 8), bool)
    pad[2:6, 1:7] = False
    assert (x[0][pad] == 0).all() and (y[0, ..., 0][pad] == fill).all()
    # Training patches of a small volume are the same padded volume, whatever the draw.
    (xt, yt), = _batches(data.make_dataset(root, "val", batch_size=1, training=True, patch_size=(8, 8, 8),
                                           patches_per_volume=1, seed=3))
    np.testing.assert_array_equal(xt, x)
    np.testing.assert_array_equal(yt, y)


def test_3d_validation_patch_is_centred_on_the_labelled_voxels(tmp_path):
    vol = np.zeros((32, 32, 32, 1), np.float32)
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[20:24, 2:5, 26:30] = 3
    root = _write(tmp_path, {"val": _records_3d([vol], [lab])}, _info_3d(channels=1))
    ds = data.make_dataset(root, "val", batch_size=1, training=False, patch_size=(8, 8, 8))
    (_, y), = _batches(ds)
    assert (y == 3).sum() == lab.sum() // 3  # the whole blob is inside the patch


def test_3d_foreground_oversampling_fraction(tmp_path):
    # One labelled voxel in a corner: a uniform 8^3 patch of a 32^3 volume contains it with
    # probability 1/25^3, a foreground-centred patch always does.
    vol = np.zeros((32, 32, 32, 1), np.float32)
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[0, 0, 0] = 1
    root = _write(tmp_path, {"train": _records_3d([vol, vol], [lab, lab])}, _info_3d(channels=1))
    for fraction, lo, hi in [(0.0, 0.0, 0.01), (0.33, 0.23, 0.43), (1.0, 1.0, 1.0)]:
        ds = data.make_dataset(root, "train", batch_size=50, training=True, patch_size=(8, 8, 8), seed=11,
                               patches_per_volume=10, foreground_fraction=fraction, repeat=15)
        hits = np.concatenate([(y == 1).reshape(len(y), -1).any(axis=1) for _, y in _batches(ds)])
        assert len(hits) == 300
        assert lo <= hits.mean() <= hi, (fraction, hits.mean())


def test_3d_augmentation_is_consistent_and_deterministic(tmp_path):
    rng = np.random.default_rng(2)
    labs = [rng.integers(0, 4, (12, 12, 12)).astype(np.uint8) for _ in range(2)]
    vols = [np.stack([l * 2.0, l * -1.0], axis=-1).astype(np.float32) for l in labs]
    root = _write(tmp_path, {"train": _records_3d(vols, labs)}, _info_3d())

    def run(seed):
        return _batches(data.make_dataset(
            root, "train", batch_size=2, training=True, patch_size=(8, 8, 8), seed=seed, deterministic=True,
            augment={"flip3d": 0.5, "rot90": 0.5}, patches_per_volume=3))

    a, b = run(4), run(4)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[..., 0], 2.0 * ya[..., 0])
        np.testing.assert_array_equal(xa[..., 1], -1.0 * ya[..., 0])
    with pytest.raises(TfsegError, match="image_size is for 2D"):
        data.make_dataset(root, "train", batch_size=2, training=True, image_size=(8, 8))
    with pytest.raises(TfsegError, match="augment.hflip"):
        data.make_dataset(root, "train", batch_size=2, training=True, augment={"hflip": 0.5})
