"""--mixed_precision=auto on CPUs (libml/train/precision_probe.py): the choice from timings, the
cache per CPU model / TensorFlow version and its invalidation, and a resumed run keeping the
precision it recorded. Timings are injected: no test times real steps (tests/conftest.py makes
the real measurement fail)."""
import json
import os

import pytest

from libml.base import machine as platform

from libml.train import precision_probe
from libml.train.config import TrainConfig

BF16_CPU = {"avx2", "avx512f", "avx512_bf16"}
KEY = {"cpu": "AMD EPYC 9R14 96-Core Processor", "tensorflow": "2.21.0",
       "TF_ENABLE_ONEDNN_OPTS": "1"}


class Timer:
    """An injected measurement: returns `seconds`, counts its calls."""

    def __init__(self, float32, bf16):
        self.seconds = {"float32": float32, "mixed_bfloat16": bf16}
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return dict(self.seconds)


def choice(path, timer, key=KEY, flags=BF16_CPU, notes=None):
    return precision_probe.cpu_precision(path=str(path), key=key, flags=flags, measure_fn=timer,
                                         say=(notes if notes is not None else []).append)


@pytest.mark.parametrize("f32, bf16, policy", [
    (1.62, 0.91, "mixed_bfloat16"),      # Zen 4 (the issue): bf16 1.79x faster
    (0.50, 0.85, "float32"),             # Intel AVX512_BF16 without AMX: 1.7x slower
    (1.00, 0.95, "mixed_bfloat16"),      # exactly 5 % faster: the margin's edge
    (1.00, 0.97, "float32"),             # 3 % faster: not worth bf16's rounding
])
def test_choice_from_timings(f32, bf16, policy):
    assert precision_probe.choose({"float32": f32, "mixed_bfloat16": bf16})[0] == policy


def test_first_time_measures_and_writes_the_cache_then_reads_it(tmp_path):
    path = tmp_path / "cache" / "realmix_tf" / "auto_precision.json"
    timer, notes = Timer(1.62, 0.91), []
    policy, reason = choice(path, timer, notes=notes)
    assert (policy, timer.calls) == ("mixed_bfloat16", 1)
    assert "first time on this machine" in notes[0]
    assert reason.startswith("bf16 1.78x faster: float32 1.620 s, bf16 0.910 s CPU per WRN-16-2 "
                             "train step, batch 32")
    assert "measured now, kept in " + str(path) in reason
    record = json.loads(path.read_text())
    assert {k: record[k] for k in KEY} == KEY
    assert record["seconds_per_step"] == {"float32": 1.62, "mixed_bfloat16": 0.91}
    assert os.listdir(path.parent) == ["auto_precision.json"]       # no temporary left
    again = Timer(9.0, 9.0)
    policy, reason = choice(path, again)
    assert (policy, again.calls) == ("mixed_bfloat16", 0)
    assert f"cached in {path}" in reason


@pytest.mark.parametrize("changed, why", [
    (dict(KEY, cpu="Intel(R) Xeon(R) Platinum 8375C CPU"), "cpu changed"),
    (dict(KEY, tensorflow="2.22.0"), "tensorflow changed (2.21.0 -> 2.22.0)"),
    (dict(KEY, TF_ENABLE_ONEDNN_OPTS="0"), "TF_ENABLE_ONEDNN_OPTS changed"),
])
def test_cpu_or_tensorflow_change_measures_again(tmp_path, changed, why):
    path = tmp_path / "auto_precision.json"
    choice(path, Timer(1.62, 0.91))
    timer, notes = Timer(0.5, 0.85), []
    assert choice(path, timer, key=changed, notes=notes)[0] == "float32"
    assert timer.calls == 1 and why in notes[0]
    record = json.loads(path.read_text())
    assert record["seconds_per_step"] == {"float32": 0.5, "mixed_bfloat16": 0.85}
    assert {k: record[k] for k in changed} == changed


@pytest.mark.parametrize("content, why", [
    ("{not json", "unreadable"),
    ("[1, 2]", "malformed"),
    (json.dumps(dict(KEY, seconds_per_step={"float32": 1.0})), "no timings"),
    (json.dumps(dict(KEY, seconds_per_step={"float32": 1.0, "mixed_bfloat16": -1})),
     "no timings"),
    (json.dumps(dict(KEY, seconds_per_step={"float32": "1", "mixed_bfloat16": 2.0})),
     "no timings"),
])
def test_damaged_cache_measures_again_and_is_replaced(tmp_path, content, why):
    path = tmp_path / "auto_precision.json"
    path.write_text(content)
    timer, notes = Timer(1.62, 0.91), []
    assert choice(path, timer, notes=notes)[0] == "mixed_bfloat16"
    assert timer.calls == 1 and why in notes[0]
    assert json.loads(path.read_text())["seconds_per_step"]["mixed_bfloat16"] == 0.91


def test_unwritable_cache_folder_is_a_note_not_a_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "realmix_tf" / "auto_precision.json"     # its folder cannot be created
    notes = []
    policy, reason = choice(path, Timer(1.62, 0.91), notes=notes)
    assert policy == "mixed_bfloat16" and "(measured now)" in reason
    assert notes[-1].startswith(f"note: could not keep the precision measurement in {path}")


