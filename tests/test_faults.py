"""Faults a long run meets on a shared machine, replayed (issue 14): a second launch on the
same run folder, a killed run's leftovers, a hand-edited checkpoint index, full and read-only
disks (a real 2 MB tmpfs, mounted for the test where the test may mount one), non-finite
numbers, changed flags on resume, and damaged records.

The tmpfs tests need root (mount(8)); elsewhere they are skipped with the reason.
"""
import errno
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from libml.run import checkpoints as checkpoint_files

from libml.run import finite

from libml.data import records

from libml.run import relaunch as runargs

from libml.run import relaunch as runlock

from libml.base import storage
from libml.base.errors import UserError, first_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# A small disk of our own

class SmallDisk:
    def __init__(self, path):
        self.path = str(path)

    def fill(self, leave_bytes: int) -> None:
        """Writes a filler file so that about `leave_bytes` stay free."""
        free = storage.free_bytes(self.path)
        with open(os.path.join(self.path, "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - leave_bytes))

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", self.path], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted at tmp_path/disk for this test; skipped where it cannot be."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a test tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield SmallDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# Two launches on one run folder

def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    first = runlock.RunLock(str(tmp_path / "run")).acquire()
    with pytest.raises(UserError) as e:
        runlock.RunLock(str(tmp_path / "run")).acquire()
    message = str(e.value)
    assert f"pid {os.getpid()} on " in message and "is in use by" in message
    assert "--train_dir" in message and "\n" not in message
    first.release()
    assert not os.path.exists(first.path)
    with runlock.RunLock(str(tmp_path / "run")) as again:
        assert again.held and again.taken_over is None
        assert json.load(open(again.path))["pid"] == os.getpid()


HOLD = """
import sys, time
from libml.run.relaunch import RunLock

lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path):
    folder = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {proc.pid} "):
            runlock.RunLock(folder).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert os.path.exists(os.path.join(folder, runlock.LOCK_NAME))    # left behind by the kill
    lock = runlock.RunLock(folder).acquire()
    assert lock.taken_over["pid"] == proc.pid
    lock.release()


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    from libml.base import files as io
    folder = tmp_path / "run"
    (folder / "tf" / "model.ckpt-64_temp").mkdir(parents=True)
    (folder / "tf" / "model.ckpt-64_temp" / "part-00000-of-00001.data-00000-of-00001").write_text("x")
    gone = dead_pid()
    dead = folder / "stats" / f"accuracy.json.tmp-{gone}"
    dead.parent.mkdir()
    dead.write_text("{")
    own = folder / "stats" / f"history.json.tmp-{os.getpid()}"
    own.write_text("{")
    tf_index = folder / "tf" / ("checkpoint.tmp" + "0123456789abcdef" * 2)
    tf_index.write_text("x")
    keep = folder / "tf" / "model.ckpt-32.index"
    keep.write_text("x")
    orphan = folder / "tf" / "model.ckpt-48.data-00000-of-00001"     # killed before its .index
    orphan.write_text("x")

    # A folder that may be shared (data): the dead pid's file goes only once old enough.
    assert io.remove_stale_temps(str(folder)) == []
    assert io.remove_stale_temps(str(folder), now=time.time() + io.STALE_AGE + 1) == [str(dead)]
    dead.write_text("{")
    assert io.remove_stale_temps(str(folder), min_age=0) == [str(dead)]     # a locked run folder
    # TensorFlow's temporaries and an unfinished checkpoint's shards; complete ones stay.
    removed = checkpoint_files.remove_incomplete(str(folder / "tf"))
    assert removed == sorted([str(tf_index), str(folder / "tf" / "model.ckpt-64_temp"), str(orphan)])
    assert own.exists() and keep.exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints found from the files

def tiny_checkpoint(value=1.0):
    return tf.train.Checkpoint(v=tf.Variable(tf.fill([4], value)))


def test_checkpoints_found_from_files_despite_an_index_without_timestamps(tmp_path):
    folder = str(tmp_path / "tf")
    ckpt = tiny_checkpoint()
    for step in (32, 64, 96):
        checkpoint_files.save_checkpoint(ckpt, folder, step, keep=10)
    prefixes = [os.path.join(folder, f"model.ckpt-{s}") for s in (32, 64, 96)]
    assert checkpoint_files.list_checkpoints(folder) == prefixes
    assert tf.train.latest_checkpoint(folder) == prefixes[-1]
    # The index we write carries timestamps: TensorFlow's manager sees every checkpoint.
    manager = tf.train.CheckpointManager(ckpt, folder, max_to_keep=10, checkpoint_name="model.ckpt")
    assert manager.checkpoints == prefixes

    # Hand-edited to roll back, without timestamps: TensorFlow's manager forgets them all ...
    with open(os.path.join(folder, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt-32"\nall_model_checkpoint_paths: "model.ckpt-32"\n')
    assert tf.train.CheckpointManager(ckpt, folder, max_to_keep=10).checkpoints == []
    # ... the files still tell, and the disagreement is named.
    assert checkpoint_files.list_checkpoints(folder) == prefixes
    note = checkpoint_files.index_disagreement(folder)
    assert "names model.ckpt-32 but model.ckpt-96 is newer" in note
    # Never written over: saving step 64 again is refused, its files untouched.
    before = {p: os.path.getmtime(p) for p in checkpoint_files.checkpoint_files(prefixes[1])}
    with pytest.raises(UserError, match="model.ckpt-64 already exists: refusing to overwrite"):
        checkpoint_files.save_checkpoint(tiny_checkpoint(2.0), folder, 64, keep=10)
    assert {p: os.path.getmtime(p) for p in checkpoint_files.checkpoint_files(prefixes[1])} == before


def test_keep_deletes_the_oldest_and_incomplete_ones_are_not_checkpoints(tmp_path):
    folder = str(tmp_path / "tf")
    for step in (8, 16, 24):
        checkpoint_files.save_checkpoint(tiny_checkpoint(step), folder, step, keep=2)
    assert [checkpoint_files.checkpoint_step(p) for p in checkpoint_files.list_checkpoints(folder)] == [16, 24]
    assert not checkpoint_files.checkpoint_files(os.path.join(folder, "model.ckpt-8"))
    # A writer killed after renaming its shard, before writing the index: not a checkpoint.
    shard = os.path.join(folder, "model.ckpt-32.data-00000-of-00001")
    open(shard, "wb").write(b"partial")
    assert checkpoint_files.latest_checkpoint(folder).endswith("model.ckpt-24")
    # Set aside: renamed, still a readable checkpoint, no longer one of the run.
    aside = checkpoint_files.set_aside(os.path.join(folder, "model.ckpt-24"), "nonfinite")
    assert aside.endswith("model.ckpt-24.nonfinite")
    assert checkpoint_files.latest_checkpoint(folder).endswith("model.ckpt-16")
    value = tf.train.load_checkpoint(aside).get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(value, np.full([4], 24.0, np.float32))


# ---------------------------------------------------------------------------------------------
# Full and read-only disks

def test_checkpoint_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    folder = os.path.join(small_disk.path, "tf")
    big = tf.train.Checkpoint(v=tf.Variable(tf.zeros([200_000])))     # 800 KB
    checkpoint_files.save_checkpoint(big, folder, 8, keep=5)
    small_disk.fill(leave_bytes=300_000)
    with pytest.raises(UserError) as e:
        checkpoint_files.save_checkpoint(big, folder, 16, keep=5, need_bytes=800_000,
                                         resume_note="it resumes from model.ckpt-8")
    message = str(e.value)
    assert message.startswith(f"no space left on the disk of {folder}/model.ckpt-16 for "
                              f"checkpoint model.ckpt-16 (needs about 781.2 KB, ")
    assert "resumes from model.ckpt-8" in message and "\n" not in message
    assert sorted(os.listdir(folder)) == ["checkpoint", "model.ckpt-8.data-00000-of-00001",
                                          "model.ckpt-8.index"]


def test_read_only_disk_is_one_line(small_disk):
    folder = os.path.join(small_disk.path, "tf")
    os.makedirs(folder)
    small_disk.read_only()
    with pytest.raises(UserError, match=r"cannot write checkpoint model.ckpt-8 to .*model.ckpt-8 "
                                        r"\(read-only file system\)"):
        checkpoint_files.save_checkpoint(tiny_checkpoint(), folder, 8, keep=5)
    with pytest.raises(UserError, match=r"cannot write the output to .*new/file \(.* is read-only\)"):
        storage.check_writable(os.path.join(small_disk.path, "new", "file"))
    with pytest.raises(UserError, match="is in use by|read-only"):
        runlock.RunLock(os.path.join(small_disk.path, "run")).acquire()


def test_space_check_before_writing(tmp_path):
    storage.check_writable(str(tmp_path / "a" / "b"), need_bytes=1)
    with pytest.raises(UserError, match=r"no space left on the disk of .* \(needs about .* free\)"):
        storage.check_writable(str(tmp_path / "a"), need_bytes=1 << 60)


def test_fault_kinds():
    assert storage.fault_kind(OSError(errno.ENOSPC, "No space left on device")) == "full"
    assert storage.fault_kind(OSError(errno.EROFS, "Read-only file system")) == "read-only"
    assert storage.fault_kind(OSError(errno.ENOENT, "No such file")) is None
    assert storage.fault_kind(tf.errors.ResourceExhaustedError(None, None, "x; No space left on device")) == "full"
    assert storage.fault_kind(tf.errors.ResourceExhaustedError(None, None, "out of memory")) is None
    assert storage.fault_kind(ValueError("No space left on device")) is None


# ---------------------------------------------------------------------------------------------
# Non-finite numbers

def test_nonfinite_variables_and_first_nonfinite_step():
    variables = {"a": tf.Variable([1.0, 2.0]), "b": tf.Variable([1.0, np.nan]),
                 "c": tf.Variable(np.inf), "step": tf.Variable(3, dtype=tf.int64)}
    assert finite.nonfinite_variables(variables) == ["b", "c"]
    first = finite.FirstNonFinite()

    @tf.function
    def step(loss, count):
        first.update(finite.all_finite([loss]), count)

    step(tf.constant(1.0), tf.constant(8, tf.int64))
    assert first.value() is None
    step(tf.constant(np.nan, tf.float32), tf.constant(16, tf.int64))
    step(tf.constant(np.inf, tf.float32), tf.constant(24, tf.int64))
    step(tf.constant(1.0), tf.constant(32, tf.int64))
    assert first.value() == 16


def test_checkpoint_is_finite(tmp_path):
    good = tiny_checkpoint(1.0).write(str(tmp_path / "good"))
    bad = tiny_checkpoint(np.nan).write(str(tmp_path / "bad"))
    assert finite.checkpoint_is_finite(good) and not finite.checkpoint_is_finite(bad)


def test_divergence_message_names_step_and_last_good():
    e = finite.DivergenceError("loss is not finite", 96, "run/tf/model.ckpt-64")
    assert str(e).startswith("loss is not finite at step 96 (0.09375 kimg): the run stopped, "
                             "its last finite checkpoint is run/tf/model.ckpt-64")
    assert isinstance(e, UserError)


# ---------------------------------------------------------------------------------------------
# Resume with changed flags

RECORDED = dict(algorithm="RealMix", dataset="cifar10.3@250-5000", filters=32, lr=0.002,
                mixed_precision="none", train_kimg=64, report_kimg=1, save_kimg=1, keep_ckpt=5,
                load_checkpoint="", image_shape=[32, 32, 3])


def test_resume_with_a_fixed_flag_changed_names_it_and_never_says_delete():
    current = dict(RECORDED, mixed_precision="fp16", report_kimg=2)
    with pytest.raises(UserError) as e:
        runargs.resume_args(RECORDED, current, "runs/x")
    message = str(e.value)
    assert "--mixed_precision=fp16 (recorded none)" in message
    assert "report_kimg" not in message and "delete" not in message
    assert "re-run with the recorded values" in message and "another --train_dir" in message


def test_resume_with_another_mixed_precision_flag_for_the_same_precision():
    recorded = dict(RECORDED, mixed_precision="auto", precision="float32")
    merged, notes = runargs.resume_args(recorded, dict(recorded, mixed_precision="none"), "runs/x")
    assert merged["mixed_precision"] == "none" and merged["precision"] == "float32"
    assert notes == ["resuming runs/x with changed settings: --mixed_precision=none (recorded auto)"]
    # auto resolving to another precision (another machine) is refused, both named.
    with pytest.raises(UserError, match=r"--mixed_precision=bf16 \(recorded auto\), "
                                        r"precision=mixed_bfloat16 \(recorded float32\)"):
        runargs.resume_args(recorded, dict(recorded, mixed_precision="bf16",
                                           precision="mixed_bfloat16"), "runs/x")


def test_resume_with_permitted_changes_records_them():
    current = dict(RECORDED, report_kimg=0.5, train_kimg=128, load_checkpoint="other/run",
                   eval_batch=256)
    merged, notes = runargs.resume_args(dict(RECORDED, extra_old_key=1), current, "runs/x")
    assert merged["report_kimg"] == 0.5 and merged["train_kimg"] == 128
    assert merged["load_checkpoint"] == "" and merged["eval_batch"] == 256
    assert merged["extra_old_key"] == 1
    assert notes[0] == ("resuming runs/x with changed settings: --report_kimg=0.5 (recorded 1), "
                        "--train_kimg=128 (recorded 64)")
    assert "--load_checkpoint is used only when a run starts" in notes[1]
    # Equal values (JSON number types, tuples) are not differences.
    assert runargs.differences(RECORDED, dict(RECORDED, train_kimg=64.0, image_shape=(32, 32, 3))) == []


# ---------------------------------------------------------------------------------------------
# Damaged records

def write_records(path, pngs):
    from libml.data.records import serialize_example
    with tf.io.TFRecordWriter(path) as w:
        for i, png in enumerate(pngs):
            w.write(serialize_example(png, i % 3))


def test_first_line_trims_tensorflow_internals():
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        tf.io.decode_image(b"not an image")
    assert first_line(e.value).startswith("Unknown image file format. One of JPEG")
    ds = tf.data.Dataset.from_tensor_slices([b"xx"]).map(tf.io.decode_png)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(ds)
    assert first_line(e.value).startswith("Unknown image file format")

    @tf.function
    def decode(x):
        return tf.io.decode_image(x, channels=3, expand_animations=False)

    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        decode(tf.constant(b"\x89PNG\r\n\x1a\nbroken"))
    assert first_line(e.value) == "Invalid PNG. Failed to initialize decoder."


def test_find_bad_record_names_file_and_record(tmp_path):
    good = [tf.io.encode_png(tf.fill([4, 4, 3], tf.constant(i, tf.uint8))).numpy() for i in range(7)]
    clean, bad = str(tmp_path / "clean.tfrecord"), str(tmp_path / "bad.tfrecord")
    write_records(clean, good)
    write_records(bad, good[:5] + [b"\x89PNG\r\n\x1a\nbroken"] + good[5:])
    assert records.find_bad_record([clean], (4, 4, 3)) is None
    found = records.find_bad_record([clean, bad], (4, 4, 3), batch=2)
    assert found == records.BadRecord(bad, 5, found.cause)
    assert found.cause.startswith("Invalid PNG") or found.cause.startswith("Unknown image")
    # Another image size than the dataset's is damaged too.
    odd = str(tmp_path / "odd.tfrecord")
    write_records(odd, good[:2] + [tf.io.encode_png(tf.zeros([5, 4, 3], tf.uint8)).numpy()])
    found = records.find_bad_record([odd], (4, 4, 3))
    assert (found.index, "shape differs" in found.cause) == (2, True)
    # A checksum failure: the record index where reading stops.
    data = bytearray(open(clean, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(clean, "wb").write(bytes(data))
    found = records.find_bad_record([clean], (4, 4, 3))
    assert found.path == clean and 0 <= found.index < 7 and "corrupted record" in found.cause
    line = str(found.error("python -m data_prep.x", after="the run resumes"))
    assert line.startswith(f"corrupt TFRecord {clean} (record {found.index}: ")
    assert line.endswith("re-create it with `python -m data_prep.x`; the run resumes")


# ---------------------------------------------------------------------------------------------
# The run folder as the trainer uses it

def test_run_folder_restores_the_newest_finite_checkpoint_and_sets_others_aside(tmp_path, capsys):
    from libml.run.runfolder import RunFolder
    run_dir = str(tmp_path / "run")
    tf_dir = os.path.join(run_dir, "tf")
    for step, value in ((32, 1.0), (64, 2.0), (96, np.nan)):     # 96: written by an old version
        checkpoint_files.save_checkpoint(tiny_checkpoint(value), tf_dir, step, keep=10)
    folder = RunFolder(run_dir, keep=10).open(dict(lr=0.002))
    target = tiny_checkpoint(0.0)
    assert folder.restore(lambda p: target.read(p).assert_consumed()) == os.path.join(tf_dir, "model.ckpt-64")
    np.testing.assert_array_equal(target.v.numpy(), np.full([4], 2.0, np.float32))
    assert "model.ckpt-96 holds non-finite weights: renamed to model.ckpt-96.nonfinite" in capsys.readouterr().err
    # The next save of step 96 is a new checkpoint, not an overwrite.
    folder.save(target, 96, {"v": target.v})
    assert [checkpoint_files.checkpoint_step(p) for p in checkpoint_files.list_checkpoints(tf_dir)] == [32, 64, 96]
    # A non-finite weight is never saved: the run stops, naming the last good checkpoint.
    target.v.assign([1.0, np.inf, 0.0, 0.0])
    with pytest.raises(finite.DivergenceError, match=r"weights are not finite \(v\) at step 128 .*"
                                                     r"last finite checkpoint is .*model.ckpt-96"):
        folder.save(target, 128, {"v": target.v})
    assert checkpoint_files.latest_checkpoint(tf_dir).endswith("model.ckpt-96")
    with pytest.raises(finite.DivergenceError, match="the loss is not finite at step 104"):
        folder.check_loss(104)
    folder.check_loss(None)
    folder.close()
    assert not os.path.exists(os.path.join(run_dir, runlock.LOCK_NAME))


def test_run_folder_without_a_resumable_checkpoint_never_advises_deleting(tmp_path):
    from libml.run.runfolder import RunFolder
    run_dir = str(tmp_path / "run")
    checkpoint_files.save_checkpoint(tiny_checkpoint(), os.path.join(run_dir, "tf"), 8, keep=2)
    folder = RunFolder(run_dir, keep=2).open({})
    other = tf.train.Checkpoint(w=tf.Variable(tf.zeros([3])))
    with pytest.raises(UserError) as e:
        folder.restore(lambda p: other.read(p).expect_partial().assert_consumed(), read_errors=(AssertionError,))
    assert "no checkpoint of" in str(e.value) and "model.ckpt-8 " in str(e.value)
    assert "delete" not in str(e.value) and "another --train_dir" in str(e.value)
    assert checkpoint_files.latest_checkpoint(folder.tf_dir)     # nothing renamed
    folder.close()


def test_failed_start_up_leaves_no_folder_and_args_record_the_permitted_changes(tmp_path):
    from libml.run.runfolder import RunFolder
    run_dir = str(tmp_path / "data" / "RealMix_x")
    folder = RunFolder(run_dir, keep=2).open(dict(RECORDED))
    folder.close(failed=True)                      # e.g. --load_checkpoint did not fit
    assert not os.path.exists(run_dir) and not os.path.exists(os.path.dirname(run_dir))

    folder = RunFolder(run_dir, keep=2).open(dict(RECORDED))
    folder.record_args()
    folder.close()
    with pytest.raises(UserError, match=r"--mixed_precision=bf16 \(recorded none\)"):
        RunFolder(run_dir, keep=2).open(dict(RECORDED, mixed_precision="bf16"))
    assert not os.path.exists(os.path.join(run_dir, runlock.LOCK_NAME))    # released on failure
    folder = RunFolder(run_dir, keep=2).open(dict(RECORDED, report_kimg=4))
    folder.record_args()
    folder.close(failed=True)                      # an existing folder is never removed
    assert json.load(open(folder.args_path))["report_kimg"] == 4


# ---------------------------------------------------------------------------------------------
# float16 loss scaling: a skipped step is skipped entirely

FP16_SKIP = """
import numpy as np, tensorflow as tf
from libml.train.algorithm import SSLModel

def check(strategy):
    with strategy.scope():
        model = SSLModel(3, (8, 8, 3), filters=4, repeat=1, lr=0.01, wd=0.5, ema=0.5,
                         precision="mixed_float16")
    variables = model.net.trainable_variables + model.ema_net.trainable_variables

    def step(value):
        model.apply_update([tf.fill(v.shape, value) for v in model.net.trainable_variables])

    run = tf.function(lambda value: strategy.run(step, args=(value,)))
    before = [v.numpy() for v in variables]
    scale = float(model.optimizer.dynamic_scale.numpy())
    run(tf.constant(np.inf))                 # overflowed gradients: the scaler skips the step
    skipped = all(np.array_equal(a, v.numpy()) for a, v in zip(before, variables))
    halved = float(model.optimizer.dynamic_scale.numpy()) == scale / 2
    run(tf.constant(1.0))                    # a finite step changes kernels and shadows
    changed = sum(not np.array_equal(a, v.numpy()) for a, v in zip(before, variables))
    return skipped, halved, changed == len(variables)
"""


def test_fp16_skipped_step_skips_weight_decay_and_ema_too():
    namespace = {}
    exec(FP16_SKIP, namespace)
    assert namespace["check"](tf.distribute.get_strategy()) == (True, True, True)


def test_fp16_skipped_step_on_two_replicas():
    script = FP16_SKIP + """
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
print("RESULT", check(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines == ["RESULT (True, True, True)"], result.stderr[-2000:]



# ---------------------------------------------------------------------------------------------
# End to end, through the command line

TINY = ["--batch=8", "--filters=8", "--repeat=1", "--eval_batch=64", "--noexport", "--noprogress"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tests.fixtures_data import make_ssl_dataset
    return make_ssl_dataset(tmp_path_factory.mktemp("faults_data"), nlabeled=16, nunlabeled=48,
                            nvalid=8, ntest=16, size=8)


def launch(toy, train_dir, *args, module="realmix_tf.supervised", wait=True, timeout=300):
    argv = [sys.executable, "-m", module, f"--dataset={toy.name}", f"--data_dir={toy.root}",
            f"--train_dir={train_dir}", *TINY, *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if not wait:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(result) -> str:
    """The command failed with exit code 2 and one `error:` line, no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_two_launches_second_exits_2_naming_the_holder_and_a_killed_holder_is_taken_over(toy, tmp_path):
    length = ["--train_kimg=64", "--report_kimg=0.0625", "--save_kimg=0.0625",   # killed below
              "--noshort_run_scaling"]     # the third launch changes --train_kimg
    first = launch(toy, tmp_path, *length, wait=False)
    try:
        deadline = time.time() + 240
        while not glob.glob(str(tmp_path / "*" / "*" / "tf" / "model.ckpt-*.index")):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        line = one_error_line(launch(toy, tmp_path, *length))
        assert re.match(rf"error: .*Supervised_\S+ is in use by pid {first.pid} on \S+ since \S+ "
                        rf"\(.*supervised.*\): wait for it to finish, or stop it, or pass another "
                        rf"--train_dir$", line), line
    finally:
        first.kill()
        first.wait()
    # The killed holder's lock is stale: taken over; the shorter --train_kimg is a permitted change.
    third = launch(toy, tmp_path, "--train_kimg=0.0625", "--report_kimg=0.0625", "--save_kimg=0.0625",
                   "--noshort_run_scaling")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of pid {first.pid} " in third.stderr
    assert "changed settings: --train_kimg=0.0625 (recorded 64)" in third.stderr
    assert not glob.glob(str(tmp_path / "*" / "*" / "run.lock"))
    # --eval_ckpt with another architecture than args.json's: one line, none of TensorFlow's
    # ~60 warnings.
    run_dir = glob.glob(str(tmp_path / "*" / "*"))[0]
    other = launch(toy, tmp_path / "other", f"--eval_ckpt={run_dir}", "--filters=16")
    assert "another architecture: --filters=16 (the run has 8)" in one_error_line(other)
    assert "WARNING:tensorflow" not in other.stderr and "Value in checkpoint" not in other.stderr


def test_divergence_stops_in_one_line_without_writing_a_checkpoint(toy, tmp_path):
    result = launch(toy, tmp_path, "--lr=1e30", "--train_kimg=0.0625", "--report_kimg=0.03125",
                    "--save_kimg=0.03125")
    line = one_error_line(result)
    assert re.match(r"error: (the loss is|weights are) not finite.* at step \d+ \([\d.]+ kimg\): "
                    r"the run stopped, no checkpoint was saved before it: ", line), line
    assert not glob.glob(str(tmp_path / "*" / "*" / "tf" / "model.ckpt-*"))


def test_nonfinite_flag_on_the_command_line(toy, tmp_path):
    line = one_error_line(launch(toy, tmp_path, "--lr=inf"))
    assert line == "error: --lr=inf is not a finite number: pass a finite value"


# ---------------------------------------------------------------------------------------------
# Data preparation on a full or read-only disk; a damaged image in a cached set

def create_cifar10(archive_dir, data_dir, monkeypatch):
    from data_prep import archives, create_datasets
    monkeypatch.setattr(archives, "_online", lambda *a, **k: False)
    return create_datasets.main(["create_datasets", "cifar10", f"--archive_dir={archive_dir}",
                                 f"--data_dir={data_dir}"])


def test_create_datasets_on_a_full_and_a_read_only_disk(small_disk, tmp_path, monkeypatch):
    from tests.fixtures_archives import write_cifar_archive
    archive_dir = tmp_path / "archives"
    write_cifar_archive(str(archive_dir), "cifar10", per_batch=40, n_test=40)   # ~600 KB of PNG
    data_dir = os.path.join(small_disk.path, "data")
    small_disk.fill(leave_bytes=100_000)
    with pytest.raises(UserError) as e:
        create_cifar10(archive_dir, data_dir, monkeypatch)
    target = os.path.join(data_dir, "cifar10-train.tfrecord")
    assert re.match(rf"no space left on the disk of {re.escape(target)} for cifar10-train.tfrecord "
                    rf"\(needs about [\d.]+ KB, [\d.]+ KB free\): ", str(e.value)), str(e.value)
    assert os.listdir(data_dir) == []                           # no half file, no temporary
    os.remove(os.path.join(small_disk.path, "filler"))
    small_disk.read_only()
    with pytest.raises(UserError, match=r"cannot write .* \(read-only file system\)"):
        create_cifar10(archive_dir, os.path.join(small_disk.path, "other"), monkeypatch)


def test_damaged_image_in_a_cached_set_names_file_and_record(tmp_path):
    from libml.data.pipeline import load_ssl
    from tests.fixtures_data import make_ssl_dataset, test_options
    toy = make_ssl_dataset(tmp_path, nlabeled=16, nunlabeled=48, nvalid=8, ntest=16, size=8)
    serialized = list(records.iterate_serialized(toy.label_path))
    serialized[11] = records.serialize_example(b"\x89PNG\r\n\x1a\nbroken", 0)
    records.write_serialized(toy.label_path, serialized, overwrite=True)
    data = load_ssl(toy.name, toy.root, options=test_options(), cache=True)
    with pytest.raises(UserError) as e:
        next(iter(data.train_labeled(8)))
    assert str(e.value).startswith(f"corrupt TFRecord {toy.label_path} (record 11: Invalid PNG")
    assert "re-create it with `" in str(e.value) and "{{" not in str(e.value)


def test_create_split_of_a_file_without_labels_says_so():
    from data_prep import create_split
    with pytest.raises(UserError) as e:
        create_split.choose_labeled(np.full([20], -1), 4, seed=1)
    assert str(e.value).startswith("the input has no labeled images") and "--size" not in str(e.value)



# ---------------------------------------------------------------------------------------------
# End to end, in this process (tiny supervised runs: 8 steps of 8 images, saves every 4)

def tiny(toy, train_dir, **changes):
    from libml.train.config import TrainConfig
    values = dict(dataset=toy.name, data_dir=toy.root, train_dir=str(train_dir), batch=8,
                  filters=8, repeat=1, train_kimg=0.0625, report_kimg=0.03125, save_kimg=0.03125,
                  keep_ckpt=10, eval_batch=64, progress=False, export=False,
                  short_run_scaling=False)    # the resumes below change --train_kimg
    values.update(changes)
    return TrainConfig(**values)


def trainer_of(config, algorithm="supervised"):
    from realmix_tf import registry
    from tests.fixtures_data import test_options
    return registry.make_trainer(algorithm, config, data_options=test_options())


def steps_of(tf_dir):
    return [checkpoint_files.checkpoint_step(p) for p in checkpoint_files.list_checkpoints(tf_dir)]


@pytest.fixture(scope="module")
def done(toy, tmp_path_factory):
    """A finished tiny run (checkpoints 32 and 64, export)."""
    trainer = trainer_of(tiny(toy, tmp_path_factory.mktemp("done"), export=True))
    trainer.run()
    return trainer


def copy_of(trainer, tmp_path, **changes):
    """The config of a copy of a finished run under tmp_path."""
    import shutil
    rel = os.path.relpath(trainer.run_dir, trainer.config.train_dir)
    shutil.copytree(trainer.run_dir, tmp_path / rel)
    import dataclasses
    return dataclasses.replace(trainer.config, train_dir=str(tmp_path), export=False, **changes)


def test_divergence_keeps_the_last_finite_checkpoint_and_resume_starts_there(toy, tmp_path, capsys):
    trainer = trainer_of(tiny(toy, tmp_path))
    calls = tf.Variable(0)
    step = trainer.model.train_step

    def poisoned(data):         # from the 5th step on (40 images) the loss is NaN
        outputs = step(data)
        calls.assign_add(1)
        return {k: tf.where(calls >= 5, float("nan"), v) if k.startswith("losses/") else v
                for k, v in outputs.items()}

    trainer.model.train_step = poisoned
    with pytest.raises(finite.DivergenceError) as e:
        trainer.run()
    last = os.path.join(trainer.tf_dir, "model.ckpt-32")
    assert str(e.value).startswith(f"the loss is not finite at step 40 (0.0390625 kimg): the run "
                                   f"stopped, its last finite checkpoint is {last}, kept as the newest")
    assert steps_of(trainer.tf_dir) == [32]                  # nothing written after the NaN
    assert [h["step"] for h in json.load(open(os.path.join(trainer.run_dir, "stats",
                                                           "accuracy_history.json")))] == [32]
    assert not os.path.exists(os.path.join(trainer.run_dir, runlock.LOCK_NAME))

    # An older version did write non-finite checkpoints: one at step 64.
    from libml.run.checkpoints import make_checkpoint
    old = trainer_of(tiny(toy, tmp_path))
    old.model.net.trainable_variables[0].assign(tf.fill(old.model.net.trainable_variables[0].shape, np.nan))
    checkpoint_files.save_checkpoint(make_checkpoint(old.model), trainer.tf_dir, 64, keep=10)
    capsys.readouterr()
    resumed = trainer_of(tiny(toy, tmp_path))
    resumed.run()
    err = capsys.readouterr().err
    assert "model.ckpt-64 holds non-finite weights: renamed to model.ckpt-64.nonfinite; resuming " \
           "from model.ckpt-32" in err and f"resuming from {last} (0.03125 kimg)" in err
    assert steps_of(trainer.tf_dir) == [32, 64] and int(resumed.model.step.numpy()) == 64
    assert finite.checkpoint_is_finite(os.path.join(trainer.tf_dir, "model.ckpt-64"))
    assert not finite.checkpoint_is_finite(os.path.join(trainer.tf_dir, "model.ckpt-64.nonfinite"))


def test_resume_with_changed_flags(done, tmp_path, capsys):
    config = copy_of(done, tmp_path)
    run_dir = os.path.join(tmp_path, os.path.relpath(done.run_dir, done.config.train_dir))
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run_dir, "tf", "model.ckpt-*"))}
    import dataclasses
    with pytest.raises(UserError) as e:
        trainer_of(dataclasses.replace(config, mixed_precision="fp16")).run()
    assert re.search(r"--mixed_precision=fp16 \(recorded \w+\), precision=mixed_float16 \(recorded "
                     r"float32\); these cannot change when a run resumes", str(e.value)), str(e.value)
    assert "delete" not in str(e.value) and os.path.isdir(run_dir)
    # Permitted: a longer run reported more often. args.json records the values in effect.
    longer = trainer_of(dataclasses.replace(config, train_kimg=0.09375, report_kimg=0.015625))
    longer.run()
    assert "changed settings: --report_kimg=0.015625 (recorded 0.03125), --train_kimg=0.09375 " \
           "(recorded 0.0625)" in capsys.readouterr().err
    args = json.load(open(os.path.join(run_dir, "args", "args.json")))
    assert (args["train_kimg"], args["report_kimg"]) == (0.09375, 0.015625)
    assert int(longer.model.step.numpy()) == 96 and steps_of(longer.tf_dir) == [32, 64, 96]
    assert {p: os.path.getmtime(p) for p in before} == before


def test_index_without_timestamps_neither_restarts_nor_overwrites(done, tmp_path, capsys):
    config = copy_of(done, tmp_path, train_kimg=0.09375)
    tf_dir = os.path.join(tmp_path, os.path.relpath(done.tf_dir, done.config.train_dir))
    with open(os.path.join(tf_dir, "checkpoint"), "w") as f:        # rolled back by hand
        f.write('model_checkpoint_path: "model.ckpt-32"\nall_model_checkpoint_paths: "model.ckpt-32"\n')
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(tf_dir, "model.ckpt-*"))}
    trainer = trainer_of(config)
    trainer.run()
    err = capsys.readouterr().err
    assert "names model.ckpt-32 but model.ckpt-64 is newer: using the newest checkpoint" in err
    assert "resuming from" in err and "model.ckpt-64 (0.0625 kimg)" in err
    assert steps_of(tf_dir) == [32, 64, 96]
    assert {p: os.path.getmtime(p) for p in before} == before
    assert tf.train.latest_checkpoint(tf_dir).endswith("model.ckpt-96")


def test_failed_start_up_leaves_no_run_folder(done, toy, tmp_path):
    config = tiny(toy, tmp_path, filters=16, load_checkpoint=done.run_dir)
    trainer = trainer_of(config)
    with pytest.raises(UserError, match="different architecture"):
        trainer.run()
    assert os.listdir(tmp_path) == []


def test_damaged_image_in_the_streamed_path_gives_the_cached_message(tmp_path, monkeypatch):
    from libml.data import pipeline as data_module
    from libml.data.pipeline import load_ssl
    from tests.fixtures_data import make_ssl_dataset, test_options
    toy = make_ssl_dataset(tmp_path / "data", nlabeled=16, nunlabeled=48, nvalid=8, ntest=16, size=8)
    serialized = list(records.iterate_serialized(toy.label_path))
    serialized[11] = records.serialize_example(b"\x89PNG\r\n\x1a\nbroken", 0)
    records.write_serialized(toy.label_path, serialized, overwrite=True)
    with pytest.raises(UserError) as cached:
        next(iter(load_ssl(toy.name, toy.root, options=test_options(), cache=True).train_labeled(8)))
    monkeypatch.setattr(data_module, "CACHE_MAX_DECODED_BYTES", 0)      # stream, as large sets are
    trainer = trainer_of(tiny(toy, tmp_path / "runs"))
    assert not trainer.data.is_cached("labeled")
    with pytest.raises(UserError) as streamed:
        trainer.run()
    assert str(streamed.value) == f"{cached.value}; the run resumes from its last checkpoint"
    assert "(record 11: Invalid PNG" in str(streamed.value)


def test_training_on_a_full_then_freed_disk(toy, small_disk):
    small_disk.fill(leave_bytes=150_000)            # a checkpoint of this net takes ~300 KB
    trainer = trainer_of(tiny(toy, small_disk.path))
    with pytest.raises(UserError) as e:
        trainer.run()
    assert str(e.value).startswith(f"no space left on the disk of {small_disk.path}/")
    assert "(needs about" in str(e.value) and "re-run the same command" in str(e.value)
    leftovers = [p for p in glob.glob(os.path.join(small_disk.path, "**"), recursive=True)
                 if p.endswith("_temp") or ".tmp" in p or p.endswith(runlock.LOCK_NAME)]
    assert leftovers == []
    os.remove(os.path.join(small_disk.path, "filler"))
    again = trainer_of(tiny(toy, small_disk.path))
    again.run()
    assert steps_of(again.tf_dir) == [32, 64]


def test_read_only_outputs_are_one_line(done, toy, small_disk, tmp_path):
    from realmix_tf import predict
    from runs import quickstart
    from libml.base import cli
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    Image.fromarray(np.zeros([8, 8, 3], np.uint8)).save(folder / "a.png")
    small_disk.read_only()
    with pytest.raises(UserError, match=r"cannot write the run folder to .* \(read-only file system\)"):
        trainer_of(tiny(toy, small_disk.path)).run()
    out = os.path.join(small_disk.path, "predictions.csv")
    with pytest.raises(UserError, match=r"cannot write predictions.csv to .*predictions.csv "
                                        r"\(read-only file system\)"):
        predict.main(["predict", f"--model={done.export_dir}", f"--images={folder}", f"--output={out}"])
    work = os.path.join(small_disk.path, "quickstart")
    cli.parse(quickstart.FLAG_VALUES, ["quickstart", f"--work_dir={work}"])
    with pytest.raises(UserError, match=r"cannot write the quickstart's data and runs to .* is read-only"):
        quickstart.main(["quickstart"])


def test_every_float_flag_refuses_nan_and_inf():
    from realmix_tf import registry
    from runs import paper_commands, quickstart
    from libml.base import cli
    cases = [("realmix", "--wd=nan"), ("realmix", "--lr=inf"), ("realmix", "--beta=nan"),
             ("realmix", "--train_kimg=inf"), ("realmix", "--w_match=inf"), ("realmix", "--gamma=nan"),
             ("realmix", "--ema=nan"), ("realmix", "--report_kimg=nan"),
             ("mean_teacher", "--consistency_weight=nan"), ("mean_teacher", "--warmup_pos=inf")]
    for algorithm, arg in cases:
        flag_values = registry.define_flags(algorithm)
        flag_values([algorithm, arg])
        with pytest.raises(UserError, match=rf"^{re.escape(arg)} is (not a finite number|out of range)"):
            registry.configure(algorithm, flag_values)
    with pytest.raises(UserError, match=r"^--train_kimg=inf is not a finite number"):
        paper_commands.main(["paper_commands", "--train_kimg=inf"])
    cli.parse(quickstart.FLAG_VALUES, ["quickstart", "--labels=0"])
    with pytest.raises(UserError, match=r"^--labels=0 must be positive"):
        quickstart.main(["quickstart"])
    cli.parse(quickstart.FLAG_VALUES, ["quickstart", "--train_kimg=nan"])
    with pytest.raises(UserError, match=r"^--train_kimg=nan is not a finite number"):
        quickstart.main(["quickstart"])
