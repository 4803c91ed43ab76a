"""MixMatch (Berthelot et al., 2019) as the original (M:mixmatch.py), and the base of RealMix.

One step (`train_step`), with B labeled images x and B unlabeled images u in NU = 2 views:
  1. guess labels of u: softmax of each view (raw weights, batch-statistics BN, no moving-
     statistics update, no gradient), averaged over the views and sharpened with T;
  2. MixUp of the 3B labeled + unlabeled examples with one shuffle of the same 3B
     (lambda ~ Beta(beta, beta), lambda = max(lambda, 1 - lambda));
  3. interleaved forward passes: only the chunk that mixes labeled and unlabeled rows (chunk 0)
     updates the BN moving statistics (spec §6.4);
  4. L = labeled_loss + w_match * ramp(step) * unlabeled_loss, with the two hooks
     labeled_loss = mean soft cross-entropy, unlabeled_loss = mean L2 (RealMix overrides both);
  5. Adam, decoupled weight decay of the kernels, EMA update (libml.ssl.SSLModel.apply_update).

BN policy, made explicit: a forward pass that must see its own batch statistics is a "chunk";
the NU guess passes run as one call with bn_groups=NU and update_bn_stats=False, and the 3
interleaved passes as one call with bn_groups=3 and update_bn_stats=True, which updates the
moving statistics from chunk 0 alone. This is the same arithmetic as the separate passes of
the released code (batched_passes=False runs them separately; the tests check both agree).

Defaults are the CIFAR-10 settings of the MixMatch paper (M:runs/table5.sh, beta 0.75,
w_match 75), which the RealMix paper re-ran; the bare flag defaults of M:mixmatch.py are
--beta=0.5 --w_match=100.

Command line:
    python -m realmix_tf.mixmatch --dataset=cifar10.3@250-5000 [--beta=0.75 --w_match=75]
"""
import tensorflow as tf
from absl import flags

from libml import layers, replicas
from libml.config import KIMG, finite, whole_kimg
from libml.errors import UserError
from libml.ssl import SSLModel, check_loss_nclass, define_loss_nclass_flag

NU = 2    # views per unlabeled image: the input pipeline always gives 2


def check_mixmatch(beta, w_match, warmup_kimg, temperature):
    """MixMatch's arguments, checked once (UserError naming the flag and the fix)."""
    for name, value in (("beta", beta), ("w_match", w_match), ("warmup_kimg", warmup_kimg),
                        ("temperature", temperature)):
        finite(name, value)
    if beta <= 0:
        raise UserError(f"--beta={beta} must be positive: the paper uses 0.75")
    if w_match < 0 or warmup_kimg < 0:
        raise UserError(f"--w_match={w_match}, --warmup_kimg={warmup_kimg}: both must be >= 0")
    if temperature <= 0:
        raise UserError(f"temperature={temperature} must be positive: the paper uses 0.5")