def test_cpu_without_bf16_instructions_is_not_measured(tmp_path):
    timer = Timer(1.0, 0.1)
    policy, reason = choice(tmp_path / "c.json", timer, flags={"avx2", "fma"})
    assert (policy, timer.calls) == ("float32", 0)
    assert "without bf16 instructions" in reason
    assert not (tmp_path / "c.json").exists()


def test_several_workers_are_not_measured_and_agree_on_float32(tmp_path):
    tf_config = json.dumps({"cluster": {"worker": ["h0:1", "h1:1"]},
                            "task": {"type": "worker", "index": 1}})
    timer = Timer(1.62, 0.91)
    policy, reason = precision_probe.cpu_precision(
        path=str(tmp_path / "c.json"), key=KEY, flags=BF16_CPU, measure_fn=timer,
        say=print, environ={"TF_CONFIG": tf_config})
    assert (policy, timer.calls) == ("float32", 0)
    assert reason.startswith("2 workers (TF_CONFIG): not measured")
    one = json.dumps({"cluster": {"worker": ["h0:1"]}, "task": {"type": "worker", "index": 0}})
    assert precision_probe.cpu_precision(
        path=str(tmp_path / "c.json"), key=KEY, flags=BF16_CPU, measure_fn=timer, say=print,
        environ={"TF_CONFIG": one})[0] == "mixed_bfloat16"


def test_cache_path_follows_xdg_cache_home(tmp_path):
    assert precision_probe.cache_path({"XDG_CACHE_HOME": str(tmp_path)}) == \
        str(tmp_path / "realmix_tf" / "auto_precision.json")
    assert precision_probe.cache_path({"XDG_CACHE_HOME": str(tmp_path),
                                       "REALMIX_CACHE_DIR": str(tmp_path / "x")}) == \
        str(tmp_path / "x" / "auto_precision.json")
    assert precision_probe.cache_path({}) == os.path.join(
        os.path.expanduser("~"), ".cache", "realmix_tf", "auto_precision.json")


def test_auto_precision_measures_on_cpus_only():
    calls = []

    def cpu_choice(flags):
        calls.append(flags)
        return "mixed_bfloat16", "measured"
    assert precision_probe.auto_precision(BF16_CPU, [], cpu_choice) == ("mixed_bfloat16", "measured")
    assert calls == [BF16_CPU]
    assert precision_probe.auto_precision(BF16_CPU, [(7, 0)], cpu_choice)[0] == "mixed_float16"
    assert len(calls) == 1


def test_the_suite_uses_the_fixed_answer_and_never_measures():
    """tests/conftest.py: the cache holds float32 for this machine; measuring fails."""
    assert precision_probe.cache_path().startswith(os.environ["REALMIX_CACHE_DIR"])
    with pytest.raises(AssertionError, match="real precision measurement"):
        precision_probe.measure()
    if precision_probe.has_bf16_instructions(platform.cpu_info()[1]):
        policy, reason = precision_probe.cpu_precision(say=print)
        assert policy == "float32" and "fixed by tests/conftest.py" in reason


# ---------------------------------------------------------------------------------------------
# A resumed run keeps the precision args.json records

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tests.fixtures_data import make_ssl_dataset
    return make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=48,
                            nvalid=8, ntest=16, size=8)


def tiny(toy, train_dir):
    return TrainConfig(dataset=toy.name, data_dir=toy.root, train_dir=str(train_dir), batch=8,
                       filters=8, repeat=1, train_kimg=0.03125, report_kimg=0.015625,
                       save_kimg=0.015625, eval_batch=64, export=False, progress=False,
                       algorithm=dict(tsa="linear", gamma=0.25))


def test_resumed_auto_run_keeps_its_recorded_precision(toy, tmp_path, monkeypatch, capsys):
    """Started where auto meant bf16, resumed where it now means float32 (another TensorFlow,
    a new measurement): the run goes on in bf16, and the banner says why."""
    from tests.fixtures_train import run
    answer = {"policy": "mixed_bfloat16"}
    monkeypatch.setattr(precision_probe, "auto_precision", lambda: (answer["policy"], "injected"))
    first = run(tiny(toy, tmp_path), stop_after_steps=2)        # saved at 16 images, stopped
    assert first.model.precision == "mixed_bfloat16"
    answer["policy"] = "float32"
    resumed = run(tiny(toy, tmp_path))
    assert resumed.run_dir == first.run_dir
    assert resumed.model.precision == "mixed_bfloat16"
    assert resumed.model.net.dtype_policy.name == "mixed_bfloat16"
    assert int(resumed.model.step.numpy()) == 32
    assert "kept from the run's args/args.json" in resumed.start_line()
    assert "resuming from " in capsys.readouterr().err
    with open(os.path.join(resumed.run_dir, "args", "args.json")) as f:
        args = json.load(f)
    assert (args["mixed_precision"], args["precision"]) == ("auto", "mixed_bfloat16")
    fresh = run(tiny(toy, tmp_path / "other"), stop_after_steps=0)        # a new run: today's answer
    assert fresh.model.precision == "float32"
