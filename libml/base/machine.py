"""The ONE place that sets TensorFlow up for the machine, before TensorFlow is imported.

`setup()` runs from the package `__init__` of libml, realmix_tf, data_prep and runs, so every
entry point (`python -m realmix_tf.realmix`, `python -m data_prep.create_split`, a script that
imports libml) has run it before its first `import tensorflow`. It only sets environment
variables the user has not set (the user's value always wins) and reads /proc/cpuinfo:

- TF_ENABLE_ONEDNN_OPTS=1 on x86-64 CPUs with AVX2. TensorFlow turns its oneDNN kernels on by
  itself only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; on an AVX2-only AMD EPYC
  forcing them on made the RealMix step 1.48x faster (docs/benchmarks.md). Elsewhere (ARM,
  CPUs without AVX2) TensorFlow's own default is kept.
- TF_CPP_MIN_LOG_LEVEL=2: no C++ info/warning chatter.
- On a machine without an NVIDIA device, the lines a CUDA build of TensorFlow prints while it
  probes for CUDA ("Could not find cuda drivers", "failed call to cuInit", "All log messages
  before absl::InitializeLog()") are dropped. They are written before TensorFlow's log level
  applies, so the only way is to catch file descriptor 2 while `tensorflow` is imported: an
  import hook does that and writes every other line back. TF_CPP_MIN_LOG_LEVEL=0 or 1 (set by
  the user) keeps everything.

Threads: TensorFlow's defaults (intra-op = inter-op = the core count) are kept; the user's
TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS override them.

What `--mixed_precision=auto` picks is libml/train/precision_probe.py's (it reads the CPU and GPUs
from here); `describe()` is the CPU / ISA /
oneDNN line printed by runs/bench_step and the trainer's start banner.
"""
import glob
import importlib.abc
import importlib.util
import os
import platform as _stdlib_platform
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

CPUINFO = "/proc/cpuinfo"
# CPU features with which TensorFlow enables oneDNN by itself (tensorflow/core/util/util.cc).
ONEDNN_BY_DEFAULT = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")
# What the CUDA build prints on a machine without a GPU, before its log level applies.
CUDA_PROBE_NOISE = ("All log messages before absl::InitializeLog()", "cudart_stub.cc",
                    "failed call to cuInit", "oneDNN custom operations are on",
                    "cpu_feature_guard.cc", "Unable to register cu", "TF-TRT Warning")
_state = {"done": False, "applied": {}}   # setup() on os.environ: once per process


# ---------------------------------------------------------------------------------------------
# What the machine is

def cpu_info(path: str = CPUINFO) -> Tuple[str, frozenset]:
    """(model name, set of lower-case ISA flags) of the first CPU in /proc/cpuinfo; on systems
    without it, (platform.processor(), empty set)."""
    model, flags = "", frozenset()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.lower().split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or _stdlib_platform.processor() or _stdlib_platform.machine(), flags


def is_x86(machine: Optional[str] = None) -> bool:
    return (machine or _stdlib_platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def isa_line(flags: Iterable[str]) -> str:
    """'AVX2 yes | AVX-512 yes (avx512_bf16 avx512_fp16 avx512_vnni) | AMX no' for the banner."""
    flags = set(flags)
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    extra = [f for f in ("avx512_bf16", "avx512_fp16", "avx512_vnni") if f in flags]
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"AVX2 {'yes' if 'avx2' in flags else 'no'} | AVX-512 "
            f"{'yes' if avx512 else 'no'}{' (' + ' '.join(extra) + ')' if extra else ''} | AMX "
            f"{'yes (' + ' '.join(amx) + ')' if amx else 'no'}")


def onednn_default(flags: Iterable[str]) -> bool:
    """Whether TensorFlow turns oneDNN on by itself on a CPU with these flags."""
    return any(f in set(flags) for f in ONEDNN_BY_DEFAULT)


def native_bf16(flags: Iterable[str]) -> bool:
    return any(f in set(flags) for f in NATIVE_BF16)


def has_nvidia_device() -> bool:
    """An NVIDIA driver or device node is present (checked without importing TensorFlow)."""
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


# ---------------------------------------------------------------------------------------------
# Setup before `import tensorflow`

def onednn_setting(flags: Iterable[str], machine: Optional[str] = None) -> Optional[str]:
    """"1" where oneDNN should be forced on (x86 with AVX2), None to keep TensorFlow's default."""
    return "1" if is_x86(machine) and "avx2" in set(flags) else None


