"""RealMix (Nair et al., 2019, arXiv:1912.08766) = MixMatch + training-signal annealing (TSA)
on the labeled loss + an out-of-distribution mask (gamma) on the unlabeled loss + Extend.

Algorithm 1 of the paper, line by line, and where each line lives:
   4, 9  Extend(Xu): K augmented copies of the unlabeled set, written beforehand by
         data_prep.extend_unlabeled and read with --extend=K (libml/data/extend.py, libml/data/pipeline.py)
   5, 12 Augment: flip + translate of every training image (libml/data/augment.py, libml/data/pipeline.py)
   13    generateTargets: label guessing, sharpened       MixMatch._losses_and_gradients_eager, 1.
 15-18   MixUp of labeled and unlabeled with X_l+u        MixMatch._losses_and_gradients_eager, 2.
   19    L_sup = CrossEntropy(f(X'_l), Y'_l)              MixMatch.labeled_loss
 20-22   if TSA: L_sup = TSA(L_sup, schedule)             RealMix.labeled_loss
   23    L_unsup = MSE(f(X'_u), Y'_u)                     MixMatch.unlabeled_loss
   24    L_unsup = OODMask_gamma(L_unsup)                 RealMix.unlabeled_loss
   25    L = L_sup + lambda L_unsup (lambda ramped)       MixMatch._losses_and_gradients_eager, 4.
 26-27   gradient step, EMA of the weights                libml.train.algorithm.SSLModel.apply_update
   29    return the EMA weights                           the trainer's export (libml/export/saving.py)

Command line:
    python -m realmix_tf.realmix --dataset=cifar10.3@250-5000 --gamma=0.6 --tsa=linear
"""
import tensorflow as tf

import keras

from realmix_tf import gamma_auto

from libml.nn import ops
from libml.nn import ood_score

from libml.nn import replicas
from libml.train.config import KIMG, decay, one_of
from libml.base.errors import UserError
from libml.train.algorithm import TRAIN_KIMG, hparam
from realmix_tf.mixmatch import MixMatch

TSA_CHOICES = ("none", "linear", "log", "exp")
OOD_SCORES = ("confidence", "prototype")


def parse_tsa(tsa: str) -> str:
    """The released code's names (linear_schedule, ...) as ours (linear, ...)."""
    return tsa[: -len("_schedule")] if tsa.endswith("_schedule") else tsa


def check_gamma(name, gamma):
    if gamma != gamma_auto.AUTO and not 0.0 <= gamma < 1.0:
        raise UserError(f"--gamma={gamma} is out of range: use a fraction in [0, 1) "
                        f"(0.6 masks the 60 % least confident predictions) or auto")


