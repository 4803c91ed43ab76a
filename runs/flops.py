"""How much arithmetic a step does, and how much the CPU could do: FLOPs and peak FLOP/s.

Counting (`forward_flops`): the network's forward pass is traced once for one image and every
Conv2D and MatMul of the graph is counted from its shapes, a multiply-add being 2 FLOPs:

    Conv2D  2 * Ho * Wo * kh * kw * Cin * Cout        MatMul  2 * M * K * N

BN, activations, pooling, the losses and the optimizer are left out (a few percent of the
arithmetic, bound by memory). A train step of N images forward and backward costs 3x the
forward FLOPs (the backward pass computes gradients of the inputs and of the weights, each as
much as the forward), a forward pass without gradient 1x.

Peak (`cpu_peak`): cores x clock x FLOP per cycle per core, where
FLOP per cycle = FMA pipes x lanes x 2 for float32 (lanes = FMA data-path bits / 32);
bf16 with AVX512_BF16 (VDPBF16PS: 2 products per float32 lane) doubles it; AMX-BF16 does 1024
per cycle per core. The clock is read from /sys (cpufreq's maximum) or else /proc/cpuinfo
("cpu MHz", which in a virtual machine is often the nominal clock, not the boost clock).
Cores are physical: the CPUs this process may use x cores / siblings of /proc/cpuinfo.
"""
import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple

from libml.base import machine as platform

CPUFREQ = "/sys/devices/system/cpu/cpu{}/cpufreq/cpuinfo_max_freq"


# ---------------------------------------------------------------------------------------------
# FLOPs of the network

def graph_flops(graph) -> Dict[str, int]:
    """{'conv': FLOPs, 'dense': FLOPs} of the Conv2D and MatMul ops of a graph with static
    shapes."""
    counts = {"conv": 0, "dense": 0}
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kh, kw, cin, cout = op.inputs[1].shape.as_list()
            n, ho, wo, c = op.outputs[0].shape.as_list()
            assert c == cout, op.name
            counts["conv"] += 2 * n * ho * wo * kh * kw * cin * cout
        elif op.type in ("MatMul", "BatchMatMulV2"):
            a, b = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
            m = a[-1] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") else a[-2]
            k = a[-2] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") else a[-1]
            n = b[-2] if op.get_attr("transpose_b" if op.type == "MatMul" else "adj_y") else b[-1]
            batch = 1
            for d in a[:-2]:
                batch *= d
            counts["dense"] += 2 * batch * m * k * n
    return counts


def forward_flops(net, image_shape: Sequence[int]) -> Dict[str, int]:
    """FLOPs of one image's forward pass through the Keras model `net` (training-mode BN,
    which changes no FLOP count): {'conv': ..., 'dense': ..., 'total': ...}."""
    import tensorflow as tf
    spec = tf.TensorSpec([1, *image_shape], tf.float32)
    graph = tf.function(lambda x: net(x, training=True, update_bn_stats=False)) \
        .get_concrete_function(spec).graph
    counts = graph_flops(graph)
    counts["total"] = counts["conv"] + counts["dense"]
    return counts


def step_flops(forward: int, backward_images: int, forward_only_images: int) -> int:
    """FLOPs of a step: forward+backward on `backward_images` (3x forward each) plus
    forward-only passes on `forward_only_images`."""
    return forward * (3 * backward_images + forward_only_images)


# ---------------------------------------------------------------------------------------------
# Peak of the CPU

@dataclasses.dataclass
class Peak:
    cores: int
    ghz: float
    clock_source: str
    flop_per_cycle: int           # per core
    unit: str                     # what gives flop_per_cycle

    @property
    def flops(self) -> float:
        return self.cores * self.ghz * 1e9 * self.flop_per_cycle

    def formula(self) -> str:
        return (f"{self.cores} cores x {self.ghz:.3f} GHz ({self.clock_source}) x "
                f"{self.flop_per_cycle} FLOP/cycle ({self.unit}) = {self.flops / 1e9:.1f} GFLOP/s")


def cpu_fields(path: str = platform.CPUINFO) -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, plus the highest 'cpu MHz' of all."""
    fields: Dict[str, str] = {}
    mhz = []
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "cpu MHz":
                    try:
                        mhz.append(float(value))
                    except ValueError:
                        pass
                fields.setdefault(key, value)
    except OSError:
        pass
    if mhz:
        fields["cpu MHz"] = str(max(mhz))
    return fields


def clock_ghz(fields: Dict[str, str], cpufreq: str = CPUFREQ) -> Tuple[Optional[float], str]:
    """(GHz, where it was read) of cpu0: cpufreq's maximum, else /proc/cpuinfo's cpu MHz."""
    try:
        with open(cpufreq.format(0)) as f:
            return int(f.read().strip()) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        pass
    try:
        return float(fields["cpu MHz"]) / 1e3, "/proc/cpuinfo cpu MHz; a boost clock may exceed it"
    except (KeyError, ValueError):
        return None, "unknown"


def physical_cores(fields: Dict[str, str], usable: Optional[int] = None) -> int:
    """CPUs this process may use, counted as physical cores (x cores / siblings)."""
    if usable is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    try:
        ratio = int(fields["cpu cores"]) / int(fields["siblings"])
    except (KeyError, ValueError, ZeroDivisionError):
        ratio = 1.0
    return max(1, int(round(usable * min(ratio, 1.0))))


def fma_float32(fields: Dict[str, str], flags) -> Tuple[Optional[int], str]:
    """(float32 FLOP per cycle per core, the unit) from the vendor, family and ISA."""
    flags = set(flags)
    vendor, family = fields.get("vendor_id", ""), fields.get("cpu family", "")
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family == "25":      # Zen 4: AVX-512 on 256-bit pipes
            return 2 * 8 * 2, "Zen 4: 2 FMA pipes x 256 bit (8 float32 lanes) x 2"
        return 2 * 16 * 2, "2 FMA pipes x 512 bit (16 float32 lanes) x 2"
    if "fma" in flags and "avx2" in flags:
        return 2 * 8 * 2, "2 FMA pipes x 256 bit (8 float32 lanes) x 2"
    return None, "FMA width unknown for this CPU"


def cpu_peak(precision: str, cpuinfo: str = platform.CPUINFO, usable: Optional[int] = None,
             cpufreq: str = CPUFREQ) -> Optional[Peak]:
    """Peak FLOP/s of this CPU for a Keras policy (None when its FMA width is unknown)."""
    fields = cpu_fields(cpuinfo)
    flags = platform.cpu_info(cpuinfo)[1]
    ghz, source = clock_ghz(fields, cpufreq)
    per_cycle, unit = fma_float32(fields, flags)
    if ghz is None or per_cycle is None:
        return None
    if precision == "mixed_bfloat16":
        if "amx_bf16" in flags:
            per_cycle, unit = 1024, "AMX-BF16 tiles"
        elif "avx512_bf16" in flags:
            per_cycle, unit = 2 * per_cycle, f"AVX512_BF16 dot products: 2 x ({unit})"
        else:
            unit += ", bf16 emulated in float32"
    return Peak(physical_cores(fields, usable), ghz, source, per_cycle, unit)
