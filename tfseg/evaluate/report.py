"""Pictures and markdown tables for the evaluate stage.

Everything here takes numpy arrays and plain dicts and writes files; matplotlib runs on the Agg
backend (no display needed) and is imported lazily so importing tfseg stays cheap.

Pictures:
  - :func:`plot_samples`: one row per sample, image | truth | prediction, masks drawn with a class
    palette over the image;
  - :func:`plot_confusion_matrix`: the row-normalized confusion matrix (each true class sums to 1);
  - :func:`plot_history`: loss and val_loss per epoch, and the main metric with its validation
    curve, from a fit run's history.csv.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from tfseg.io import fs
from tfseg.visualize import IGNORE_COLOR, colorize, overlay, to_display, voc_colormap  # noqa: F401

log = logging.getLogger(__name__)

# Matplotlib would otherwise try a GUI backend on machines with a display; the evaluate stage
# only ever writes files.
_BACKEND = "Agg"


def _pyplot():
    import matplotlib

    matplotlib.use(_BACKEND, force=True)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# Colours (defined in tfseg.visualize, shared with predict, export and TensorBoard)
# --------------------------------------------------------------------------------------------


def palette(num_classes: int) -> np.ndarray:
    """Pascal VOC's colour map: (num_classes, 3) uint8 (see :func:`tfseg.visualize.voc_colormap`)."""
    return voc_colormap(num_classes)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def plot_samples(
    samples: Sequence[dict],
    class_names: Sequence[str],
    path: str,
    *,
    ignore_index: int | None = None,
    colors: np.ndarray | None = None,
) -> str:
    """Writes an image | truth | prediction grid, one row per sample.

    Args:
      samples: dicts with ``image`` (H, W[, C]), ``truth`` and ``prediction`` (H, W) class ids,
        and ``title`` (str).
      class_names: one name per class id, for the legend.
      path: the PNG to write.
      colors: (K, 3) uint8 class colours (:func:`tfseg.visualize.dataset_colors`); default the
        fixed map of :func:`tfseg.visualize.default_colors`.

    Returns:
      ``path``.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    from tfseg.visualize import default_colors, is_background

    colors = default_colors(len(class_names)) if colors is None else np.asarray(colors, np.uint8)
    paint0 = not is_background(class_names)
    n = max(len(samples), 1)
    # Rows as tall as the samples' aspect ratio needs, so wide photos leave no blank bands.
    aspects = [np.asarray(s["truth"]).shape[0] / max(np.asarray(s["truth"]).shape[1], 1) for s in samples]
    row_in = float(np.clip(3 * max(aspects or [1.0]), 1.2, 6.0)) + 0.3
    fig, axes = plt.subplots(n, 3, figsize=(9, row_in * n), squeeze=False)
    for row, s in enumerate(samples):
        panels = (
            (to_display(s["image"]), s.get("title", "")),
            (overlay(s["image"], s["truth"], colors, ignore_index=ignore_index, paint_background=paint0), "truth"),
            (overlay(s["image"], s["prediction"], colors, ignore_index=ignore_index, paint_background=paint0),
             "prediction"),
        )
        for col, (img, title) in enumerate(panels):
            axes[row, col].imshow(img, interpolation="nearest")
            axes[row, col].set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    handles = [Patch(color=colors[c] / 255.0, label=name) for c, name in enumerate(class_names)]
    if ignore_index is not None:
        handles.append(Patch(facecolor="white", edgecolor="gray", label="ignore"))
    ncol = min(len(handles), 6)
    legend_in = 0.25 * math.ceil(len(handles) / ncol) + 0.2
    fig.set_size_inches(9, row_in * n + legend_in)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (row_in * n + legend_in), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str) -> str:
    """Writes the row-normalized confusion matrix as a heatmap.

    Args:
      cm: (K, K) counts, ``cm[true, predicted]``.
      class_names: K names.
      path: the PNG to write.
    """
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(class_names), rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels=list(class_names), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (each true class sums to 1)")
    if k <= 25:
        for t in range(k):
            for p in range(k):
                ax.text(p, t, f"{norm[t, p]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[t, p] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_history(path: str) -> dict[str, list[float]]:
    """Reads a Keras CSVLogger file, on any filesystem, into ``{column: [value per epoch]}``
    (non-numbers -> NaN)."""
    from tfseg.fit.history import read_csv_rows

    rows = read_csv_rows(path)
    cols: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key is None:
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                v = float("nan")
            cols.setdefault(key, []).append(v)
    return cols


def main_metric(columns: Sequence[str], monitor: str | None = None) -> str | None:
    """Picks the metric column to plot beside the loss.

    The fit's monitored metric when it is a column (``val_`` stripped), else the first column
    that names an IoU, then a Dice, then any other metric that has a ``val_`` twin.
    """
    cols = list(columns)
    if monitor:
        name = monitor[4:] if monitor.startswith("val_") else monitor
        if name in cols and name != "loss":
            return name
    skip = {"epoch", "loss", "lr", "learning_rate"}
    train = [c for c in cols if not c.startswith("val_") and c not in skip]
    for key in ("iou", "dice"):
        for c in train:
            if key in c.lower():
                return c
    with_val = [c for c in train if f"val_{c}" in cols]
    return (with_val or train or [None])[0]


def plot_history(history_csv: str, path: str, *, monitor: str | None = None) -> str | None:
    """Writes the training curves of a fit run: loss and val_loss, the main metric and its val.

    Args:
      history_csv: RUN_DIR/history.csv (Keras CSVLogger: ``epoch`` then one column per log).
      path: the PNG to write.
      monitor: the fit's monitored quantity (e.g. ``val_mean_iou``), to choose the metric.

    Returns:
      ``path``, or None when the file is missing or has no epochs (nothing written).
    """
    if not fs.isfile(history_csv):
        log.warning("%s: not found; no training history plot", history_csv)
        return None
    hist = read_history(history_csv)
    n = len(next(iter(hist.values()), []))
    if n == 0:
        log.warning("%s: no epochs; no training history plot", history_csv)
        return None
    epochs = hist.get("epoch", list(range(n)))
    epochs = [e + 1 for e in epochs]  # Keras counts epochs from 0 in the CSV.
    metric = main_metric(hist.keys(), monitor)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", ["loss", "val_loss"])]
    if metric:
        panels.append((metric, [metric, f"val_{metric}"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if key in hist:
                ax.plot(epochs, hist[key], marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def fmt(value, digits: int = 4) -> str:
    """A table cell: numbers rounded, None/NaN as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; ``|`` in cells is escaped."""

    def cell(v):
        return fmt(v).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _health_line(health: dict | None) -> str:
    """fit's end-of-training check (tfseg.fit.bnstats.fit_health): training vs inference mode."""
    if not health or health.get("inference_mode_mean_iou") is None:
        return ""
    verdict = "agree" if health.get("ok") else "DISAGREE: the published model's normalization statistics do not fit its weights"
    return (f"- fit health: on {health.get('batches')} training batches, inference-mode mean IoU "
            f"{health['inference_mode_mean_iou']:.3f} vs training-mode {health['train_mode_mean_iou']:.3f} ({verdict})\n")


