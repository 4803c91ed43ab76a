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
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import types

PEER_PRECISIONS = {"float32": "float32", "mixed_bfloat16": "bf16"}


class PeerError(Exception):
    """The peer could not start or stopped: one line saying why."""


class PeerProcess:
    """A running worker; `time(steps)` -> (wall, cpu) seconds per step of the port's train().
    Any failure of the worker (no such Python, no torch, an error in the port) is a PeerError
    of one line: the worker's own one-line error, or the last line it wrote to stderr."""

    def __init__(self, peer_path, python, batch, precision, warmup=3, seed=0):
        if not os.path.isfile(os.path.join(peer_path, "train.py")):
            raise PeerError(f"{peer_path} has no train.py")
        cmd = [python, os.path.abspath(__file__), f"--peer={os.path.abspath(peer_path)}",
               f"--batch={batch}", f"--precision={PEER_PRECISIONS[precision]}",
               f"--warmup={warmup}", f"--seed={seed}"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.stderr, text=True, env=env)
        except OSError as e:
            raise PeerError(f"cannot run --peer_python={python} ({e.strerror or e})") from None
        self.info = self._answer()          # {"torch": version, "threads": n} once warm

    def _last_stderr_line(self) -> str:
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def _answer(self):
        line = self.proc.stdout.readline()
        try:
            answer = json.loads(line) if line else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if line:
                what = f"answered {line.strip()[:80]!r}"
            else:
                what = f"exited (code {self.proc.wait(timeout=60)})"
            raise PeerError(f"the peer worker {what}: {self._last_stderr_line()}")
        if "error" in answer:
            self.proc.wait(timeout=60)
            raise PeerError(f"the peer worker failed: {answer['error']}")
        return answer

    def time(self, steps):
        try:
            self.proc.stdin.write(f"time {steps}\n")
            self.proc.stdin.flush()
        except OSError:
            raise PeerError(f"the peer worker stopped: {self._last_stderr_line()}") from None
        out = self._answer()
        return out["wall"], out["cpu"]

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        finally:
            self.stderr.close()


# ---------------------------------------------------------------------------------------------
# Worker (runs with torch)

def _stub_modules(find_spec=importlib.util.find_spec):
    """The port imports plotting, tensorboardX and a progress bar at module level, and
    torchvision (transforms, and datasets.CIFAR10 as a base class) and PIL for its data
    loading; the step needs none of them. Each one that is not installed is replaced by a
    stand-in with just what the import needs (nothing is installed for them)."""
    class Bar:
        elapsed_td = eta_td = ""

        def __init__(self, *args, **kwargs):
            self.suffix = ""

        def next(self):
            pass

        def finish(self):
            pass

    class CIFAR10:          # dataset/cifar10.py subclasses it; never instantiated here
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is not installed (stand-in of runs/peer_step.py)")

    stubs = {"tensorboardX": dict(SummaryWriter=object), "matplotlib": {},
             "matplotlib.pyplot": {}, "progress": {}, "progress.bar": dict(Bar=Bar),
             "torchvision": {}, "torchvision.transforms": {},
             "torchvision.datasets": dict(CIFAR10=CIFAR10), "PIL": {}, "PIL.Image": {}}
    stubbed = []
    for name, attrs in stubs.items():
        top = name.split(".")[0]
        if name in sys.modules or (top not in stubbed and _installed(top, find_spec)):
            continue
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        stubbed.append(top)
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)
    return sorted(set(stubbed))


def _installed(name, find_spec) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


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
    """Runs the worker; any error is one JSON line {"error": "..."} on stdout and exit 1."""
    try:
        _worker(argv)
    except Exception as e:          # noqa: BLE001 -- reported to bench_step in one line
        print(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}),
              flush=True)
        sys.exit(1)


def _worker(argv=None):
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
