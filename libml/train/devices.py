"""Choosing the tf.distribute strategy, reading TF_CONFIG, and the chief/worker roles.

Flags (fields of libml/train/config.py's TrainConfig):
    --distribute=auto|none|mirrored|multiworker
        auto:        MultiWorkerMirroredStrategy when TF_CONFIG names several tasks, else
                     MirroredStrategy when several GPUs (or --cpu_devices > 1) are visible,
                     else the default one-device strategy;
        none:        one device, whatever is visible;
        mirrored:    MirroredStrategy over every local GPU (or the --cpu_devices logical CPUs);
        multiworker: MultiWorkerMirroredStrategy configured by TF_CONFIG (one process per host).
    --cpu_devices=N  split the CPU into N logical devices (tests, trying it on a laptop); its
                     default is the environment variable REALMIX_CPU_DEVICES (0 = off). It must
                     act before TensorFlow initialises its devices: `make_strategy` does it,
                     and the trainer calls it before any other TensorFlow work.
    --worker_timeout=S  seconds to wait for the other workers at start and in each collective.
    --collective=auto|ring|nccl  the all-reduce implementation of MultiWorkerMirroredStrategy
                     (auto: TensorFlow's choice, ring in 2.21; nccl: between GPUs).
    --replica_mode=global|per_replica  what a step with several replicas computes
                     (libml/nn/replicas.py).

`--batch` is the global batch: each of the W workers reads batch / W rows from its own shard
of the data (`SSLData(shard=...)`) and `split_batch` gives each of its local replicas its part.

Roles (TensorFlow's multi-worker guide): the chief (task "chief", or worker 0 when there is
none) writes checkpoints, summaries, reports and exports; the other workers run the same code,
including every save and export (reading the replicated state is a collective), but write
only their input positions (libml/run/worker_folder.py).
"""
import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Callable, List, Optional

from libml.base.errors import UserError
from libml.nn.replicas import GLOBAL, PER_REPLICA, REPLICA_MODES  # noqa: F401 (re-exported)

DISTRIBUTE_CHOICES = ("auto", "none", "mirrored", "multiworker")
COLLECTIVES = ("auto", "ring", "nccl")              # --collective (multi-worker all-reduces)
CPU_DEVICES_ENV = "REALMIX_CPU_DEVICES"
DEFAULT_WORKER_TIMEOUT = 300
TF_CONFIG_HELP = ('set TF_CONFIG to {"cluster": {"worker": ["host0:port", "host1:port"]}, '
                  '"task": {"type": "worker", "index": 0}} (docs/usage_distributed.md)')


def env_cpu_devices() -> int:
    value = os.environ.get(CPU_DEVICES_ENV, "0") or "0"
    try:
        count = int(value)
    except ValueError:
        raise UserError(f"{CPU_DEVICES_ENV}={value!r} is not a number: set it to a device "
                        f"count such as 2, or unset it") from None
    if count < 0:
        raise UserError(f"{CPU_DEVICES_ENV}={count} is negative: use 0 (off) or a device count")
    return count


# ---------------------------------------------------------------------------------------------
# TF_CONFIG

@dataclasses.dataclass(frozen=True)
class Cluster:
    """What TF_CONFIG says: the training tasks' addresses and this process's role."""
    workers: List[str]            # every training task, the chief first when there is one
    task_type: str = "worker"
    task_index: int = 0
    has_chief: bool = False       # a separate "chief" task (else worker 0 is the chief)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def worker_id(self) -> int:
        """0 .. num_workers - 1 (position in `workers`); the chief is 0."""
        if self.task_type == "chief":
            return 0
        return self.task_index + int(self.has_chief)

    @property
    def is_chief(self) -> bool:
        return self.worker_id == 0


