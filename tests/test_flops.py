"""runs/flops.py: the FLOPs of a network counted from its graph against hand-computed values,
and the peak FLOP/s formula on the CPU kinds of docs/benchmarks.md (from written cpuinfo)."""
import pytest
import tensorflow as tf

from runs import flops
from libml.nn.wrn import WideResNet


def test_graph_flops_of_a_tiny_network_by_hand():
    conv1 = tf.random.normal([3, 3, 3, 4])          # 3x3, 3 -> 4 channels, 'same', 8x8
    conv2 = tf.random.normal([1, 1, 4, 8])          # 1x1 stride 2, 4 -> 8, output 4x4
    dense = tf.random.normal([8, 5])

    @tf.function
    def net(x):
        y = tf.nn.conv2d(x, conv1, 1, "SAME")
        y = tf.nn.conv2d(y, conv2, 2, "SAME")
        return tf.matmul(tf.reduce_mean(y, [1, 2]), dense)
    graph = net.get_concrete_function(tf.TensorSpec([2, 8, 8, 3])).graph
    per_image = {"conv": 2 * 8 * 8 * 3 * 3 * 3 * 4 + 2 * 4 * 4 * 1 * 1 * 4 * 8, "dense": 2 * 8 * 5}
    assert per_image == {"conv": 14848, "dense": 80}
    assert flops.graph_flops(graph) == {k: 2 * v for k, v in per_image.items()}   # batch 2


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_forward_flops_of_a_tiny_wide_resnet_by_hand(policy):
    """Stem 3x3 3->16, one block 16->4 (two 3x3 convs and a 1x1 shortcut), dense 4->3, at 4x4."""
    net = WideResNet(3, filters=4, repeat=1, scales=1, dtype=policy).build_for((4, 4, 3))
    stem = 2 * 16 * 9 * 3 * 16
    block = 2 * 16 * 9 * 16 * 4 + 2 * 16 * 9 * 4 * 4 + 2 * 16 * 1 * 16 * 4
    assert (stem, block) == (13824, 25088)
    assert flops.forward_flops(net, (4, 4, 3)) == {"conv": 38912, "dense": 24, "total": 38936}
    # a step: 3 x (3B images forward and backward) + 2B forward-only, B = 64
    assert flops.step_flops(38936, 192, 128) == 38936 * 704


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.144
siblings\t: 2
cpu cores\t: 2
flags\t\t: fpu sse2 fma avx2 avx512f avx512_bf16 avx512_vnni
"""
INTEL_AMX_SMT = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8488C
cpu MHz\t\t: 2400.000
siblings\t: 4
cpu cores\t: 2
flags\t\t: fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
AMD_AVX2 = ZEN4.replace("cpu family\t: 25", "cpu family\t: 23").replace(
    " avx512f avx512_bf16 avx512_vnni", "")
ARM = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd bf16\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_peak_zen4_reads_the_clock_from_cpuinfo(tmp_path):
    info = write(tmp_path, "cpuinfo", ZEN4)
    no_cpufreq = str(tmp_path / "absent{}")
    f32 = flops.cpu_peak("float32", info, usable=2, cpufreq=no_cpufreq)
    assert (f32.cores, f32.ghz, f32.flop_per_cycle) == (2, 2.596144, 32)   # 2 x 256-bit FMA
    assert f32.flops == pytest.approx(2 * 2.596144e9 * 32)
    assert f32.formula().startswith("2 cores x 2.596 GHz (/proc/cpuinfo cpu MHz")
    assert f32.formula().endswith("= 166.2 GFLOP/s")
    bf16 = flops.cpu_peak("mixed_bfloat16", info, usable=2, cpufreq=no_cpufreq)
    assert bf16.flop_per_cycle == 64 and bf16.formula().endswith("= 332.3 GFLOP/s")


def test_peak_counts_physical_cores_and_prefers_cpufreq(tmp_path):
    info = write(tmp_path, "cpuinfo", INTEL_AMX_SMT)
    freq = tmp_path / "cpu0_max"
    freq.write_text("3800000\n")                      # kHz
    pattern = str(tmp_path / "cpu{}_max")
    f32 = flops.cpu_peak("float32", info, usable=4, cpufreq=pattern)
    assert (f32.cores, f32.ghz, f32.clock_source, f32.flop_per_cycle) == \
        (2, 3.8, "cpufreq max", 64)                 # 4 threads on 2 cores; 2 x 512-bit FMA
    assert flops.cpu_peak("mixed_bfloat16", info, usable=4, cpufreq=pattern).flops == \
        pytest.approx(2 * 3.8e9 * 1024)             # AMX-BF16 tiles


def test_peak_without_native_bf16_and_unknown_cpus(tmp_path):
    info = write(tmp_path, "cpuinfo", AMD_AVX2)
    nofreq = str(tmp_path / "absent{}")
    f32 = flops.cpu_peak("float32", info, usable=2, cpufreq=nofreq)
    bf16 = flops.cpu_peak("mixed_bfloat16", info, usable=2, cpufreq=nofreq)
    assert f32.flop_per_cycle == bf16.flop_per_cycle == 32
    assert "emulated" in bf16.unit
    assert flops.cpu_peak("float32", write(tmp_path, "arm", ARM), usable=2, cpufreq=nofreq) is None
