"""Where and how training runs: the tf.distribute strategy, the precision policy and XLA.

Selection rules (``tfseg fit`` documents them to users):

* strategy: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set; ``MirroredStrategy`` over N
  logical CPU devices with ``--cpu-replicas N`` (to exercise the distributed path on a laptop);
  ``MirroredStrategy`` over all local GPUs when there are two or more; TensorFlow's default
  (single device) strategy otherwise.
* precision ``auto``: ``mixed_float16`` on GPUs; ``mixed_bfloat16`` on CPUs with native bf16
  (AVX512_BF16 or AMX; a U-Net step with tfseg's fused batch norm took 2.16x less CPU time than
  float32 with Keras's batch norm there, BENCHMARKS.md, while float16 on CPU is ~4x slower);
  ``float32`` otherwise.
* jit_compile ``auto``: on for GPUs only (XLA made the CPU U-Net 2.4x slower here).

Logical CPU devices can only be configured before TensorFlow initializes its devices, so
:func:`make_strategy` must run before the first tensor is created in the process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from typing import Callable

from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
# The policies a model can be run in (an export, a forced --precision): all but "auto".
POLICIES = PRECISIONS[:-1]
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX)."""
    return bool(cpu_flags(cpuinfo) & set(_BF16_CPU_FLAGS))


def resolve_precision(precision: str, *, num_gpus: int, cpuinfo: str = "/proc/cpuinfo") -> str:
    """Turns ``auto`` into a Keras dtype policy name; other names pass through.

    Raises:
      TfsegError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise TfsegError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if num_gpus > 0:
        return "mixed_float16"
    if cpu_has_native_bf16(cpuinfo):
        return "mixed_bfloat16"
    return "float32"


def resolve_jit_compile(jit_compile, *, num_gpus: int) -> bool:
    """``"auto"``/None -> True on GPUs only; booleans pass through."""
    if jit_compile in (None, "auto"):
        return num_gpus > 0
    if isinstance(jit_compile, bool):
        return jit_compile
    raise TfsegError(f"jit_compile {jit_compile!r}: expected true, false or auto")


def tf_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable, or None when unset/empty.

    Raises:
      TfsegError: TF_CONFIG is not valid JSON.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise TfsegError(f"TF_CONFIG: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict):
        raise TfsegError("TF_CONFIG: expected a JSON object with 'cluster' and 'task'")
    task = cfg.get("task") or {}
    kind, index = task.get("type", "worker"), task.get("index", 0)
    members = cfg["cluster"].get(kind)
    if not isinstance(members, list) or not members:
        raise TfsegError(f"TF_CONFIG: task type {kind!r} has no addresses in the cluster "
                         f"({', '.join(sorted(cfg['cluster'])) or 'empty'})")
    if not isinstance(index, int) or not 0 <= index < len(members):
        raise TfsegError(f"TF_CONFIG: task index {index!r} is outside the cluster's {len(members)} {kind} "
                         f"address(es)")
    return cfg


def peers() -> list[tuple[str, str]]:
    """(task name, address) of every other member of the TF_CONFIG cluster."""
    cfg = tf_config() or {}
    task = cfg.get("task") or {}
    me = (task.get("type", "worker"), task.get("index", 0))
    return [(f"{kind} {i}", addr) for kind, addrs in sorted(cfg.get("cluster", {}).items())
            for i, addr in enumerate(addrs) if (kind, i) != me]


def own_address() -> str | None:
    """This task's ``host:port`` in TF_CONFIG."""
    cfg = tf_config() or {}
    task = cfg.get("task") or {}
    members = cfg.get("cluster", {}).get(task.get("type", "worker")) or []
    index = task.get("index", 0)
    return members[index] if isinstance(index, int) and 0 <= index < len(members) else None


def is_chief() -> bool:
    """Whether this process writes the run's outputs (always, outside multi-worker training).

    Without an explicit ``chief`` task the first worker is the chief, as in TensorFlow.
    """
    cfg = tf_config()
    if cfg is None:
        return True
    task = cfg.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in cfg.get("cluster", {})


