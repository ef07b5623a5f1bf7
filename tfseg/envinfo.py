"""What ``tfseg env`` reports: the versions, the CPU features and the devices that decide how tfseg
runs here, for bug reports.

Every figure in BENCHMARKS.md and every bug report depends on them: the precision ``fit`` picks
(bfloat16 on CPUs with AVX512-BF16 or AMX, float32 on AVX2-only ones, float16 on GPUs), the batch
norm it builds, and the releases pip resolved.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re

from tfseg import runtime

# The instruction sets that decide the precision (and the speed) of a CPU fit, in report order.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def direct_dependencies() -> list[str]:
    """The names of tfseg's install requirements as installed metadata lists them (setup.cfg's
    ``install_requires``, extras left out), so the list is written once."""
    names = []
    for req in importlib.metadata.requires("tfseg") or ():
        if "extra ==" in req:
            continue
        name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]
        if name and name not in names:
            names.append(name)
    return names


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(*, devices: bool = True) -> dict:
    """The report as a dict (what ``tfseg env --json`` prints).

    Args:
      devices: also import TensorFlow and list its devices, the precision and batch norm fit
        would choose (a few seconds); False reports versions and CPU features only.
    """
    import tfseg

    flags = runtime.cpu_flags()
    report = {
        "tfseg": tfseg.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in direct_dependencies()},
        "cpu": {"model": cpu_model(), "cores": _cores(),
                "features": {f: f in flags for f in CPU_FEATURES}},
    }
    if devices:
        import keras
        import tensorflow as tf

        gpus = runtime.num_gpus()
        report["devices"] = [f"{d.device_type}:{d.name.rsplit(':', 1)[-1]}"
                             for d in tf.config.list_physical_devices()]
        report["keras_backend"] = keras.backend.backend()
        report["fit"] = {
            "precision": runtime.resolve_precision("auto", num_gpus=gpus),
            "jit_compile": runtime.resolve_jit_compile("auto", num_gpus=gpus),
            "batch_norm": ("FusedBatchNorm (TensorFlow's fused kernel)" if keras.backend.backend() == "tensorflow"
                           else "keras.layers.BatchNormalization"),
        }
    return report


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def format_text(report: dict) -> str:
    """The report as aligned ``name: value`` lines."""
    lines = [f"tfseg {report['tfseg']}", f"python {report['python']} ({report['platform']})", "packages:"]
    width = max(map(len, report["packages"]), default=0)
    for name, version in report["packages"].items():
        lines.append(f"  {name:<{width}}  {version or 'not installed'}")
    cpu = report["cpu"]
    features = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu["features"].items())
    lines += [f"cpu: {cpu['model']}, {cpu['cores']} cores", f"  {features}"]
    if "devices" in report:
        fit = report["fit"]
        lines += [f"devices: {', '.join(report['devices'])}",
                  f"keras backend: {report['keras_backend']}",
                  f"fit would use: precision {fit['precision']}, batch norm {fit['batch_norm']}, "
                  f"XLA {'on' if fit['jit_compile'] else 'off'}"]
    return "\n".join(lines)

