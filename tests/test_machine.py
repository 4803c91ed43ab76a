"""libml.base.machine: machine set-up before TensorFlow is imported, and the hardware precision
choice (faked CPU flags / GPU details; this machine's own kind is only one of them)."""
import os
import subprocess
import sys

import pytest

from libml.train import precision_probe
from libml.base import machine as platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# /proc/cpuinfo excerpts of the two CPU kinds the project runs on, and an ARM server.
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2
"""
INTEL_AVX512_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 avx_vnni
"""
INTEL_AMX = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
INTEL_AVX512_NO_BF16 = """model name\t: Intel(R) Xeon(R) Gold 6148
flags\t\t: avx2 avx512f avx512bw avx512vl
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16
"""


def write(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_cpu_info_reads_model_and_flags_of_the_first_cpu(tmp_path):
    model, flags = platform.cpu_info(write(tmp_path, AMD_AVX2))
    assert model == "AMD EPYC 7B13"
    assert "avx2" in flags and "sha_ni" in flags and "avx512f" not in flags
    assert platform.cpu_info(write(tmp_path, ARM))[1] >= {"asimd", "bf16"}
    assert platform.cpu_info(str(tmp_path / "missing"))[1] == frozenset()


def test_isa_line_names_avx2_avx512_and_amx(tmp_path):
    assert platform.isa_line(platform.cpu_info(write(tmp_path, AMD_AVX2))[1]) == \
        "AVX2 yes | AVX-512 no | AMX no"
    assert platform.isa_line(platform.cpu_info(write(tmp_path, INTEL_AVX512_BF16))[1]) == \
        "AVX2 yes | AVX-512 yes (avx512_bf16 avx512_fp16 avx512_vnni) | AMX no"
    assert platform.isa_line(platform.cpu_info(write(tmp_path, INTEL_AMX))[1]).endswith(
        "AMX yes (amx_bf16 amx_int8 amx_tile)")


@pytest.mark.parametrize("cpu, machine, onednn", [
    (AMD_AVX2, "x86_64", "1"),               # TF leaves oneDNN off here: forced on (1.48x)
    (INTEL_AVX512_BF16, "x86_64", "1"),      # TF's default is already on: same setting
    (INTEL_AVX512_NO_BF16, "x86_64", "1"),
    ("flags\t: sse2 avx\n", "x86_64", None),  # no AVX2: TF's default kept
    (ARM, "aarch64", None),
])
def test_setup_sets_onednn_where_faster_and_quiet_logs(tmp_path, cpu, machine, onednn):
    env = {}
    applied = platform.setup(environ=env, cpuinfo=write(tmp_path, cpu), machine=machine)
    assert env.get("TF_ENABLE_ONEDNN_OPTS") == onednn
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert applied == env


def test_setup_never_overrides_the_users_settings(tmp_path):
    env = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "0"}
    assert platform.setup(environ=env, cpuinfo=write(tmp_path, AMD_AVX2), machine="x86_64") == {}
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "0"}


def test_onednn_default_matches_tensorflows_rule(tmp_path):
    def flags(text):
        return platform.cpu_info(write(tmp_path, text))[1]
    assert not platform.onednn_default(flags(AMD_AVX2))
    assert not platform.onednn_default(flags(INTEL_AVX512_NO_BF16))
    assert platform.onednn_default(flags(INTEL_AVX512_BF16))
    assert platform.onednn_default(flags(INTEL_AMX))


@pytest.mark.parametrize("cpu, measured", [
    (AMD_AVX2, False),                       # no bf16 instructions: float32, not measured
    (INTEL_AVX512_NO_BF16, False),
    (INTEL_AVX512_BF16, True),               # the same flag was 1.7x slower (Intel), 1.79x
    (INTEL_AMX, True),                       # faster (AMD Zen 4): measured (precision_probe)
])
def test_auto_precision_on_cpus_measures_where_bf16_exists(tmp_path, cpu, measured):
    from libml.train import precision_probe
    flags = platform.cpu_info(write(tmp_path, cpu))[1]
    timings = {"float32": 1.62, "mixed_bfloat16": 0.91}
    calls = []

    def timer():
        calls.append(1)
        return timings
    policy, _ = precision_probe.auto_precision(flags, [], lambda f: precision_probe.cpu_precision(
        path=str(tmp_path / "c.json"), key={"cpu": "x"}, flags=f, measure_fn=timer,
        say=lambda line: None))
    assert (policy, len(calls)) == (("mixed_bfloat16", 1) if measured else ("float32", 0))


