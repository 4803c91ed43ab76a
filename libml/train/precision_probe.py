"""--mixed_precision=auto on a CPU: decided by measuring the model, cached per machine.

CPU flags cannot say whether bf16 is faster: with the same AVX512_BF16 flag the RealMix step
was 1.7x slower in bf16 on an Intel Xeon and 1.79x faster on an AMD EPYC Zen 4
(docs/benchmarks.md). So the first time on a machine a few train steps of the actual network
(WideResNet, 32x32, forward + backward + Adam; `PROBE`) are timed in each candidate precision,
alternating, and the median CPU time of each decides: bf16 when it is at least 5 % faster
(`MARGIN`), else float32. That takes seconds and is done once: the timings are kept in
`{XDG_CACHE_HOME or ~/.cache}/realmix_tf/auto_precision.json` ($REALMIX_CACHE_DIR overrides
the folder) for this CPU model, this
TensorFlow version and this TF_ENABLE_ONEDNN_OPTS; when any of them changes, or the file is
unreadable, the probe runs again and the file is replaced (written atomically; a cache folder
that cannot be written costs a note, never the run).

CPUs without bf16 instructions (no AVX512_BF16 or AMX-BF16 on x86, no `bf16` feature on ARM)
are not measured: bf16 is emulated there, 8x slower than float32 on an AVX2 EPYC. GPUs keep
the rule of `auto_precision` (below).

`cpu_precision()` -> (Keras dtype policy, the reason the start banner prints).
"""
import datetime
import importlib.metadata
import json
import math
import os
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from libml.base import machine

CANDIDATES = ("float32", "mixed_bfloat16")
SHORT = {"float32": "float32", "mixed_bfloat16": "bf16"}
MARGIN = 0.95          # bf16 only when its step takes <= 95 % of float32's
CACHE_NAME = "auto_precision.json"
# What is timed: a train step of the default network's widths and resolution (32/64/128
# channels at 32/16/8 px) with 2 blocks per stage instead of 4 (half the tracing time; the
# blocks repeat the same convolutions), on a small batch.
PROBE = dict(filters=32, repeat=2, size=32, batch=32, warmup=1, rounds=5)
_memo: Dict[str, Tuple[str, str]] = {}      # cache path -> choice, once per process


CACHE_DIR_ENV = "REALMIX_CACHE_DIR"      # overrides the folder (the tests point it elsewhere)


def cache_path(environ=None) -> str:
    """$REALMIX_CACHE_DIR/auto_precision.json, else {XDG_CACHE_HOME or ~/.cache}/realmix_tf/."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_DIR_ENV):
        return os.path.join(environ[CACHE_DIR_ENV], CACHE_NAME)
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "realmix_tf", CACHE_NAME)


def tensorflow_version() -> str:
    """The installed TensorFlow's version, without importing it when not yet imported."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"].__version__
    for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly", "tensorflow-intel"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import tensorflow as tf
    return tf.__version__


def machine_key(environ=None) -> dict:
    """What a cached measurement is valid for."""
    environ = os.environ if environ is None else environ
    return {"cpu": machine.cpu_info()[0], "tensorflow": tensorflow_version(),
            "TF_ENABLE_ONEDNN_OPTS": environ.get("TF_ENABLE_ONEDNN_OPTS")}


def has_bf16_instructions(flags) -> bool:
    flags = set(flags)
    return machine.native_bf16(flags) or "bf16" in flags     # x86 / ARM (Features: bf16)


def choose(seconds: Dict[str, float]) -> Tuple[str, str]:
    """(policy, comparison) from seconds per step of float32 and mixed_bfloat16."""
    f32, bf16 = seconds["float32"], seconds["mixed_bfloat16"]
    ratio = f32 / bf16
    if bf16 <= MARGIN * f32:
        verdict = f"bf16 {ratio:.2f}x faster"
        return "mixed_bfloat16", verdict
    verdict = (f"bf16 {1 / ratio:.2f}x slower" if ratio < 1 else
               f"bf16 only {ratio:.2f}x faster (< {1 / MARGIN:.2f}x)")
    return "float32", verdict


