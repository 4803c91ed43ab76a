"""RealMix (Nair et al., 2019, arXiv:1912.08766): MixMatch with training-signal annealing (TSA)
on the labeled loss and a per-batch percentile mask (gamma) on the unlabeled loss.

`RealMix.train_step` follows Algorithm 1 of the paper and spec §6 of the released code:
  1. guess labels of the unlabeled images from their K = nu views (raw weights, batch-stat BN,
     no moving-statistics update, no gradient), averaged and sharpened;
  2. MixUp of all 3B labeled + unlabeled examples with one shuffle of the same 3B;
  3. interleaved forward passes: only the chunk that mixes labeled and unlabeled rows
     (batches[0]) updates the BN moving statistics (spec §6.4);
  4. losses: soft cross-entropy on the mixed labeled part (optionally TSA-masked) and L2 on the
     mixed unlabeled part (optionally OOD-masked by gamma), L = L_X + lambda_U(step) * L_U;
  5. Adam, decoupled weight decay of the kernels, EMA update (libml.ssl.SSLModel.apply_update).

BN policy, made explicit: a forward pass that must see its own batch statistics is a "chunk";
the K guess passes run as one call with bn_groups=K and update_bn_stats=False, and the 3
interleaved passes as one call with bn_groups=3 and update_bn_stats=True, which updates the
moving statistics from chunk 0 alone. This is the same arithmetic as the separate passes of
the released code (batched_passes=False runs them separately; the tests check both agree).

The command line is appended to this module by the trainer (libml/train.py); the class does
not read flags.
"""
import tensorflow as tf

from libml import layers
from libml.errors import UserError
from libml.ssl import SSLModel

TSA_CHOICES = ("none", "linear", "log", "exp")


def _kimg(value):
    """A kimg count as given (fractions allowed), shown as an int when it is whole."""
    value = float(value)
    return int(value) if value.is_integer() else value


