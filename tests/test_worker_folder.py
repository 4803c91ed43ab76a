"""libml/run/worker_folder.py without a cluster (issue 26): the old temporary copies a killed
non-chief worker left are removed for this run only; the input position files are pruned to
the chief's step."""
import os

from libml.run import worker_folder


def test_old_temporary_copies_of_this_run_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    run = tmp_path / "runs" / "toy" / "RealMix_x"
    mine = tmp_path / "tmp" / "realmix-worker1-abc"
    other_run = tmp_path / "tmp" / "realmix-worker1-def"
    other_worker = tmp_path / "tmp" / "realmix-worker2-ghi"
    for folder, target in ((mine, run), (other_run, tmp_path / "runs" / "toy" / "Other"),
                           (other_worker, run)):
        copy = folder / str(target).lstrip(os.sep) / "tf"
        copy.mkdir(parents=True)
        (copy / "model.ckpt-64.index").write_bytes(b"x")
    folder = worker_folder.WorkerFolder(str(run), keep=2, worker_id=1).open({})
    assert not mine.exists() and other_run.exists() and other_worker.exists()
    assert not run.exists()                    # the worker writes nothing at start
    assert folder.remove_old_copies() == []


def test_input_positions_newer_than_the_chief_are_removed(tmp_path):
    run = tmp_path / "run"
    folder = worker_folder.WorkerFolder(str(run), keep=5, worker_id=1)
    positions = run / "tf" / "worker1"
    positions.mkdir(parents=True)
    for step in (16, 32, 48):
        for suffix in (".index", ".data-00000-of-00001"):
            (positions / f"input.ckpt-{step}{suffix}").write_bytes(b"x")
    assert folder.resume(-1, None, None, 8) == ""          # a fresh start: none is kept
    assert not list(positions.iterdir())
