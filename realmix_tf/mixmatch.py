"""MixMatch (Berthelot et al., 2019) as the original (M:mixmatch.py): RealMix without
training-signal annealing, without the OOD mask and without the extended unlabeled set
(spec §6 with tsa='none', gamma=0). Label guessing over K=2 views sharpened with T=0.5, MixUp
of the 3B labeled and unlabeled examples, interleaved passes where only chunk 0 updates the BN
moving statistics, L = xe + w_match * ramp(step) * L2.

Defaults are the CIFAR-10 settings of the MixMatch paper (M:runs/table5.sh, beta 0.75,
w_match 75), which the RealMix paper re-ran; the bare flag defaults of M:mixmatch.py are
--beta=0.5 --w_match=100.

Command line:
    python -m realmix_tf.mixmatch --dataset=cifar10.3@250-5000 [--beta=0.75 --w_match=75]
"""
from realmix_tf.realmix import RealMix

# Monitors of RealMix's TSA and OOD mask: constants without them, so MixMatch leaves them out.
REALMIX_ONLY_SCALARS = ("monitors/tsa_threshold", "monitors/tsa_kept", "monitors/mask_ratio",
                        "monitors/mask_threshold")


class MixMatch(RealMix):
    """MixMatch on a Wide ResNet. beta: MixUp Beta(beta, beta); w_match: lambda_U, ramped
    linearly over warmup_kimg; nu, temperature: views per unlabeled image and sharpening T.
    Other arguments as SSLModel."""

    def __init__(self, nclass, input_shape, filters=32, repeat=4, scales=0, lr=0.002, wd=0.02,
                 ema=0.999, beta=0.75, w_match=75.0, warmup_kimg=1024, seed=0,
                 precision="float32", jit_compile=False, nu=2, temperature=0.5,
                 batched_passes=True, name="mixmatch"):
        super().__init__(nclass, input_shape, filters=filters, repeat=repeat, scales=scales,
                         lr=lr, wd=wd, ema=ema, beta=beta, w_match=w_match,
                         warmup_kimg=warmup_kimg, tsa="none", gamma=0.0, seed=seed,
                         precision=precision, jit_compile=jit_compile, nu=nu,
                         temperature=temperature, batched_passes=batched_passes, name=name)

    def hparams(self) -> dict:
        hparams = super().hparams()
        for realmix_only in ("tsa", "tsa_source", "gamma", "train_kimg"):
            hparams.pop(realmix_only, None)
        return hparams

    def train_step(self, data):
        scalars = super().train_step(data)
        return {k: v for k, v in scalars.items() if k not in REALMIX_ONLY_SCALARS}


# ---------------------------------------------------------------------------------------------
# Command line (the trainer is libml/train.py). The flags --beta, --w_match and --warmup_kimg
# are RealMix's (defined when realmix_tf.realmix is imported); its --tsa, --tsa_source and
# --gamma exist too but are refused here.

from absl import flags  # noqa: E402

from libml import train  # noqa: E402
from libml.errors import UserError  # noqa: E402
from realmix_tf import realmix  # noqa: E402
from realmix_tf.supervised import check_no_arguments  # noqa: E402

FLAGS = flags.FLAGS
REALMIX_ONLY_FLAGS = ("tsa", "tsa_source", "gamma", "percent_mask")


def mixmatch_hparams(flag_values=FLAGS) -> dict:
    given = [f"--{name}" for name in REALMIX_ONLY_FLAGS
             if name in flag_values and flag_values[name].present]
    if given:
        raise UserError(f"{', '.join(given)} given, but MixMatch has no TSA or OOD mask: "
                        f"drop them, or train RealMix (python -m realmix_tf.realmix)")
    if flag_values.beta <= 0:
        raise UserError(f"--beta={flag_values.beta} must be positive: MixMatch's CIFAR-10 "
                        f"runs use 0.75")
    if flag_values.w_match < 0 or flag_values.warmup_kimg < 0:
        raise UserError(f"--w_match={flag_values.w_match}, --warmup_kimg={flag_values.warmup_kimg}: "
                        f"both must be >= 0")
    return dict(beta=flag_values.beta, w_match=flag_values.w_match,
                warmup_kimg=flag_values.warmup_kimg)


def make_model(info, config: "train.TrainConfig") -> MixMatch:
    return MixMatch(info.nclass, info.shape, **config.model_kwargs())


def main(argv):
    check_no_arguments(argv)
    config = train.config_from_flags(FLAGS, **mixmatch_hparams(FLAGS))
    return train.Trainer(config, make_model, "MixMatch").run()


realmix.define_flags()

if __name__ == "__main__":
    train.cli_run(main)