def parse_tf_config(text: Optional[str]) -> Optional[Cluster]:
    """A Cluster from the TF_CONFIG text, None when unset/empty; UserError (one line) when
    malformed. Tasks of other types (ps, evaluator) are refused: only synchronous data-parallel
    training is supported."""
    if not text or not text.strip():
        return None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({str(e).splitlines()[0]}): "
                        f"{TF_CONFIG_HELP}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise UserError(f"TF_CONFIG has no \"cluster\" object: {TF_CONFIG_HELP}")
    cluster, task = config["cluster"], config.get("task")
    other = sorted(set(cluster) - {"chief", "worker"})
    if other:
        raise UserError(f"TF_CONFIG names {', '.join(other)} tasks: only chief and worker tasks "
                        f"(synchronous training) are supported, drop the others")
    chief, workers = cluster.get("chief", []), cluster.get("worker", [])
    for name, hosts in (("chief", chief), ("worker", workers)):
        if not isinstance(hosts, list) or not all(_is_address(h) for h in hosts):
            raise UserError(f"TF_CONFIG cluster.{name} must be a list of \"host:port\" strings, "
                            f"got {json.dumps(hosts)}: {TF_CONFIG_HELP}")
    if len(chief) > 1:
        raise UserError(f"TF_CONFIG names {len(chief)} chiefs: name at most one")
    if not chief and not workers:
        raise UserError(f"TF_CONFIG cluster names no task: {TF_CONFIG_HELP}")
    if not isinstance(task, dict) or task.get("type") not in ("chief", "worker"):
        raise UserError(f"TF_CONFIG has no \"task\" of type chief or worker (got "
                        f"{json.dumps(task)}): {TF_CONFIG_HELP}")
    index = task.get("index", 0)
    listed = chief if task["type"] == "chief" else workers
    if not isinstance(index, int) or not 0 <= index < len(listed):
        raise UserError(f"TF_CONFIG task index {json.dumps(index)} is out of range for "
                        f"{len(listed)} {task['type']} task(s): use 0 .. {len(listed) - 1}")
    return Cluster(workers=list(chief) + list(workers), task_type=task["type"], task_index=index,
                   has_chief=bool(chief))


def _is_address(value) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, port = value.rsplit(":", 1)
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def current_cluster() -> Optional[Cluster]:
    return parse_tf_config(os.environ.get("TF_CONFIG"))


# ---------------------------------------------------------------------------------------------
# Devices and strategy

def configure_devices(cpu_devices: int) -> None:
    """Splits the first CPU into `cpu_devices` logical devices (no-op for 0 or 1)."""
    if cpu_devices < 0:
        raise UserError(f"--cpu_devices={cpu_devices} is negative: use 0 (off) or a count")
    if cpu_devices <= 1:
        return
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * cpu_devices
    if len(tf.config.get_logical_device_configuration(cpu) or []) == cpu_devices:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        raise UserError(f"--cpu_devices={cpu_devices} came after TensorFlow initialised its "
                        f"devices: set {CPU_DEVICES_ENV}={cpu_devices} in the environment "
                        f"instead") from None


def resolve_kind(distribute: str, cluster: Optional[Cluster], gpus: int = 0,
                 cpus: int = 1) -> str:
    """none | mirrored | multiworker from the flag, TF_CONFIG and the visible devices (pure)."""
    if distribute not in DISTRIBUTE_CHOICES:
        raise UserError(f"--distribute={distribute!r} is unknown: use one of "
                        f"{', '.join(DISTRIBUTE_CHOICES)}")
    if distribute == "multiworker" and cluster is None:
        raise UserError(f"--distribute=multiworker needs TF_CONFIG: {TF_CONFIG_HELP}")
    if distribute == "auto":
        if cluster is not None and cluster.num_workers > 1:
            return "multiworker"
        return "mirrored" if max(gpus, cpus) > 1 else "none"
    return distribute


def communication(collective: str, gpus: int):
    """--collective -> tf.distribute.experimental.CommunicationImplementation. auto leaves the
    choice to TensorFlow, which (2.21) runs ring all-reduces and all-gathers everywhere; nccl
    asks for NCCL between GPUs (one-line UserError without a GPU on this worker)."""
    import tensorflow as tf
    kinds = tf.distribute.experimental.CommunicationImplementation
    if collective not in COLLECTIVES:
        raise UserError(f"--collective={collective!r} is unknown: use one of "
                        f"{', '.join(COLLECTIVES)}")
    if collective == "nccl" and not gpus:
        raise UserError("--collective=nccl needs GPUs and this worker sees none: use "
                        "--collective=auto or ring, or run on GPU hosts")
    return {"auto": kinds.AUTO, "ring": kinds.RING, "nccl": kinds.NCCL}[collective]