class RealMix(MixMatch):
    """RealMix on a Wide ResNet. train_kimg: run length, TSA progress = step / (train_kimg *
    1024) clipped to [0, 1]; tsa: 'none' | 'linear' | 'log' | 'exp'; tsa_source: 'labels'
    (the paper's rule) | 'logits' (the released code's rule); gamma: OOD-mask percentile in
    [0, 1), 0 = off, or "auto": estimated during training (realmix_tf/gamma_auto.py; then gamma
    is a variable the report hook sets). Other arguments as MixMatch (defaults are the
    released ones, spec §2)."""

    HPARAMS = dict(
        train_kimg=TRAIN_KIMG,
        tsa=hparam("none", "Training-signal annealing of the labeled loss: none, linear, log, "
                   "exp (the released names linear_schedule, ... also work).",
                   one_of(*TSA_CHOICES), parse_tsa),
        tsa_source=hparam("labels", "What the TSA threshold multiplies: labels (the paper's "
                          "rule) or logits (the released code's, spec §6.6).",
                          one_of(*ops.TSA_SOURCES)),
        gamma=hparam("0", "OOD mask: fraction in [0, 1) of the unlabeled images ranked least "
                     "in-distribution (by --ood_score) left out of the unlabeled loss (0 = off), "
                     "or auto: estimated from the data during training "
                     "(docs/usage_gamma_auto.md).", check_gamma, gamma_auto.parse_gamma),
        ood_score=hparam("confidence", "What the OOD mask ranks by: confidence (the released "
                         "code: the top probability of each mixed unlabeled prediction) or "
                         "prototype (cosine similarity of the EMA model's features of the "
                         "unmixed image to the nearest class prototype, a moving average of "
                         "the labeled images' features; libml/nn/ood_score.py).",
                         one_of(*OOD_SCORES)),
        prototype_momentum=hparam(0.99, "Moving-average momentum of the class prototypes "
                                  "(--ood_score=prototype).", decay, float),
    )
    FLAG_ALIASES = {"percent_mask": "gamma"}      # the released code's name

    def __init__(self, nclass, input_shape, name="realmix", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.gamma_state = gamma_auto.GammaState() if self.gamma == gamma_auto.AUTO else None
        self.prototypes = None
        if self.ood_score == "prototype":    # training state: in model.variables, checkpointed
            dim = self.ema_net.classifier.kernel.shape[0]
            self.prototypes = keras.Variable(tf.zeros([self.nclass, dim]), trainable=False,
                                             name="ood_prototypes",
                                             aggregation="only_first_replica")

    def hparams(self) -> dict:
        score = {} if self.ood_score == "confidence" else dict(ood_score=self.ood_score)
        if self.prototype_momentum != self.HPARAMS["prototype_momentum"].default:
            score["prototype_momentum"] = self.prototype_momentum   # names stay < 255 bytes
        return dict(super().hparams(), train_kimg=self.train_kimg, tsa=self.tsa,
                    tsa_source=self.tsa_source, gamma=self.gamma, **score)

    def report_hooks(self, run_dir: str, writes: bool = True) -> list:
        """--gamma=auto: the hook that estimates the OOD share at each report."""
        if self.gamma_state is None:
            return []
        return [GammaReport(gamma_auto.GammaAutoHook(self, self.nclass, run_dir, writes=writes))]

    def labeled_loss(self, logits_x, targets_x, step):
        """Algorithm 1, lines 19-22: with TSA, the mean cross-entropy over the rows whose
        label-class probability is still under the threshold (spec §6.6)."""
        if self.tsa == "none":
            loss, _ = super().labeled_loss(logits_x, targets_x, step)
            one = replicas.share(1.0)
            return loss, {"monitors/tsa_threshold": one, "monitors/tsa_kept": one}
        progress = ops.tsa_progress(step, round(self.train_kimg * KIMG))
        threshold = ops.tsa_threshold(self.tsa, progress, self.nclass)
        keep = ops.tsa_mask(logits_x, targets_x, threshold, self.tsa_source)
        loss = replicas.masked_mean(ops.soft_cross_entropy(targets_x, logits_x), keep,
                                    self.replica_mode)
        return loss, {"monitors/tsa_threshold": replicas.share(threshold),
                      "monitors/tsa_kept": replicas.mean(keep)}

    def unlabeled_scores(self, x, labels, views):
        """--ood_score=prototype: the EMA model's pooled features of the labeled batch update
        the class prototypes (global sums over replicas), and each unlabeled image's score is
        the cosine of its features (view 0, unmixed) to the nearest prototype. None for
        confidence (the mask then ranks the mixed predictions, as released)."""
        if self.prototypes is None or (self.gamma_state is None and self.gamma <= 0):
            return None      # no mask: nothing to rank
        batch = x.shape[0]
        features, _ = self.ema_net.features_and_logits(tf.concat([x, views[0]], axis=0))
        features = tf.stop_gradient(tf.cast(features, tf.float32))
        sums, counts = ood_score.class_sums(features[:batch], labels, self.nclass)
        if replicas.synced(self.replica_mode):
            sums, counts = replicas.all_sum(sums), replicas.all_sum(counts)
        prototypes = ood_score.prototype_update_from_sums(self.prototypes, sums, counts,
                                                          self.prototype_momentum)
        self.prototypes.assign(prototypes)
        return ood_score.prototype_score(features[batch:], prototypes)[0]

    def unlabeled_loss(self, logits_u, targets_u, scores=None):
        """Algorithm 1, lines 23-24: with gamma > 0, the mean L2 over the rows whose confidence
        (or, with --ood_score=prototype, whose image's score) is above the per-batch
        gamma-percentile (spec §6.7); --gamma=auto reads gamma from its variable (0 until the
        estimate is trusted)."""
        gamma = self.gamma if self.gamma_state is None else tf.convert_to_tensor(self.gamma_state.gamma)
        if self.gamma_state is None and self.gamma <= 0:
            loss, _ = super().unlabeled_loss(logits_u, targets_u)
            return loss, {"monitors/mask_ratio": replicas.share(1.0),
                          "monitors/mask_threshold": replicas.share(0.0)}
        sq_err = ops.l2_consistency(targets_u, logits_u)
        # The percentile over the predictions of every replica (of this one: per_replica).
        if scores is None:      # the released ranking: each mixed prediction's confidence
            keep, threshold = replicas.percentile_mask(tf.nn.softmax(logits_u), gamma,
                                                       self.replica_mode)
        else:                   # one score per image: its rows in every view [view 0; view 1]
            keep, threshold = replicas.percentile_mask(scores[:, None], gamma, self.replica_mode)
            keep = tf.tile(keep, [self.nu])
        loss = replicas.masked_mean(tf.reduce_sum(sq_err, axis=-1), keep, self.replica_mode,
                                    scale=self.loss_nclass or self.nclass)   # masked_l2_mean's
        return loss, {"monitors/mask_ratio": replicas.mean(keep),
                      "monitors/mask_threshold": replicas.share(threshold)}


class GammaReport:
    """--gamma=auto in the trainer's reports: the EMA model's pooled features of one window of
    unlabeled images (one extra pass of --eval_batch images) go to the estimator, which sets
    gamma (realmix_tf/gamma_auto.py); returns the line the trainer prints."""

    def __init__(self, hook):
        self.hook = hook

    def load_history(self, step: int) -> None:
        self.hook.load_history(step)

    def report(self, trainer, step: int, kept: dict, accuracy: dict) -> str:
        c = trainer.config
        window = trainer.distribute(trainer.data.unlabeled_window(
            c.eval_batch, self.hook.window_index(step, c.report_nimg)))
        features = trainer.evaluator.outputs(window)["features"]
        record = self.hook.report(step, features, kept, accuracy)
        raw = "n/a" if record["ood_share_raw"] is None else f"{record['ood_share_raw']:.3f}"
        return (f"kimg {step / KIMG:<8g} gamma {record['gamma']:.3f}  OOD share estimate "
                f"{record['ood_share_estimate']:.3f} (raw {raw}, reference {record['reference']}"
                f"{', trusted' if record['trusted'] else ''})")


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("realmix")
