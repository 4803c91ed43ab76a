"""Starts N training workers on this host, each with its TF_CONFIG on 127.0.0.1 ports.

    python -m runs.launch_local --workers=2 -- python -m realmix_tf.realmix --dataset=... [flags]

Every worker runs the command after `--` with TF_CONFIG naming all workers (worker 0 is the
chief) and `--distribute=multiworker` appended when the command has no --distribute flag.
Their output is streamed line by line with a `[worker i]` prefix. When a worker fails, the
others are stopped (SIGTERM, then SIGKILL after --grace seconds) and the launcher exits with
that worker's exit code; it exits 0 when all succeed. Re-running the same command resumes
from the chief's last complete checkpoint. For several hosts, start one worker per host with
its own TF_CONFIG instead (docs/usage_distributed.md).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

from absl import flags

from libml.base.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Number of worker processes.")
flags.DEFINE_integer("base_port", 0, "First port (worker i uses base_port + i); 0 = free ports.")
flags.DEFINE_float("grace", 10.0, "Seconds between SIGTERM and SIGKILL when stopping workers.")
flags.DEFINE_float("timeout", 0.0, "Stop every worker after this many seconds (0 = no limit).")


def free_ports(count: int) -> List[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(ports: List[int]) -> List[str]:
    workers = [f"127.0.0.1:{p}" for p in ports]
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            for i in range(len(ports))]


def worker_command(command: List[str]) -> List[str]:
    if any(arg.startswith("--distribute") for arg in command):
        return list(command)
    return list(command) + ["--distribute=multiworker"]


def _stream(prefix: str, pipe, lock) -> None:
    for line in iter(pipe.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
            sys.stdout.flush()
    pipe.close()


def _stop(processes, grace: float) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: List[str], workers: int, base_port: int = 0, grace: float = 10.0,
           timeout: float = 0.0) -> int:
    """Runs the workers; returns 0 if all succeed, else the first failing exit code."""
    if not command:
        raise UserError("no command given: put the training command after --, e.g. "
                        "-- python -m realmix_tf.realmix --dataset=...")
    if workers < 1:
        raise UserError(f"--workers={workers} must be at least 1")
    ports = [base_port + i for i in range(workers)] if base_port else free_ports(workers)
    lock = threading.Lock()
    processes, threads = [], []
    for i, config in enumerate(tf_configs(ports)):
        env = {**os.environ, "TF_CONFIG": config}
        p = subprocess.Popen(worker_command(command), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        processes.append(p)
        t = threading.Thread(target=_stream, args=(f"[worker {i}] ", p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)
    start, code = time.monotonic(), 0
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"[launch] worker {i} exited with code {code}: stopping the others",
                      file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in codes):
                break
            if timeout and time.monotonic() - start > timeout:
                print(f"[launch] timeout after {timeout:g} s: stopping every worker",
                      file=sys.stderr, flush=True)
                code = 124
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        code = 130
    finally:
        _stop(processes, grace)
        for t in threads:
            t.join(timeout=5)
    return code


def main(argv: Optional[List[str]]) -> int:
    command = argv[1:]
    if command and command[0] == "--":
        command = command[1:]
    return launch(command, FLAGS.workers, FLAGS.base_port, FLAGS.grace, FLAGS.timeout)


if __name__ == "__main__":
    from absl import app

    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    app.run(wrapped)