def configure_cpu_replicas(n: int) -> None:
    """Splits the physical CPU into ``n`` logical devices (a no-op when already so configured).

    Raises:
      TfsegError: TensorFlow already initialized its devices with another layout.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == n:
            return
        raise TfsegError(
            f"--cpu-replicas {n}: TensorFlow already initialized {have} CPU device(s) in this "
            "process; set cpu replicas in a fresh process"
        ) from None


def make_strategy(cpu_replicas: int | None = None, peer_timeout: float = 300.0):
    """Creates the tf.distribute strategy for this process (see the module docstring).

    Call this before any other TensorFlow work: both the logical CPU split and the
    multi-worker collectives must be configured before TensorFlow initializes.

    Args:
      cpu_replicas: split the CPU into this many logical devices and mirror over them;
        None or 0 for the automatic choice.
      peer_timeout: multi-worker: seconds a collective may wait for the other workers.

    Returns:
      A ``tf.distribute.Strategy``.

    Raises:
      TfsegError: conflicting or impossible settings.
    """
    import tensorflow as tf

    if cpu_replicas is not None and int(cpu_replicas) < 0:
        raise TfsegError(f"--cpu-replicas {cpu_replicas}: must be >= 1")
    if tf_config() is not None:
        if cpu_replicas and int(cpu_replicas) > 1:
            raise TfsegError("--cpu-replicas cannot be combined with TF_CONFIG (multi-worker training)")
        from tfseg.watchdog import Deadline, wait_for_peers

        wait_for_peers(own_address(), peers(), peer_timeout, "TF_CONFIG: waiting for the other workers")

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(peer_timeout))
        # TensorFlow waits here for every worker, holding the GIL: guarded from outside Python.
        with Deadline(peer_timeout, peers(), "TF_CONFIG: waiting for the other workers"):
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        logger.info("MultiWorkerMirroredStrategy: %d replicas in sync", strategy.num_replicas_in_sync)
        return strategy
    if cpu_replicas and int(cpu_replicas) > 1:
        n = int(cpu_replicas)
        configure_cpu_replicas(n)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:n]
        logger.info("MirroredStrategy over %d logical CPU devices", n)
        # Collectives on CPU devices: the NCCL default is GPU-only.
        return tf.distribute.MirroredStrategy(
            devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        logger.info("MirroredStrategy over %d GPUs", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def num_gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def set_precision(policy: str) -> str:
    """Sets the Keras global dtype policy; returns the previous policy's name."""
    import keras

    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(policy)
    return previous


def check_keras_version(installed: str | None = None) -> None:
    """Refuses a Keras outside the range tfseg's install requirement allows (setup.cfg, read from
    the installed metadata: the range is written once), before :func:`patch_keras_multi_worker`
    touches Keras's private trainer, which a newer Keras may have changed.

    Raises:
      TfsegError: one line naming the installed version and the supported range.
    """
    from importlib.metadata import PackageNotFoundError, requires

    import keras
    from packaging.requirements import Requirement

    installed = installed or keras.__version__
    try:
        reqs = [Requirement(r) for r in requires("tfseg") or () if "extra ==" not in r]
    except PackageNotFoundError:  # running from a source tree that is not installed
        return
    spec = next((r.specifier for r in reqs if r.name == "keras"), None)
    if spec is not None and not spec.contains(installed, prereleases=True):
        raise TfsegError(f"keras {installed}: multi-worker training works around Keras internals tested on "
                         f"keras{spec} only; install that range (pip install 'keras{spec}')")


def patch_keras_multi_worker(model, strategy) -> None:
    """Works around Keras 3 (3.15) failing ``fit`` under MultiWorkerMirroredStrategy.

    Two places in Keras' TF trainer break with more than one worker (tensorflow#72388):

    * before the first step, the input batch is merged across replicas with an eager
      ``strategy.reduce``, which raises "Attempt to convert a value (PerReplica...)". The build
      needs only shapes, so this model builds from the first local replica's batch instead;
    * every step's scalar logs are reduced with ``strategy.reduce("MEAN", v, axis=0)``, which
      is invalid for scalars ("Invalid reduction dimension 0"). Reducing them with ``axis=None``
      is the cross-worker mean Keras meant. Only multi-worker strategies take this path.

    Epoch logs are unaffected: Keras computes them from the metrics' aggregated state.
    """
    import tensorflow as tf

    check_keras_version()
    from keras.src.backend.tensorflow import trainer as tf_trainer  # private: see check_keras_version

    def local_value(v):
        if isinstance(v, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(v)[0]
        return v

    built = []

    def maybe_symbolic_build(iterator=None, data_batch=None):
        # Once is enough: the first call (fit) builds the optimizer, losses and metrics.
        if built:
            return
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local_value, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)
        built.append(True)

    model._maybe_symbolic_build = maybe_symbolic_build

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_tfseg_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if isinstance(v, tf.distribute.DistributedValues)
                else v,
                values,
            )
        return original(values, strategy, reduction)

    reduce_per_replica._tfseg_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def strategy_name(strategy) -> str:
    """A stable name for run.json: MultiWorkerMirroredStrategy, MirroredStrategy or default."""
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "MirroredStrategy"
    return "default" if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy() else type(strategy).__name__


@contextlib.contextmanager
def filtered_stderr(is_noise: Callable[[str], bool]):
    """Runs the block with file descriptor 2 captured, then writes back every line that
    ``is_noise`` does not match: C++ code (TensorFlow's start-up, the LiteRT converter) writes
    straight to fd 2, where no logging setting reaches. Without a real fd 2 (an embedding host)
    the block runs as is."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
