"""A trainer run in this process (RealMix unless told), optionally cut short as by a crash
(for the resume tests of test_resume, test_gamma_auto and test_every_algorithm)."""
from realmix_tf import registry
from tests.fixtures_data import test_options


class Stopped(Exception):
    """Raised in place of the step after the last one a crashed run completes."""


def run(config, stop_after_steps=None, data_options="test", algorithm="realmix"):
    """Trains `config` with `algorithm` (a registry name); with stop_after_steps, the run dies after that many steps
    (no final save, no clean-up). data_options: "test" (tests.fixtures_data.test_options: no
    autotune) or what train.Trainer takes (None: the trainer's own)."""
    options = test_options() if data_options == "test" else data_options
    trainer = registry.make_trainer(algorithm, config, data_options=options)
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