def render_markdown(metrics: dict) -> str:
    """report.md from the evaluate stage's metrics dict (see :mod:`tfseg.evaluate`)."""
    names = metrics["class_names"]
    ds, pi = metrics["dataset_level"], metrics["per_image_mean"]
    inf = metrics.get("inference", {})
    parts = [
        f"# Evaluation of `{metrics.get('model') or 'model'}` on split `{metrics['split']}`\n\n",
        (f"- served model: `{metrics['export_dir']}` (scored through its serving signature)\n"
         if metrics.get("export_dir") else ""),
        f"- run: `{metrics.get('run_dir')}`\n- data: `{metrics.get('data_dir')}`\n"
        f"- images scored: {metrics['num_images']} (unlabelled skipped: {metrics.get('unlabelled_skipped', 0)})\n"
        f"- inference: {inf.get('mode')} at {inf.get('size')}, "
        f"TTA flips over spatial axes {inf.get('tta_flip_axes') or 'none'}, {inf.get('precision', 'float32')}; "
        "scored at each image's original resolution\n",
        _health_line(metrics.get("training_health")),
        "\n## Summary\n\n",
        markdown_table(
            ["metric", "dataset-level", "per-image mean"],
            [
                ["mean IoU", ds["mean_iou"], pi["mean_iou"]],
                ["mean Dice", ds["mean_dice"], pi["mean_dice"]],
                ["pixel accuracy", ds["pixel_accuracy"], None],
            ],
        ),
    ]
    b = metrics.get("binary")
    if b:
        parts += [
            "\n## Binary foreground\n\n",
            markdown_table(
                ["metric", "value"],
                [
                    ["foreground Dice (dataset-level)", b["foreground_dice"]],
                    ["foreground IoU (dataset-level)", b["foreground_iou"]],
                    ["Dice, mean over images", b["per_image_dice_mean"]],
                    ["Jaccard, mean over images", b["per_image_jaccard_mean"]],
                    [f"thresholded Jaccard (ISIC, < {b['jaccard_threshold']} -> 0)", b["thresholded_jaccard"]],
                ],
            ),
            f"\n{b['definition']}.\n",
        ]
    r = metrics.get("regions")
    if r:
        regions = list(r["mean"])
        parts += [
            "\n## Regions (mean over cases)\n\n",
            markdown_table(
                ["region", "class ids", "Dice", "HD95 (mm)", "HD95 median (mm)"],
                [[n, ",".join(map(str, r["class_ids"][n])), r["mean"][n]["dice"],
                  r["mean"][n]["hd95_mm"], r["mean"][n]["hd95_mm_median"]] for n in regions],
            ),
            "\n### Per case\n\n",
            markdown_table(
                ["case"] + [f"{n} Dice" for n in regions] + [f"{n} HD95 (mm)" for n in regions],
                [[c["source_id"]] + [c[n]["dice"] for n in regions] + [c[n]["hd95_mm"] for n in regions]
                 for c in r["per_case"]],
            ),
            f"\n{r['definition']}.\n",
        ]
    for title, block, extra in (
        ("Per class, dataset-level", ds, ("truth pixels", ds["truth_pixels"])),
        ("Per class, per-image mean", pi, ("images with class", pi["images_with_class"])),
    ):
        pc = block["per_class"]
        parts += [
            f"\n## {title}\n\n",
            f"{block['definition']}.\n\n",
            markdown_table(
                ["class", "IoU", "precision", "recall", "Dice", extra[0]],
                [[n, pc["iou"][n], pc["precision"][n], pc["recall"][n], pc["dice"][n], extra[1][n]]
                 for n in names],
            ),
        ]
    pics = metrics.get("pictures", {})
    captions = {
        "samples": "Samples (image | truth | prediction)",
        "confusion_matrix": "Confusion matrix (rows: true class, normalized)",
        "history": "Training history",
    }
    if pics:
        parts.append("\n## Pictures\n\n")
        for key, caption in captions.items():
            if key in pics:
                parts.append(f"\n### {caption}\n\n![{caption}]({pics[key]})\n")
    parts.append("\nAll numbers are in metrics.json; – marks a score that is undefined (class absent).\n")
    return "".join(parts)
