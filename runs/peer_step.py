"""The PyTorch MixMatch port's own training step, timed for `runs/bench_step --peer=PATH`.

The port (github.com/YU1ut/MixMatch-pytorch, WRN-28-2, its `train()` function) is a separate
checkout at PATH, never part of this repository; torch lives in a separate Python (`--peer_python`,
e.g. a venv with the CPU wheel), never in requirements.txt. Two halves:

- `PeerProcess` (used by bench_step, no torch): starts this file as a worker process and asks it
  for timed rounds, so that the RealMix step and the port's step alternate process by process
  and other jobs on the machine slow both alike.
- the worker (`python runs/peer_step.py --peer=PATH --batch=64 --precision=float32`, imports
  torch, never TensorFlow): builds the port's model, optimizer, EMA and loss exactly as its
  `main()` does, on random data, then answers each stdin line `time N` with one JSON line
  {"wall": s/step, "cpu": s/step} for N iterations of the port's own `train()`;
  `--precision=bf16` runs it under `torch.autocast("cpu", torch.bfloat16)`.
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import types

PEER_PRECISIONS = {"float32": "float32", "mixed_bfloat16": "bf16"}


class PeerProcess:
    """A running worker; `time(steps)` -> (wall, cpu) seconds per step of the port's train()."""

    def __init__(self, peer_path, python, batch, precision, warmup=3, seed=0):
        if not os.path.isfile(os.path.join(peer_path, "train.py")):
            raise FileNotFoundError(f"{peer_path}/train.py")
        cmd = [python, os.path.abspath(__file__), f"--peer={os.path.abspath(peer_path)}",
               f"--batch={batch}", f"--precision={PEER_PRECISIONS[precision]}",
               f"--warmup={warmup}", f"--seed={seed}"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.info = self._answer()          # {"torch": version, "threads": n} once warm

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def time(self, steps):
        self.proc.stdin.write(f"time {steps}\n")
        self.proc.stdin.flush()
        out = self._answer()
        return out["wall"], out["cpu"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# Worker (runs with torch)

def _stub_modules():
    """The port imports plotting, tensorboardX and a progress bar at module level; the step
    needs none of them, so they are replaced by stand-ins (nothing is installed for them)."""
    class Bar:
        elapsed_td = eta_td = ""

        def __init__(self, *args, **kwargs):
            self.suffix = ""

        def next(self):
            pass

        def finish(self):
            pass

    stubs = {"tensorboardX": dict(SummaryWriter=object), "matplotlib": {},
             "matplotlib.pyplot": {}, "progress": {}, "progress.bar": dict(Bar=Bar)}
    for name, attrs in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module


class _Loader:
    """What train() iterates: the same random batch forever, with the `.next()` it calls."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return self

    def next(self):
        return self.batch

    __next__ = next


def worker(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import numpy as np
    import torch

    _stub_modules()
    sys.path.insert(0, a.peer)
    sys.argv = ["train.py", f"--batch-size={a.batch}", "--train-iteration=1"]
    import train as port                                      # the port's train.py
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)

    model = port.models.WideResNet(num_classes=10)
    ema_model = port.models.WideResNet(num_classes=10)
    for param in ema_model.parameters():
        param.detach_()
    optimizer = torch.optim.Adam(model.parameters(), lr=port.args.lr)
    ema_optimizer = port.WeightEMA(model, ema_model, alpha=port.args.ema_decay)
    x = torch.rand(a.batch, 3, 32, 32) * 2 - 1
    labeled = _Loader((x, torch.randint(0, 10, (a.batch,))))
    unlabeled = _Loader(((torch.rand_like(x) * 2 - 1, torch.rand_like(x) * 2 - 1), None))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16"
                else contextlib.nullcontext())

    def run(steps):
        port.args.train_iteration = steps
        with autocast, contextlib.redirect_stdout(io.StringIO()):
            port.train(labeled, unlabeled, model, optimizer, ema_optimizer, port.SemiLoss(),
                       0, False)

    run(max(a.warmup, 1))
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        steps = int(cmd[1])
        wall, cpu = time.perf_counter(), time.process_time()
        run(steps)
        print(json.dumps({"wall": (time.perf_counter() - wall) / steps,
                          "cpu": (time.process_time() - cpu) / steps}), flush=True)


if __name__ == "__main__":
    worker()