def make_strategy(distribute: str = "auto", cpu_devices: int = 0,
                  worker_timeout: float = DEFAULT_WORKER_TIMEOUT, collective: str = "auto"):
    """The strategy for these flags. Call it before any other TensorFlow work: logical devices
    and collective ops can only be configured at start-up. `collective` (--collective) chooses
    the all-reduce implementation of MultiWorkerMirroredStrategy; MirroredStrategy on one host
    keeps TensorFlow's choice (NCCL between GPUs)."""
    import tensorflow as tf
    cluster = current_cluster()
    if resolve_kind(distribute, cluster) == "multiworker":   # decided by TF_CONFIG alone
        configure_devices(cpu_devices)
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=worker_timeout, implementation=communication(
                collective, len(tf.config.list_physical_devices("GPU"))))
        rendezvous(cluster, worker_timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    configure_devices(cpu_devices)
    gpus = len(tf.config.list_logical_devices("GPU"))
    cpus = len(tf.config.list_logical_devices("CPU")) if cpu_devices > 1 else 1
    if resolve_kind(distribute, cluster, gpus, cpus) == "none":
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(None if gpus else [f"/cpu:{i}" for i in range(cpus)])


def rendezvous(cluster: Cluster, timeout: float) -> None:
    """Waits until every task of TF_CONFIG is up, before MultiWorkerMirroredStrategy is built
    (its constructor blocks, deaf to signals, until all tasks have joined). Each task listens on
    its own port meanwhile and probes the others; UserError naming the missing tasks after
    `timeout` seconds. The listener is closed before TensorFlow's server takes the port."""
    port = int(cluster.workers[cluster.worker_id].rsplit(":", 1)[1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(64)
    except OSError as e:
        listener.close()
        raise UserError(f"port {port} of this task ({cluster.workers[cluster.worker_id]}) is "
                        f"busy ({e.strerror}): stop the process using it or change TF_CONFIG") from None
    deadline = time.monotonic() + timeout
    pending = [i for i in range(cluster.num_workers) if i != cluster.worker_id]
    try:
        while pending:
            pending = [i for i in pending if not _listening(cluster.workers[i])]
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{i} at {cluster.workers[i]}" for i in pending)
                raise UserError(f"worker {names} not reachable within {timeout:g} s: start every "
                                f"task named in TF_CONFIG, check the addresses, or raise "
                                f"--worker_timeout")
            time.sleep(0.2 if pending else 0)
    finally:
        listener.close()


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def split_batch(strategy, batch):
    """This worker's batch (nested tensors with a static first dimension) as a per-replica
    value: local replica i gets rows i*b .. (i+1)*b, b = rows / local replicas. The batch
    comes from a plain tf.data iterator, which a checkpoint can hold (a distributed iterator
    cannot: TensorFlow issue 56372)."""
    if strategy.num_replicas_in_sync == 1:
        return batch
    import tensorflow as tf
    local = len(strategy.extended.worker_devices)

    def part(ctx):
        i = ctx.replica_id_in_sync_group % local

        def rows(t):
            size = t.shape[0] // local
            return t[i * size:(i + 1) * size]
        return tf.nest.map_structure(rows, batch)

    return strategy.experimental_distribute_values_from_function(part)


# ---------------------------------------------------------------------------------------------
# Small batches

MIN_ROWS_PER_DEVICE = 2      # oneDNN's CPU kernels crash on a batch of 1 row (and 0 rows)
REAL = "real"                # the key that marks a padded evaluation batch's real rows


def check_train_batch(batch: int, replicas: int, on_cpu: bool, onednn: bool) -> None:
    """--batch over `replicas` devices: it must split evenly, and (CPU with oneDNN on, whose
    kernels crash on a 1-row batch: segfault or `free(): invalid next size`) give each device
    at least MIN_ROWS_PER_DEVICE rows. One-line UserError otherwise."""
    if batch % replicas:
        raise UserError(f"--batch={batch} does not split over {replicas} devices: use a "
                        f"multiple of {replicas}")
    if on_cpu and onednn and batch // replicas < MIN_ROWS_PER_DEVICE:
        raise UserError(f"--batch={batch} gives {batch // replicas} row per device on {replicas} "
                        f"CPU device(s), which crashes TensorFlow's oneDNN kernels: use "
                        f"--batch={MIN_ROWS_PER_DEVICE * replicas} or more, or turn oneDNN off "
                        f"(TF_ENABLE_ONEDNN_OPTS=0)")


def pad_batches(dataset, replicas: int):
    """Evaluation batches padded so every device gets the same number of rows, at least
    MIN_ROWS_PER_DEVICE (a short last batch would leave a device 0 or 1 row, which oneDNN's
    kernels fail on). Padded rows are zeros with label -1 (never counted) and REAL false
    (dropped from per-image outputs by libml/train/evaluate.py)."""
    import tensorflow as tf

    def pad(batch):
        rows = tf.shape(batch["label"])[0]
        per_device = tf.maximum((rows + replicas - 1) // replicas, MIN_ROWS_PER_DEVICE)
        extra = per_device * replicas - rows

        def padded(t, value):
            return tf.pad(t, [[0, extra]] + [[0, 0]] * (t.shape.rank - 1), constant_values=value)

        out = {k: padded(v, tf.constant(-1 if k == "label" else 0, v.dtype))
               for k, v in batch.items()}
        out[REAL] = tf.range(per_device * replicas) < rows
        return out

    return dataset.map(pad)


def distribute_eval(strategy, dataset):
    """A dataset of evaluation batches (dicts with "label") -> a distributed dataset whose
    every batch gives every device the same number of rows, at least MIN_ROWS_PER_DEVICE."""
    return strategy.experimental_distribute_dataset(
        pad_batches(dataset, strategy.num_replicas_in_sync))


# ---------------------------------------------------------------------------------------------
# Roles

class WorkerRole:
    """Who this process is: worker `worker_id` of `num_workers`; the chief (worker 0, or a
    single process) writes the run folder. A non-chief worker writes only its input position
    (libml/run/worker_folder.py)."""

    def __init__(self, cluster: Optional[Cluster] = None):
        self.cluster = cluster
        self.worker_id = cluster.worker_id if cluster is not None else 0
        self.num_workers = cluster.num_workers if cluster is not None else 1
        self.is_chief = self.worker_id == 0


def lost_worker_message(error_text: str, cluster: Optional[Cluster], worker_id: int,
                        checkpoint: str) -> str:
    """The one line for a collective that failed because another worker went away: which
    worker (from the task index or the address TensorFlow names, when it names one), how to
    relaunch, and where the run resumes."""
    import re
    workers = cluster.workers if cluster is not None else []
    lost = {int(i) for i in re.findall(r"task:(\d+)", error_text)}
    if cluster is not None and cluster.has_chief:        # job worker's task i = worker i + 1
        lost = {i + 1 for i in lost}
    lost |= {i for i, address in enumerate(workers) if address in error_text}
    lost = sorted(i for i in lost if i != worker_id and i < len(workers))
    if lost:
        who = ", ".join(f"worker {i} ({workers[i]})" for i in lost)
    else:
        who = "another worker" + (f" (of {', '.join(workers)})" if workers else "")
    resume = (f"it resumes from {os.path.basename(checkpoint)}, which is intact" if checkpoint
              else "it starts over (no checkpoint was saved yet)")
    return (f"{who} was lost: relaunch every worker with the same command (each host its own "
            f"TF_CONFIG, as before): {resume}")


@contextlib.contextmanager
def lost_workers(role: "WorkerRole", checkpoint: Callable[[], str]):
    """A collective that fails because a worker died (TensorFlow's UnavailableError, or a
    deadline/abort after --worker_timeout) becomes lost_worker_message's UserError (exit 2).
    `checkpoint()`: the newest complete checkpoint of the run."""
    import tensorflow as tf
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError) as e:
        if role.num_workers <= 1:
            raise
        raise UserError(lost_worker_message(str(e), role.cluster, role.worker_id,
                                            checkpoint() or "")) from None


def role_for(strategy) -> WorkerRole:
    """The role of this process under `strategy` (chief unless multi-worker)."""
    import tensorflow as tf
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerRole(current_cluster())
    return WorkerRole()
