"""Benchmark of the RealMix train step against the bare compute it contains.

RealMix step (WRN-28-2, batch B labeled + B unlabeled x 2 views) =
  2 guess passes of B (training-mode BN, no gradient) + forward/backward on 3B + Adam/WD/EMA.
Bare compute = the same network: two no-gradient training-mode passes on B, plus a supervised
forward+backward on 3B images with an Adam step (no MixUp, no interleave, no WD, no EMA).

  python -m runs.bench_step --precisions=float32,mixed_bfloat16 --tsa=linear --gamma=0.6
  python -m runs.bench_step --peer=../MixMatch-pytorch --peer_python=../torchvenv/bin/python

Prints the machine (CPU model, AVX2 / AVX-512 / AMX flags, TensorFlow's oneDNN state, load
average), then s/step (median and best of the rounds), steps/s and images/s (labeled images:
B per step) for each precision, the ratio RealMix/bare, and the bf16 speed-up. With --peer, the
PyTorch MixMatch port's own train() step (runs/peer_step.py; bf16 = torch.autocast) runs in its
own process and takes part in every round, so the RealMix/port ratio is measured side by side.
Warm-up steps (tracing) are excluded; the steps alternate so that other jobs slow all alike.

Beside s/step: the step's FLOPs (runs/flops.py: the Conv2D and MatMul ops of the network's
forward pass counted once from their shapes; a step = 2B forward-only images (the label
guess) + 3B images forward and backward (3x forward) = 11 B x forward FLOPs; RealMix, bare
and the port do the same arithmetic) and the achieved FLOP/s against the CPU's peak for the
precision (cores x clock x FLOP per cycle, the formula printed). A peer that fails (no torch,
no such Python, an error in the port) is one line, and the benchmark goes on without it.
"""
import os
import time

import numpy as np
import tensorflow as tf
from absl import flags

from libml.train import precision_probe
from libml.base import cli
from runs import flops
from realmix_tf import gamma_auto
from libml.base import machine as platform
from libml.train.config import PRECISIONS
from libml.base.errors import UserError
from realmix_tf import registry
from realmix_tf.realmix import RealMix
from runs.peer_step import PEER_PRECISIONS, PeerError, PeerProcess

FLAGS = flags.FLAGS
# The RealMix command line's flags: this script reuses --batch, --filters, --jit_compile,
# --tsa and --gamma from them and adds its own below.
registry.define_flags("realmix", FLAGS)
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Precisions to measure.")
flags.DEFINE_integer("steps", 2, "Timed steps per round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, allocator warm-up).")
flags.DEFINE_integer("repeats", 6, "Rounds; each times every step (RealMix, bare, port) of "
                     "every precision once. The median and the best round are reported.")
flags.DEFINE_integer("size", 32, "Image size.")
flags.DEFINE_bool("batched_passes", True, "Run BN chunks as one grouped call (False: "
                  "separate calls, as the released code).")
flags.DEFINE_string("peer", "", "A checkout of the PyTorch MixMatch port (YU1ut/MixMatch-pytorch) "
                    "to time side by side; empty: RealMix and bare only.")
flags.DEFINE_string("peer_python", "python3", "A Python with torch installed (e.g. a separate "
                    "venv with the CPU wheel) that runs the port.")


def random_batch(batch, size, seed=0):
    rng = np.random.RandomState(seed)
    labeled = {"image": tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)), tf.float32),
               "label": tf.constant(rng.randint(0, 10, batch), tf.int64)}
    unlabeled = {"image": tf.constant(rng.uniform(-1, 1, (batch, 2, size, size, 3)), tf.float32)}
    return labeled, unlabeled