@pytest.mark.parametrize("caps, policy", [
    ([(8, 0)], "mixed_bfloat16"),             # A100: bf16, no loss scaling
    ([(9, 0), (8, 6)], "mixed_bfloat16"),
    ([(7, 0)], "mixed_float16"),              # V100: fp16 + loss scaling
    ([(8, 0), (7, 5)], "mixed_float16"),      # the oldest GPU decides
    ([(0, 0)], "mixed_float16"),              # capability unknown: the safe fp16 path
])
def test_auto_precision_on_gpus_ignores_the_cpu(tmp_path, caps, policy):
    flags = platform.cpu_info(write(tmp_path, AMD_AVX2))[1]
    choice, reason = precision_probe.auto_precision(cpu_flags=flags, gpu_capabilities=caps)
    assert choice == policy
    assert "GPU compute capability" in reason


def test_auto_precision_float16_gets_loss_scaling():
    """The fp16 choice trains with a LossScaleOptimizer (SSLModel adds it for mixed_float16)."""
    import keras
    from realmix_tf.supervised import Supervised
    model = Supervised(10, (8, 8, 3), filters=4, repeat=1,
                       precision=precision_probe.auto_precision([], [(7, 0)])[0])
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_filter_lines_drops_the_cuda_probe_and_keeps_the_rest():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1.1 1 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
            "I0000 00:00:1.2 1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            "To enable the following instructions: AVX2 FMA, in other operations, rebuild\n"
            "E0000 00:00:1.3 1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n"
            "a real warning\n"
            "Traceback (most recent call last):\n")
    assert platform.filter_lines(text) == "a real warning\nTraceback (most recent call last):\n"


def test_caught_stderr_writes_back_what_is_not_noise(capfd):
    with platform._caught_stderr():
        os.write(2, b"I0 cudart_stub.cc:31] Could not find cuda drivers\nkeep this line\n")
    assert capfd.readouterr().err == "keep this line\n"


BLOCK_TF = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            p = sys.modules.get("libml.base.machine")     # not imported here: that would run setup
            raise SystemExit("setup-before-tf" if p and p._state["done"] else "tf-first")
sys.meta_path.insert(0, Block())
import {module}

print("no-tf")
"""


def first_tensorflow_import(module):
    """Stops a process at its first `import tensorflow` and reports whether setup had run."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_TF.format(module=module)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["realmix_tf.realmix", "data_prep.create_split",
                                    "runs.bench_step", "libml.train.trainer"])
def test_every_entry_point_runs_setup_before_tensorflow_is_imported(module):
    assert first_tensorflow_import(module) == "setup-before-tf"


def test_the_entry_point_check_sees_an_early_import():
    assert first_tensorflow_import("keras") == "tf-first"


@pytest.mark.skipif(platform.has_nvidia_device(), reason="a GPU machine probes CUDA for real")
def test_importing_tensorflow_after_libml_prints_no_cuda_probe_lines():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("import libml, tensorflow as tf; tf.config.list_physical_devices(); "
            "import sys; print('after', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "after\n"


def test_trainer_default_precision_is_auto_and_asks_the_platform(monkeypatch):
    from libml.train.config import TrainConfig
    config = TrainConfig()
    assert config.mixed_precision == "auto"
    monkeypatch.setattr(precision_probe, "auto_precision", lambda: ("mixed_float16", "GPU cc 7.0"))
    assert config.precision() == "mixed_float16"
    assert config.precision_choice() == ("mixed_float16", "--mixed_precision=auto: GPU cc 7.0")
    assert TrainConfig(mixed_precision="none").precision_choice() == \
        ("float32", "--mixed_precision=none")
    assert TrainConfig(mixed_precision="bf16").model_kwargs()["precision"] == "mixed_bfloat16"
