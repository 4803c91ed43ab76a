"""Virtual adversarial training (Miyato et al., 2018) as the MixMatch repository's baseline
(M:vat.py, M:third_party/vat_utils.py), which the RealMix paper quotes in Tables 2-3 and Figure 3.

One step, with y = view 0 of the unlabeled batch (libml feeds VAT one view; view 1 is unused):
  logits_x, logits_y = net(labeled), net(y)        training-mode BN, each its own batch
                                                   statistics; only the labeled pass updates
                                                   the moving statistics (as released);
  delta   = vat_eps * normalize(grad_d KL(p(y) || p(y + d))), d = xi * normalize(N(0, 1))
            (one power iteration, libml/vat_ops.py; p(y) and p(y + d) are two passes of the
            same shape, as libml's separate calls; they update nothing, no gradient);
  loss    = xe(labeled) + vat * warmup(step) * mean KL(p(y + delta) || stop_grad(p_y))
            + entmin_weight * mean entropy(p_y)
  warmup(step) = clip(step_images / (warmup_pos * train_kimg * 1024), 0, 1).
Defaults as M:vat.py: vat 0.3, vat_eps 6, entmin_weight 0.06 (not ramped), warmup_pos 0.4,
xi 1e-6; the MixMatch tables ran it with these and --wd=0.02 on CIFAR-10 and SVHN.

The random start d is a stateless draw of (seed, step, replica). ξ = 1e-6 is below the
resolution of bfloat16/float16 inputs, so VAT trains in float32 only: --mixed_precision=auto
(the default) gives float32 for VAT, an explicit bf16 / fp16 is refused.

Command line:
    python -m realmix_tf.vat --dataset=cifar10.3@250-5000
"""
import tensorflow as tf
from absl import flags

from libml import baseline_losses, replicas, vat_ops
from libml.config import KIMG, fraction, positive, whole_kimg
from libml.errors import UserError
from libml.ssl import SSLModel
from realmix_tf import mean_teacher
from realmix_tf.supervised import (check_smoothing, define_smoothing_flag, labeled_cross_entropy,
                                   smoothing_hparams)


def check_vat(vat, vat_eps, vat_xi, entmin_weight, warmup_pos, train_kimg):
    """VAT's arguments, checked once (UserError naming the flags and the fix)."""
    if vat < 0 or vat_eps <= 0 or vat_xi <= 0 or entmin_weight < 0:
        raise UserError(f"--vat={vat}, --vat_eps={vat_eps}, --vat_xi={vat_xi}, "
                        f"--entmin_weight={entmin_weight}: use weights >= 0 and eps, xi > 0 "
                        f"(libml: 0.3, 6, 1e-6, 0.06)")
    fraction("libml: 0.4")("warmup_pos", warmup_pos)
    positive("train_kimg", train_kimg)