class MixMatch(SSLModel):
    """MixMatch on a Wide ResNet. beta: MixUp Beta(beta, beta) parameter (the paper's alpha);
    w_match: lambda_U, ramped linearly over warmup_kimg; temperature: sharpening T;
    batched_passes: run the chunks of a pass as one call (same arithmetic); loss_nclass: the
    class count the unlabeled L2 divides by (0 = nclass; 10 on a 6-way mismatch head = the
    released scale, docs/fidelity.md). The seed also
    draws the per-step lambda and permutation (stateless functions of (seed, step)). Other
    arguments as SSLModel."""

    def __init__(self, nclass, input_shape, beta=0.75, w_match=75.0, warmup_kimg=1024,
                 temperature=0.5, batched_passes=True, loss_nclass=0, name="mixmatch", **kwargs):
        check_mixmatch(beta, w_match, warmup_kimg, temperature)
        loss_nclass = check_loss_nclass(loss_nclass, nclass)
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.loss_nclass = loss_nclass
        self.beta, self.w_match, self.temperature = float(beta), float(w_match), float(temperature)
        self.warmup_kimg = whole_kimg(warmup_kimg)
        self.batched_passes = bool(batched_passes)
        self._losses_and_gradients = self.maybe_jit(self._losses_and_gradients_eager)

    @classmethod
    def check_hparams(cls, beta=0.75, w_match=75.0, warmup_kimg=1024, temperature=0.5,
                      loss_nclass=0, **others):
        check_mixmatch(beta, w_match, warmup_kimg, temperature)
        check_loss_nclass(loss_nclass)
        super().check_hparams(**others)

    def hparams(self) -> dict:
        return dict(super().hparams(), beta=self.beta, w_match=self.w_match,
                    warmup_kimg=self.warmup_kimg, nu=NU, temperature=self.temperature,
                    **({"loss_nclass": self.loss_nclass} if self.loss_nclass else {}))

    # ----------------------------------------------------------------------------------------
    def train_step(self, data):
        """One step on one replica's batch. data = (labeled, unlabeled): labeled['image']
        f32[B,H,W,C], labeled['label'] int[B], unlabeled['image'] f32[B,NU,H,W,C]; B must be
        static. Returns scalar float32 tensors keyed by TensorBoard tag."""
        labeled, unlabeled = data
        x, u = labeled["image"], unlabeled["image"]
        batch = x.shape[0]
        if batch is None or u.shape[0] != batch or u.shape[1] != NU:
            raise ValueError(f"{type(self).__name__} needs static, equal batch sizes and {NU} "
                             f"views: got labeled {x.shape}, unlabeled {u.shape} (batch the "
                             f"datasets with drop_remainder=True)")
        step = tf.convert_to_tensor(self.step)
        lam_seed, perm_seed = self.step_seeds(step)
        total = replicas.MixPlan(batch, NU, self.replica_mode).global_rows
        # Drawn outside the compiled part (the Beta sampler has no XLA kernel), for the rows of
        # the global batch: every replica draws the same lambda and permutation.
        lam = layers.sample_mixup_lambda(total, self.beta, lam_seed)
        index = layers.sample_permutation(total, perm_seed)
        grads, scalars = self._losses_and_gradients(x, labeled["label"], u, lam, index, step)
        self.apply_update(grads)
        self.count_images(batch)
        return replicas.totals(scalars)

    def step_seeds(self, step):
        """Two stateless seeds (MixUp lambda, permutation) from (seed, step): the draws of the
        global batch. --replica_mode=per_replica: from (seed, step + replica), one per replica."""
        replica_id = 0 if replicas.synced(self.replica_mode) else replicas.replica_id()
        base = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(step, tf.int64) + tf.cast(replica_id, tf.int64)])
        return tf.unstack(tf.random.experimental.stateless_split(base, 2))

    def _losses_and_gradients_eager(self, x, labels, u, lam, index, step):
        batch = x.shape[0]
        plan = replicas.MixPlan(batch, NU, self.replica_mode)
        views = tf.unstack(u, axis=1)                                    # NU x [B, H, W, C]

        # 1. Label guessing (raw weights, batch statistics, moving stats untouched).
        guess = layers.guess_label(self.forward(views, update_first=False), self.temperature)

        # 2. MixUp over the concatenation of the labeled and all unlabeled views.
        inputs = tf.concat([x] + views, axis=0)
        targets = tf.concat([tf.one_hot(labels, self.nclass)] + [guess] * NU, axis=0)
        #    With several replicas, over the rows of every replica; this one keeps its part
        #    of each interleaved chunk (libml.replicas.MixPlan).
        chunks, targets_x, targets_u = plan.mix(inputs, targets, lam, index)

        with tf.GradientTape() as tape:
            # 3. Interleaved passes; only chunk 0 updates the BN moving statistics.
            logits_x, logits_u = plan.restore(self.forward(chunks, update_first=True))

            # 4. Losses: the two hooks, the unlabeled one weighted by the ramped w_match.
            loss_xe, labeled_scalars = self.labeled_loss(logits_x, targets_x, step)
            loss_l2u, unlabeled_scalars = self.unlabeled_loss(logits_u, targets_u)
            w_match = layers.unlabeled_weight(step, self.w_match, round(self.warmup_kimg * KIMG))
            loss = loss_xe + w_match * loss_l2u
            scaled_loss = self.scale_loss(loss)
        grads = self.gradients(tape, scaled_loss)

        confidence = replicas.confidence_stats(tf.nn.softmax(logits_u), self.replica_mode)
        shares = {   # every value is this replica's share (libml.replicas.totals sums them)
            "losses/xe": loss_xe,
            "losses/l2u": loss_l2u,
            "losses/overall": loss,
            "monitors/w_match": replicas.share(w_match),
            **labeled_scalars,
            **unlabeled_scalars,
            **{tag: replicas.share(value) for tag, value in confidence.items()},
        }
        return grads, shares

    def forward(self, chunks, update_first):
        """Training-mode logits (float32) of each chunk, each normalised with its own batch
        statistics; the moving statistics follow chunk 0 if update_first, else stay put."""
        if not self.batched_passes:
            return [self.net(c, training=True, update_bn_stats=update_first and i == 0)
                    for i, c in enumerate(chunks)]
        logits = self.net(tf.concat(chunks, axis=0), training=True,
                          update_bn_stats=update_first, bn_groups=len(chunks))
        return tf.split(logits, len(chunks))

    # -- the hooks: (loss, {tag: monitor}), both as this replica's share (libml/replicas.py:
    #    the shares of all replicas sum to the value; one device: the value itself) ----------
    def labeled_loss(self, logits_x, targets_x, step):
        """Mean soft cross-entropy of the mixed labeled part."""
        del step
        return replicas.mean(layers.soft_cross_entropy(targets_x, logits_x)), {}

    def unlabeled_loss(self, logits_u, targets_u):
        """Mean L2 between the mixed guesses and the predictions (over loss_nclass classes)."""
        loss = replicas.mean(layers.l2_consistency(targets_u, logits_u))
        if self.loss_nclass:
            loss = loss * (self.nclass / self.loss_nclass)
        return loss, {}


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry.

def define_flags(flag_values=flags.FLAGS) -> None:
    """MixMatch's flags (RealMix adds its own on top)."""
    if "beta" in flag_values:
        return
    fv = dict(flag_values=flag_values)
    flags.DEFINE_float("beta", 0.75, "MixUp Beta(beta, beta) parameter (the paper's alpha).", **fv)
    flags.DEFINE_float("w_match", 75.0, "Unlabeled-loss weight lambda_U (ramped over "
                       "--warmup_kimg).", **fv)
    flags.DEFINE_float("warmup_kimg", 1024, "Linear ramp-up of w_match, in kimg (fractions "
                       "allowed).", **fv)
    define_loss_nclass_flag(flag_values)


def hparams_from_flags(flag_values=flags.FLAGS) -> dict:
    return dict(beta=flag_values.beta, w_match=flag_values.w_match,
                warmup_kimg=flag_values.warmup_kimg, loss_nclass=flag_values.loss_nclass)


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("mixmatch")