def setup(environ=None, cpuinfo: str = CPUINFO, machine: Optional[str] = None,
          quiet_import: Optional[bool] = None) -> Dict[str, str]:
    """Sets the environment for TensorFlow once per process; returns {variable: value} of what
    this call set (the user's own settings are left alone and not listed)."""
    environ = os.environ if environ is None else environ
    if environ is os.environ and _state["done"]:
        return dict(_state["applied"])
    _, flags = cpu_info(cpuinfo)
    wanted = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    onednn = onednn_setting(flags, machine)
    if onednn is not None:
        wanted["TF_ENABLE_ONEDNN_OPTS"] = onednn
    applied = {}
    for name, value in wanted.items():
        if name not in environ:
            environ[name] = applied[name] = value
    if environ is os.environ:
        _state.update(done=True, applied=dict(applied))
        if quiet_import is None:
            quiet_import = environ.get("TF_CPP_MIN_LOG_LEVEL", "2") not in ("0", "1") \
                and not has_nvidia_device()
        if quiet_import and "tensorflow" not in sys.modules:
            install_quiet_import()
    return applied



# ---------------------------------------------------------------------------------------------
# Quiet import: file descriptor 2 caught while `tensorflow` is imported

def filter_lines(text: str, noise: Sequence[str] = CUDA_PROBE_NOISE) -> str:
    """Text without the lines that contain one of `noise` (and the continuation line of TF's
    cpu_feature_guard message)."""
    kept, skip_next = [], False
    for line in text.splitlines(keepends=True):
        if skip_next and line.startswith("To enable the following instructions"):
            skip_next = False
            continue
        skip_next = "cpu_feature_guard.cc" in line
        if not any(n in line for n in noise):
            kept.append(line)
    return "".join(kept)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` through the other finders and wraps its loader so that fd 2 goes to a
    temporary file during the import and the probe for devices; what is not noise is written
    back to the real fd 2 afterwards (also when the import fails)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall_quiet_import()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            try:
                with _caught_stderr():
                    exec_module(module)
                    # The CUDA build tries cuInit when devices are first listed: do it inside.
                    module.config.list_physical_devices()
            finally:
                del spec.loader.exec_module

        spec.loader.exec_module = quiet_exec_module
        return spec


class _caught_stderr:
    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        kept = filter_lines(text)
        if kept:
            os.write(2, kept.encode())
        return False


def install_quiet_import() -> None:
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def uninstall_quiet_import() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietImport)]


# ---------------------------------------------------------------------------------------------
# Precision by hardware

def gpu_compute_capabilities() -> List[Tuple[int, int]]:
    """Compute capability of each visible GPU ((0, 0) when TensorFlow does not say)."""
    import tensorflow as tf
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        caps.append(tuple(details.get("compute_capability") or (0, 0)))
    return caps


def onednn_enabled() -> bool:
    """Whether this TensorFlow runs its oneDNN kernels (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port
    return bool(_pywrap_util_port.IsMklEnabled())


def onednn_state() -> str:
    """'on (TensorFlow's default)' / 'on (TF_ENABLE_ONEDNN_OPTS=1, set by libml.base.machine)' /
    'off (TF_ENABLE_ONEDNN_OPTS=0, by the user)' (imports TensorFlow)."""
    on = onednn_enabled()
    env = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    source = f"TF_ENABLE_ONEDNN_OPTS={env}" if env is not None else "TensorFlow's default"
    by = "set by libml.base.machine" if "TF_ENABLE_ONEDNN_OPTS" in _state["applied"] else "by the user"
    return f"{'on' if on else 'off'} ({source}{', ' + by if env is not None else ''})"


def describe() -> List[str]:
    """Lines for a banner: CPU model and cores, ISA, oneDNN state, threads (imports TF)."""
    model, flags = cpu_info()
    import tensorflow as tf
    intra = (tf.config.threading.get_intra_op_parallelism_threads()
             or os.environ.get("TF_NUM_INTRAOP_THREADS") or os.cpu_count())
    inter = (tf.config.threading.get_inter_op_parallelism_threads()
             or os.environ.get("TF_NUM_INTEROP_THREADS") or os.cpu_count())
    return [f"CPU: {model}, {os.cpu_count()} cores ({_stdlib_platform.machine()})",
            f"ISA: {isa_line(flags)}",
            f"oneDNN: {onednn_state()}; TF {tf.__version__}; threads intra-op {intra}, "
            f"inter-op {inter}"]