def describe_probe(probe=PROBE) -> str:
    depth = 6 * probe["repeat"] + 4
    width = probe["filters"] // 16
    return (f"WRN-{depth}-{width} train step, batch {probe['batch']}, {probe['size']}x"
            f"{probe['size']}")


def measure(probe=PROBE, candidates=CANDIDATES) -> Dict[str, float]:
    """Process CPU seconds (all threads) per train step (forward + backward + Adam) of the
    WideResNet in each precision, the median of `rounds` rounds: `warmup` untimed steps each
    (tracing), then each round times one step of every precision, in turn and in alternating
    order. CPU time rather than the wall clock: on a machine shared with other jobs the wall
    clock of one step varied 2x between rounds, its CPU time by a few percent. Call it
    outside any tf.distribute strategy scope."""
    import keras
    import numpy as np
    import tensorflow as tf
    from libml.nn.wrn import WideResNet
    rng = np.random.RandomState(0)
    shape = (probe["batch"], probe["size"], probe["size"], 3)
    x = tf.constant(rng.uniform(-1, 1, shape), tf.float32)
    y = tf.constant(rng.randint(0, 10, probe["batch"]), tf.int64)
    steps = {}
    for policy in candidates:
        net = WideResNet(10, filters=probe["filters"], repeat=probe["repeat"],
                         scales=3, dtype=policy, name=f"probe_{policy}").build_for(shape[1:])
        optimizer = keras.optimizers.Adam(learning_rate=1e-4)
        optimizer.build(net.trainable_variables)

        @tf.function
        def step(net=net, optimizer=optimizer):
            with tf.GradientTape() as tape:
                logits = net(x, training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            grads = tape.gradient(loss, net.trainable_variables)
            optimizer.apply_gradients(zip(grads, net.trainable_variables))
            return loss
        for _ in range(probe["warmup"]):
            step().numpy()
        steps[policy] = step
    seconds = {policy: [] for policy in candidates}
    for r in range(probe["rounds"]):
        for policy in (candidates if r % 2 == 0 else candidates[::-1]):
            start = time.process_time()
            steps[policy]().numpy()
            seconds[policy].append(time.process_time() - start)
    return {policy: float(np.median(s)) for policy, s in seconds.items()}


def read_cache(path: str, key: dict) -> Tuple[Optional[dict], str]:
    """(record, '') when `path` holds a valid measurement for `key`; else (None, why not).
    Never raises: a missing, unreadable or malformed file is a reason to measure."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None, "first time on this machine"
    except (OSError, ValueError) as e:
        return None, f"unreadable {path} ({type(e).__name__})"
    if not isinstance(record, dict):
        return None, f"malformed {path}"
    for name, value in key.items():
        if record.get(name) != value:
            return None, f"{name} changed ({record.get(name)} -> {value})"
    seconds = record.get("seconds_per_step")
    if not (isinstance(seconds, dict) and all(
            isinstance(seconds.get(p), (int, float)) and not isinstance(seconds.get(p), bool)
            and 0 < seconds[p] < math.inf for p in CANDIDATES)):
        return None, f"malformed {path} (no timings)"
    return record, ""


def write_cache(path: str, record: dict, say: Callable[[str], None]) -> bool:
    """Writes the record atomically; a folder that cannot be written is a note."""
    from libml.base.errors import UserError
    from libml.base.files import write_json
    try:
        write_json(path, record, overwrite=True)
        return True
    except (OSError, UserError) as e:
        say(f"note: could not keep the precision measurement in {path} ({e}); it will be "
            f"measured again next time")
        return False


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def tf_config_workers(environ=None) -> int:
    """Training tasks TF_CONFIG names (1 without it; a malformed one is the strategy's error)."""
    from libml.train.devices import parse_tf_config
    from libml.base.errors import UserError
    environ = os.environ if environ is None else environ
    try:
        cluster = parse_tf_config(environ.get("TF_CONFIG"))
    except UserError:
        return 1
    return cluster.num_workers if cluster else 1


def cpu_precision(path: Optional[str] = None, key: Optional[dict] = None, flags=None,
                  measure_fn: Callable[[], Dict[str, float]] = None,
                  say: Callable[[str], None] = _say, environ=None) -> Tuple[str, str]:
    """(policy, reason) for --mixed_precision=auto on this CPU: cached timings when valid for
    `key` (this machine by default), else a measurement (`measure_fn`, default `measure`),
    written back to `path`. With several workers (TF_CONFIG) nothing is measured: each host
    would measure on its own and could pick another precision, so float32."""
    flags = machine.cpu_info()[1] if flags is None else set(flags)
    if not has_bf16_instructions(flags):
        return "float32", ("CPU without bf16 instructions (no AVX512_BF16, AMX or ARM bf16): "
                           "emulated bf16 is several times slower")
    workers = tf_config_workers(environ)
    if workers > 1:
        return "float32", (f"{workers} workers (TF_CONFIG): not measured, as each host would "
                           f"measure on its own and could pick another precision; pass "
                           f"--mixed_precision=bf16 to train in bf16")
    path = path or cache_path()
    key = machine_key() if key is None else key
    memo_key = json.dumps([path, key], sort_keys=True)
    if measure_fn is None and memo_key in _memo:
        return _memo[memo_key]
    record, why = read_cache(path, key)
    if record is None:
        say(f"--mixed_precision=auto: timing float32 and bf16 on this CPU ({why}; "
            f"{describe_probe()}, a few seconds, once per CPU model and TensorFlow version)")
        seconds = (measure_fn or measure)()
        record = dict(key, seconds_per_step={p: float(seconds[p]) for p in CANDIDATES},
                      probe=describe_probe(),
                      measured=datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds"))
        kept = write_cache(path, record, say)
        source = f"measured now{', kept in ' + path if kept else ''}"
    else:
        source = f"measured {record.get('measured', '')}, cached in {path}".replace("  ", " ")
    policy, verdict = choose(record["seconds_per_step"])
    s = record["seconds_per_step"]
    reason = (f"{verdict}: float32 {s['float32']:.3f} s, bf16 {s['mixed_bfloat16']:.3f} s CPU per "
              f"{record.get('probe') or describe_probe()} ({source})")
    if measure_fn is None:
        _memo[memo_key] = (policy, reason)
    return policy, reason


def auto_precision(cpu_flags: Optional[Iterable[str]] = None,
                   gpu_capabilities: Optional[List[Tuple[int, int]]] = None,
                   cpu_choice=None) -> Tuple[str, str]:
    """(Keras dtype policy, reason) for --mixed_precision=auto.

    GPUs (the oldest one decides): compute capability >= 8.0 -> mixed_bfloat16 (no loss scaling
    needed), older -> mixed_float16 (SSLModel adds loss scaling). CPU only: measured, see
    `cpu_choice(flags)`, default cpu_precision (below): the
    same AVX512_BF16 flag meant bf16 1.7x slower on an Intel Xeon and 1.79x faster on an AMD
    Zen 4 (docs/benchmarks.md). Arguments default to this machine (the GPU list needs
    TensorFlow)."""
    if gpu_capabilities is None:
        gpu_capabilities = machine.gpu_compute_capabilities()
    if gpu_capabilities:
        oldest = min(gpu_capabilities)
        cc = f"{oldest[0]}.{oldest[1]}"
        if oldest >= (8, 0):
            return "mixed_bfloat16", f"GPU compute capability {cc} >= 8.0: native bf16"
        return "mixed_float16", f"GPU compute capability {cc} < 8.0: fp16 with loss scaling"
    flags = machine.cpu_info()[1] if cpu_flags is None else set(cpu_flags)
    return (cpu_choice or (lambda f: cpu_precision(flags=f)))(flags)