class RealMix(SSLModel):
    """RealMix on a Wide ResNet. Keyword arguments (defaults are the released ones, spec §2):
    beta: MixUp Beta(beta, beta) parameter (the paper's alpha); w_match: lambda_U, ramped
    linearly over warmup_kimg; train_kimg: run length, TSA progress = step / (train_kimg*1024)
    clipped to [0, 1]; tsa: 'none' | 'linear' | 'log' | 'exp'; tsa_source: 'labels' (intended
    rule) | 'logits' (released code's rule); gamma: OOD-mask percentile in [0, 1), 0 = off;
    nu: views per unlabeled image; temperature: sharpening T; seed: initial weights and the
    per-step draws (lambda and permutation are stateless functions of (seed, step))."""

    def __init__(self, nclass, input_shape, filters=32, repeat=4, scales=0, lr=0.002, wd=0.02,
                 ema=0.999, beta=0.75, w_match=75.0, warmup_kimg=1024, train_kimg=65536,
                 tsa="none", tsa_source="labels", gamma=0.0, seed=0, precision="float32",
                 jit_compile=False, nu=2, temperature=0.5, batched_passes=True, bn_momentum=0.999,
                 name="realmix"):
        if tsa not in TSA_CHOICES:
            raise UserError(f"unknown TSA schedule {tsa!r}: use one of {', '.join(TSA_CHOICES)}")
        if tsa_source not in layers.TSA_SOURCES:
            raise UserError(f"unknown TSA source {tsa_source!r}: use 'labels' or 'logits'")
        if not 0.0 <= gamma < 1.0:
            raise UserError(f"gamma={gamma} is out of range: use a value in [0, 1) (0 = no mask)")
        if beta <= 0 or temperature <= 0:
            raise UserError(f"beta={beta}, temperature={temperature}: both must be > 0")
        if nu < 1 or w_match < 0 or warmup_kimg < 0 or train_kimg <= 0:
            raise UserError(f"nu={nu}, w_match={w_match}, warmup_kimg={warmup_kimg}, "
                            f"train_kimg={train_kimg}: use nu >= 1, w_match >= 0, "
                            f"warmup_kimg >= 0, train_kimg > 0")
        super().__init__(nclass, input_shape, filters=filters, repeat=repeat, scales=scales,
                         lr=lr, wd=wd, ema=ema, seed=seed, precision=precision,
                         jit_compile=jit_compile, bn_momentum=bn_momentum, name=name)
        self.beta, self.w_match, self.temperature = float(beta), float(w_match), float(temperature)
        self.warmup_kimg, self.train_kimg = _kimg(warmup_kimg), _kimg(train_kimg)
        self.tsa, self.tsa_source, self.gamma = tsa, tsa_source, float(gamma)
        self.nu, self.batched_passes = int(nu), bool(batched_passes)
        # Only the XLA variant is a separate tf.function: the caller (trainer, strategy.run)
        # traces train_step as a whole.
        self._losses_and_gradients = self._losses_and_gradients_eager
        if self.use_jit:
            self._losses_and_gradients = tf.function(self._losses_and_gradients_eager,
                                                     jit_compile=True)

    def hparams(self) -> dict:
        return dict(super().hparams(), beta=self.beta, w_match=self.w_match,
                    warmup_kimg=self.warmup_kimg, train_kimg=self.train_kimg, tsa=self.tsa,
                    tsa_source=self.tsa_source, gamma=self.gamma, nu=self.nu,
                    temperature=self.temperature)

    # ----------------------------------------------------------------------------------------
    def train_step(self, data):
        """One RealMix step on one replica's batch. data = (labeled, unlabeled):
        labeled['image'] f32[B,H,W,C], labeled['label'] int[B], unlabeled['image']
        f32[B,nu,H,W,C]; B must be static. Returns scalar float32 tensors keyed by tag."""
        labeled, unlabeled = data
        x, u = labeled["image"], unlabeled["image"]
        batch = x.shape[0]
        if batch is None or u.shape[0] != batch or u.shape[1] != self.nu:
            raise ValueError(f"RealMix needs static, equal batch sizes and nu={self.nu} views: "
                             f"got labeled {x.shape}, unlabeled {u.shape} (batch the datasets "
                             f"with drop_remainder=True)")
        step = tf.convert_to_tensor(self.step)
        lam_seed, perm_seed = self.step_seeds(step)
        total = (self.nu + 1) * batch
        # Drawn outside the compiled part: the Beta sampler has no XLA kernel.
        lam = layers.sample_mixup_lambda(total, self.beta, lam_seed)
        index = layers.sample_permutation(total, perm_seed)
        grads, scalars = self._losses_and_gradients(x, labeled["label"], u, lam, index, step)
        self.apply_update(grads)
        self.count_images(batch)
        return scalars

    def step_seeds(self, step):
        """Two stateless seeds (MixUp lambda, permutation) from (seed, step, replica)."""
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        base = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(step, tf.int64) + tf.cast(replica_id, tf.int64)])
        return tf.unstack(tf.random.experimental.stateless_split(base, 2))

    def _losses_and_gradients_eager(self, x, labels, u, lam, index, step):
        batch = x.shape[0]
        views = tf.unstack(u, axis=1)                                    # nu x [B, H, W, C]

        # 1. Label guessing (raw weights, batch statistics, moving stats untouched).
        guess_logits = self.forward(views, update_first=False)
        guess = layers.guess_label(guess_logits, self.temperature)      # stop-gradient inside

        # 2. MixUp over the concatenation of the labeled and all unlabeled views.
        inputs = tf.concat([x] + views, axis=0)
        targets = tf.concat([tf.one_hot(labels, self.nclass)] + [guess] * self.nu, axis=0)
        mixed_inputs, mixed_targets = layers.mixup(inputs, targets, lam, index)
        targets_x, targets_u = mixed_targets[:batch], mixed_targets[batch:]

        with tf.GradientTape() as tape:
            # 3. Interleaved passes; only chunk 0 updates the BN moving statistics.
            chunks = layers.interleave(tf.split(mixed_inputs, self.nu + 1), batch)
            logits = layers.interleave(self.forward(chunks, update_first=True), batch)
            logits_x, logits_u = logits[0], tf.concat(logits[1:], axis=0)

            # 4. Losses.
            loss_xe, tsa_scalars = self.labeled_loss(logits_x, targets_x, step)
            loss_l2u, mask_scalars = self.unlabeled_loss(logits_u, targets_u)
            w_match = layers.unlabeled_weight(step, self.w_match, round(self.warmup_kimg * 1024))
            loss = loss_xe + w_match * loss_l2u
            scaled_loss = self.scale_loss(loss)
        grads = self.gradients(tape, scaled_loss)

        confidence = tf.reduce_max(tf.nn.softmax(logits_u), axis=-1)
        scalars = {
            "losses/xe": loss_xe,
            "losses/l2u": loss_l2u,
            "losses/overall": loss,
            "monitors/w_match": w_match,
            **tsa_scalars,
            **mask_scalars,
            "monitors/confidence_min": tf.reduce_min(confidence),
            "monitors/confidence_mean": tf.reduce_mean(confidence),
            "monitors/confidence_max": tf.reduce_max(confidence),
        }
        return grads, scalars

    def forward(self, chunks, update_first):
        """Training-mode logits (float32) of each chunk, each normalised with its own batch
        statistics; the moving statistics follow chunk 0 if update_first, else stay put."""
        if not self.batched_passes:
            return [self.net(c, training=True, update_bn_stats=update_first and i == 0)
                    for i, c in enumerate(chunks)]
        logits = self.net(tf.concat(chunks, axis=0), training=True,
                          update_bn_stats=update_first, bn_groups=len(chunks))
        return tf.split(logits, len(chunks))

    def labeled_loss(self, logits_x, targets_x, step):
        """Soft cross-entropy on the mixed labeled part; with TSA, the mean over kept rows."""
        loss = layers.soft_cross_entropy(targets_x, logits_x)
        if self.tsa == "none":
            one = tf.constant(1.0)
            return tf.reduce_mean(loss), {"monitors/tsa_threshold": one, "monitors/tsa_kept": one}
        progress = layers.tsa_progress(step, round(self.train_kimg * 1024))
        threshold = layers.tsa_threshold(self.tsa, progress, self.nclass)
        keep = layers.tsa_mask(logits_x, targets_x, threshold, self.tsa_source)
        return layers.masked_mean(loss, keep), {"monitors/tsa_threshold": threshold,
                                                "monitors/tsa_kept": tf.reduce_mean(keep)}

    def unlabeled_loss(self, logits_u, targets_u):
        """L2 between mixed guesses and predictions; with gamma > 0, the mean over the rows
        whose confidence is above the per-batch gamma-percentile (spec §6.7)."""
        sq_err = layers.l2_consistency(targets_u, logits_u)
        if self.gamma <= 0:
            return tf.reduce_mean(sq_err), {"monitors/mask_ratio": tf.constant(1.0),
                                            "monitors/mask_threshold": tf.constant(0.0)}
        keep, threshold = layers.ood_mask(tf.nn.softmax(logits_u), self.gamma,
                                          return_threshold=True)
        return layers.masked_l2_mean(sq_err, keep, self.nclass), {
            "monitors/mask_ratio": tf.reduce_mean(keep), "monitors/mask_threshold": threshold}


