"""What the CLI prints at the end of long work: stage headers, the per-class table, where things are."""

from __future__ import annotations

import click

from tfseg.errors import safe


def echo_stage(stage: str, skipped: bool) -> None:
    click.secho(f"==> {stage}" + (" (complete output exists, skipped)" if skipped else ""), bold=True)


def echo_summary(summary: dict) -> None:
    """The end of `tfseg run` / `tfseg demo`: the per-class table, where the report and the model are."""
    metrics = summary.get("metrics")
    if metrics:
        click.echo(metric_table(metrics))
    if summary.get("report"):
        click.echo(safe(f"report:  {summary['report']}"))
    if summary.get("export"):
        click.echo(safe(f"export:  {summary['export']}  (serve it with tensorflow/serving; see its README.md)"))


def metric_table(metrics: dict) -> str:
    """Per-class IoU and precision in both definitions, plus the task's headline scores."""
    dl, pi = metrics["dataset_level"], metrics["per_image_mean"]
    _f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731  (NaN is stored as null)
    lines = [f"{'class':<14} {'IoU':>7} {'prec':>7} {'IoU/img':>8} {'prec/img':>9}"]
    for name in metrics["class_names"]:
        row = [dl["per_class"]["iou"].get(name), dl["per_class"]["precision"].get(name),
               pi["per_class"]["iou"].get(name), pi["per_class"]["precision"].get(name)]
        lines.append(f"{name[:14]:<14} " + " ".join(
            f"{v:>{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}}" for v, w in zip(row, (7, 7, 8, 9))))
    lines.append(f"mean IoU {_f(dl['mean_iou'])} (dataset-level), {_f(pi['mean_iou'])} (per-image mean), "
                 f"{metrics['num_images']} images of split {metrics['split']!r}")
    if metrics.get("binary"):
        b = metrics["binary"]
        lines.append(f"foreground Dice {_f(b['foreground_dice'])}, "
                     f"thresholded Jaccard {_f(b['thresholded_jaccard'])}")
    for region, r in ((metrics.get("regions") or {}).get("mean") or {}).items():
        lines.append(f"{region}: Dice {_f(r['dice'])}, HD95 {_f(r['hd95_mm'])} mm")
    return "\n".join(lines)