def bare_step_fn(model):
    """The compute inside a RealMix step without the algorithm: 2 no-grad passes on B, one
    supervised forward+backward on 3B, one Adam step."""
    net, optimizer = model.net, model.optimizer

    @tf.function(jit_compile=model.use_jit)
    def losses_and_grads(x3, labels3, u1, u2):
        guess = [net(u1, training=True, update_bn_stats=False),
                 net(u2, training=True, update_bn_stats=False)]
        with tf.GradientTape() as tape:
            logits = net(x3, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels3, logits))
            loss = model.scale_loss(loss)
        return tape.gradient(loss, net.trainable_variables), loss + 0 * guess[0][0, 0] \
            + 0 * guess[1][0, 0]

    @tf.function
    def step(data):
        labeled, unlabeled = data
        x3 = tf.concat([labeled["image"], unlabeled["image"][:, 0], unlabeled["image"][:, 1]], 0)
        labels3 = tf.tile(labeled["label"], [3])
        grads, loss = losses_and_grads(x3, labels3, unlabeled["image"][:, 0],
                                       unlabeled["image"][:, 1])
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    return step


def seconds_per_step(step, data, steps):
    """(wall, cpu) seconds per step; cpu = process CPU time of all threads, less sensitive to
    other jobs than the wall clock."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = step(data)
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def contestants(precision, peers):
    """{name: timer} for one precision; timer() -> (wall, cpu) seconds per step of
    FLAGS.steps steps, after the warm-up. With --peer the port's worker joins (`peers` keeps
    it, to close it at the end)."""
    model = RealMix(10, (FLAGS.size, FLAGS.size, 3), filters=FLAGS.filters, repeat=FLAGS.repeat,
                    precision=precision, jit_compile=FLAGS.jit_compile,
                    tsa=FLAGS.tsa.replace("_schedule", ""),
                    gamma=gamma_auto.parse_gamma(FLAGS.gamma),
                    batched_passes=FLAGS.batched_passes, warmup_kimg=1)
    data = random_batch(FLAGS.batch, FLAGS.size)
    if "forward" not in FLOPS:
        FLOPS["forward"] = flops.forward_flops(model.net, (FLAGS.size, FLAGS.size, 3))
    steps = {"realmix": tf.function(model.train_step), "bare": bare_step_fn(model)}
    for fn in steps.values():
        seconds_per_step(fn, data, max(FLAGS.warmup, 1))
    timers = {name: (lambda fn=fn: seconds_per_step(fn, data, FLAGS.steps))
              for name, fn in steps.items()}
    if FLAGS.peer and precision in PEER_PRECISIONS:
        try:
            peer = PeerProcess(FLAGS.peer, FLAGS.peer_python, FLAGS.batch, precision,
                               FLAGS.warmup, FLAGS.seed)
        except PeerError as e:
            print(f"peer ({precision}) left out: {e}", flush=True)
            return timers
        peers.append(peer)
        print(f"peer ({precision}): PyTorch MixMatch port at {FLAGS.peer}, torch "
              f"{peer.info['torch']}, {peer.info['threads']} threads", flush=True)
        timers["port"] = lambda: peer.time(FLAGS.steps)
    return timers


def measure(precisions):
    """`repeats` rounds; each round times every step of every precision once (RealMix, bare,
    the port with --peer), so that load from other jobs hits all alike.
    Returns {precision: {name: [(wall, cpu) seconds per step, one per round]}}."""
    peers = []
    try:
        timers = {p: contestants(p, peers) for p in precisions}
        rounds = {p: {name: [] for name in t} for p, t in timers.items()}
        for _ in range(FLAGS.repeats):
            for p, named in timers.items():
                for name, timer in list(named.items()):
                    try:
                        rounds[p][name].append(timer())
                    except PeerError as e:      # the port stopped: go on without it
                        print(f"peer ({p}) left out: {e}", flush=True)
                        del named[name], rounds[p][name]
    finally:
        for peer in peers:
            peer.close()
    return rounds


FLOPS = {}        # {"forward": runs.flops.forward_flops of the network}, counted once


def step_flops():
    """FLOPs of one step (2B forward-only + 3B forward and backward images)."""
    return flops.step_flops(FLOPS["forward"]["total"], 3 * FLAGS.batch, 2 * FLAGS.batch)


def print_flops():
    f = FLOPS["forward"]
    print(f"FLOPs per step: forward {f['total'] / 1e6:.4g} MFLOP/image (conv "
          f"{f['conv'] / 1e6:.4g} + dense {f['dense'] / 1e6:.4g}; 2 x Ho x Wo x kh x kw x Cin x "
          f"Cout per Conv2D, 2 x M x K x N per MatMul; BN, activations and the optimizer not "
          f"counted) x (3 x {3 * FLAGS.batch} forward+backward + {2 * FLAGS.batch} forward-only "
          f"images) = {step_flops() / 1e9:.4g} GFLOP", flush=True)


def achieved(precision, seconds, cpu_seconds):
    """'186 GFLOP/s = 112 % of peak (CPU time / 2 cores: ...)' for a step's median wall and
    CPU seconds (the peak's formula is printed once). CPU time / cores is what the wall time
    would be on a quiet machine: the figure to compare when other jobs share the CPU."""
    peak = flops.cpu_peak(precision)
    figures = []
    cores = peak.cores if peak else 1
    for what, s in (("wall", seconds), (f"CPU time / {cores} cores", cpu_seconds / cores)):
        rate = step_flops() / s
        share = f" = {100 * rate / peak.flops:.3g} % of peak" if peak else " (peak unknown)"
        figures.append(f"{what} {rate / 1e9:.3g} GFLOP/s{share}")
    return ", ".join(figures)


def report(precision, rounds):
    """Prints one precision's figures; returns its median wall seconds per step by name."""
    peak = flops.cpu_peak(precision)
    print(f"{precision:15s} peak " + (peak.formula() if peak else "unknown: the FMA width of "
                                      "this CPU is not in runs/flops.py"))
    med = {k: float(np.median([w for w, _ in v])) for k, v in rounds.items()}
    best = {k: min(w for w, _ in v) for k, v in rounds.items()}
    cpu = {k: float(np.median([c for _, c in v])) for k, v in rounds.items()}
    print(f"{precision:15s} realmix {med['realmix']:.3f} s/step (median; best "
          f"{best['realmix']:.3f}) = {1 / med['realmix']:.2f} steps/s, "
          f"{FLAGS.batch / med['realmix']:.1f} img/s | bare {med['bare']:.3f} (best "
          f"{best['bare']:.3f}) | realmix/bare wall {med['realmix'] / med['bare']:.3f} "
          f"median, {best['realmix'] / best['bare']:.3f} best; CPU time "
          f"{cpu['realmix']:.2f}/{cpu['bare']:.2f} s = {cpu['realmix'] / cpu['bare']:.3f}")
    print(f"{'':15s} realmix {achieved(precision, med['realmix'], cpu['realmix'])} | bare "
          f"{achieved(precision, med['bare'], cpu['bare'])}")
    if "port" in rounds:
        per_round = [r[0] / p[0] for r, p in zip(rounds["realmix"], rounds["port"])]
        print(f"{'':15s} port    {med['port']:.3f} s/step (median; best {best['port']:.3f}) "
              f"| realmix/port wall {med['realmix'] / med['port']:.3f} median, "
              f"{best['realmix'] / best['port']:.3f} best, per round "
              f"{' '.join(f'{x:.2f}' for x in per_round)} | CPU time {cpu['port']:.2f} s, "
              f"realmix/port {cpu['realmix'] / cpu['port']:.3f}")
        print(f"{'':15s} port    {achieved(precision, med['port'], cpu['port'])}")
    return med


def load():
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv):
    del argv
    precisions = [precision_probe.auto_precision()[0] if p == "auto" else p for p in FLAGS.precisions]
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}: use auto, {', '.join(PRECISIONS)}")
    if FLAGS.peer and not os.path.isfile(os.path.join(FLAGS.peer, "train.py")):
        raise UserError(f"--peer={FLAGS.peer} has no train.py: pass a checkout of the PyTorch "
                        f"MixMatch port (github.com/YU1ut/MixMatch-pytorch)")
    for line in platform.describe():
        print(line)
    print(f"auto precision: {' -- '.join(precision_probe.auto_precision())}; load average {load()}",
          flush=True)
    rounds = measure(list(dict.fromkeys(precisions)))
    print_flops()
    medians = {p: report(p, r) for p, r in rounds.items()}
    print(f"load average at the end {load()}")
    if "float32" in medians and "mixed_bfloat16" in medians:
        print(f"bf16 speed-up of the RealMix step (medians): "
              f"{medians['float32']['realmix'] / medians['mixed_bfloat16']['realmix']:.2f}x")


if __name__ == "__main__":
    cli.run(main)