class VAT(SSLModel):
    """VAT + entropy minimisation on a Wide ResNet. vat: weight of the VAT loss (ramped over
    warmup_pos of train_kimg); vat_eps: perturbation norm; vat_xi: power-iteration step;
    entmin_weight: weight of the entropy term; smoothing: label smoothing of the labeled
    targets (libml accepts --smoothing but never applies it). Other arguments as SSLModel."""

    def __init__(self, nclass, input_shape, vat=vat_ops.VAT_WEIGHT, vat_eps=vat_ops.VAT_EPSILON,
                 vat_xi=vat_ops.VAT_XI, entmin_weight=vat_ops.ENTMIN_WEIGHT,
                 warmup_pos=baseline_losses.WARMUP_POS, train_kimg=65536, smoothing=0.0,
                 precision="float32", name="vat", **kwargs):
        check_vat(vat, vat_eps, vat_xi, entmin_weight, warmup_pos, train_kimg)
        if precision != "float32":
            raise UserError(f"VAT with precision {precision}: its power iteration moves pixels "
                            f"by ~xi/50, below bfloat16/float16 resolution: use "
                            f"--mixed_precision=none")
        super().__init__(nclass, input_shape, precision=precision, name=name, **kwargs)
        self.vat, self.vat_eps, self.vat_xi = float(vat), float(vat_eps), float(vat_xi)
        self.entmin_weight, self.warmup_pos = float(entmin_weight), float(warmup_pos)
        self.train_kimg = whole_kimg(train_kimg)
        self.smoothing = check_smoothing(smoothing)
        self._losses_and_gradients = self.maybe_jit(self._losses_and_gradients_eager)

    @classmethod
    def check_hparams(cls, vat=vat_ops.VAT_WEIGHT, vat_eps=vat_ops.VAT_EPSILON,
                      vat_xi=vat_ops.VAT_XI, entmin_weight=vat_ops.ENTMIN_WEIGHT,
                      warmup_pos=baseline_losses.WARMUP_POS, train_kimg=65536, smoothing=0.0,
                      **others):
        check_vat(vat, vat_eps, vat_xi, entmin_weight, warmup_pos, train_kimg)
        check_smoothing(smoothing)
        super().check_hparams(**others)

    @classmethod
    def from_config(cls, info, config, **kwargs):
        """--mixed_precision=auto gives float32 (the fastest precision VAT supports); an explicit
        bf16 / fp16 is refused by the constructor."""
        settings = dict(config.model_kwargs(), train_kimg=config.train_kimg, **kwargs)
        if config.mixed_precision == "auto":
            settings["precision"] = "float32"
        return cls(info.nclass, info.shape, **settings)

    def hparams(self) -> dict:
        return dict(super().hparams(), vat=self.vat, vat_eps=self.vat_eps, vat_xi=self.vat_xi,
                    entmin_weight=self.entmin_weight, warmup_pos=self.warmup_pos,
                    train_kimg=self.train_kimg, **smoothing_hparams(self.smoothing))

    def vat_ramp(self, step):
        """vat * linear warm-up at `step` images (float32 scalar)."""
        return self.vat * baseline_losses.linear_warmup(step, self.warmup_pos,
                                                        self.train_kimg * KIMG)

    def train_step(self, data):
        """data = (labeled, unlabeled): labeled['image'] f32[B,H,W,C], labeled['label'] int[B],
        unlabeled['image'] f32[B,V,H,W,C] (view 0 is used). Returns scalar float32 tensors."""
        labeled, unlabeled = data
        x, u = labeled["image"], unlabeled["image"]
        if x.shape[0] is None or u.shape[0] != x.shape[0]:
            raise ValueError(f"VAT needs static, equal batch sizes: got labeled {x.shape}, "
                             f"unlabeled {u.shape} (batch the datasets with drop_remainder=True)")
        step = tf.convert_to_tensor(self.step)
        grads, scalars = self._losses_and_gradients(x, labeled["label"], u[:, 0], step,
                                                    self.noise_seed(step))
        self.apply_update(grads)
        self.count_images(x.shape[0])
        return replicas.totals(scalars)

    def noise_seed(self, step):
        """Stateless seed of the power iteration's random start: (seed, step + replica)."""
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        return tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(step, tf.int64) + tf.cast(replica_id, tf.int64)])

    def _losses_and_gradients_eager(self, x, labels, y, step, seed):
        def forward(images):          # batch statistics of its own, moving statistics untouched
            return self.net(images, training=True, update_bn_stats=False)

        with tf.GradientTape() as tape:
            logits = self.net(tf.concat([x, y], axis=0), training=True, update_bn_stats=True,
                              bn_groups=2)                           # moving stats: labeled half
            logits_x, logits_y = tf.split(logits, 2)
            with tape.stop_recording():
                noise = tf.random.stateless_normal(tf.shape(y), seed, dtype=y.dtype)
                # The finite difference compares forward(y + d) with forward(y) computed the
                # same way (libml: two separate classifier calls), not with the batched pass.
                delta = vat_ops.virtual_adversarial_perturbation(
                    y, forward(y), forward, self.vat_eps, noise, self.vat_xi)
            loss_xe = labeled_cross_entropy(logits_x, labels, self.nclass, self.smoothing)
            # Means over this replica's rows, as shares of the mean over all replicas' rows.
            loss_vat = replicas.share(vat_ops.vat_loss(forward(y + delta), logits_y))
            loss_entmin = replicas.mean(vat_ops.entropy_from_logits(logits_y))
            weight = self.vat_ramp(step)
            loss = loss_xe + weight * loss_vat + self.entmin_weight * loss_entmin
            scaled_loss = self.scale_loss(loss)
        grads = self.gradients(tape, scaled_loss)
        return grads, {"losses/xe": loss_xe, "losses/vat": loss_vat, "losses/entmin": loss_entmin,
                       "losses/overall": loss, "monitors/vat_weight": replicas.share(weight)}


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry.

def define_flags(flag_values=flags.FLAGS) -> None:
    """VAT's flags (defaults: M:vat.py)."""
    if "vat_eps" in flag_values:
        return
    fv = dict(flag_values=flag_values)
    flags.DEFINE_float("vat", vat_ops.VAT_WEIGHT, "Weight of the VAT loss (ramped over "
                       "--warmup_pos).", **fv)
    flags.DEFINE_float("vat_eps", vat_ops.VAT_EPSILON, "L2 norm of the adversarial perturbation "
                       "of each image.", **fv)
    flags.DEFINE_float("vat_xi", vat_ops.VAT_XI, "Finite-difference step of the power iteration "
                       "(VAT runs in float32: --mixed_precision auto or none).", **fv)
    flags.DEFINE_float("entmin_weight", vat_ops.ENTMIN_WEIGHT, "Weight of the entropy of the "
                       "unlabeled predictions (not ramped).", **fv)
    mean_teacher.define_warmup_pos_flag(flag_values)
    define_smoothing_flag(flag_values)


def hparams_from_flags(flag_values=flags.FLAGS) -> dict:
    return dict(vat=flag_values.vat, vat_eps=flag_values.vat_eps, vat_xi=flag_values.vat_xi,
                entmin_weight=flag_values.entmin_weight, warmup_pos=flag_values.warmup_pos,
                smoothing=flag_values.smoothing)


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("vat")