# ---------------------------------------------------------------------------------------------
# Command line (the trainer is libml/train.py):
#   python -m realmix_tf.realmix --dataset=cifar10.3@250-5000 --gamma=0.6 --tsa=linear

from absl import flags  # noqa: E402

from libml import train  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The trainer's flags plus RealMix's own (defaults: the released code's, spec §2.1)."""
    train.define_train_flags()
    if "beta" in FLAGS:
        return
    flags.DEFINE_float("beta", 0.75, "MixUp Beta(beta, beta) parameter (the paper's alpha).")
    flags.DEFINE_float("w_match", 75.0, "Unlabeled-loss weight lambda_U (ramped over --warmup_kimg).")
    flags.DEFINE_float("warmup_kimg", 1024, "Linear ramp-up of w_match, in kimg (fractions allowed).")
    flags.DEFINE_string("tsa", "none", "Training-signal annealing of the labeled loss: none, "
                        "linear, log, exp (the released names linear_schedule, ... also work).")
    flags.DEFINE_string("tsa_source", "labels", "What the TSA threshold multiplies: labels "
                        "(the paper's rule) or logits (the released code's, spec §6.6).")
    flags.DEFINE_float("gamma", 0.0, "OOD mask: fraction in [0, 1) of the least confident mixed "
                       "unlabeled predictions left out of the unlabeled loss (0 = off).")
    flags.DEFINE_alias("percent_mask", "gamma")


def realmix_hparams(flag_values=FLAGS) -> dict:
    """RealMix's flags, checked (one-line UserError), as RealMix keyword arguments."""
    tsa = flag_values.tsa
    if tsa.endswith("_schedule"):
        tsa = tsa[: -len("_schedule")]
    if tsa not in TSA_CHOICES:
        raise UserError(f"--tsa={flag_values.tsa!r} is unknown: use one of {', '.join(TSA_CHOICES)}")
    if flag_values.tsa_source not in layers.TSA_SOURCES:
        raise UserError(f"--tsa_source={flag_values.tsa_source!r} is unknown: use labels or logits")
    if not 0.0 <= flag_values.gamma < 1.0:
        raise UserError(f"--gamma={flag_values.gamma} is out of range: use a fraction in [0, 1) "
                        f"(0.6 masks the 60 % least confident predictions)")
    if flag_values.beta <= 0:
        raise UserError(f"--beta={flag_values.beta} must be positive: the paper uses 0.75")
    if flag_values.w_match < 0 or flag_values.warmup_kimg < 0:
        raise UserError(f"--w_match={flag_values.w_match}, --warmup_kimg={flag_values.warmup_kimg}: "
                        f"both must be >= 0")
    return dict(beta=flag_values.beta, w_match=flag_values.w_match,
                warmup_kimg=flag_values.warmup_kimg, tsa=tsa,
                tsa_source=flag_values.tsa_source, gamma=flag_values.gamma)


def make_model(info, config: "train.TrainConfig") -> RealMix:
    return RealMix(info.nclass, info.shape, train_kimg=config.train_kimg, **config.model_kwargs())


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {' '.join(argv[1:])}: every option is a --flag "
                        f"(see --helpfull)")
    config = train.config_from_flags(FLAGS, **realmix_hparams(FLAGS))
    train.Trainer(config, make_model, "RealMix").run()
    return 0


define_flags()

if __name__ == "__main__":
    train.cli_run(main)
