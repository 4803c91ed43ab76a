"""A RealMix trainer run in this process, optionally cut short as by a crash (for the resume
tests of test_resume and test_gamma_auto)."""
from libml import train
from realmix_tf.realmix import RealMix
from tests.fixtures_data import test_options


class Stopped(Exception):
    """Raised in place of the step after the last one a crashed run completes."""


def run(config, stop_after_steps=None, data_options="test"):
    """Trains `config` with RealMix; with stop_after_steps, the run dies after that many steps
    (no final save, no clean-up). data_options: "test" (tests.fixtures_data.test_options: no
    autotune) or what train.Trainer takes (None: the trainer's own)."""
    options = test_options() if data_options == "test" else data_options
    trainer = train.Trainer(config, RealMix.from_config, "RealMix", data_options=options)
    if stop_after_steps is not None:
        make_train_fn = trainer._get_train_fn
        calls = {"n": 0}

        def crashing():
            inner = make_train_fn()

            def step():
                if calls["n"] == stop_after_steps:
                    raise Stopped()
                calls["n"] += 1
                return inner()
            return step
        trainer._get_train_fn = crashing
    try:
        trainer.run()
    except Stopped:
        pass
    return trainer
