"""MixMatch (Berthelot et al., 2019) as the original (M:mixmatch.py), and the base of RealMix.

One step (`train_loss`; libml.train.algorithm.SSLModel.train_step does the rest), with B labeled images x and B
unlabeled images u in NU = 2 weak views (declared: `unlabeled`):
  1. guess labels of u: softmax of each view (raw weights, batch-statistics BN, no moving-
     statistics update, no gradient), averaged over the views and sharpened with T;
  2. MixUp of the 3B labeled + unlabeled examples with one shuffle of the same 3B
     (lambda ~ Beta(beta, beta), lambda = max(lambda, 1 - lambda));
  3. interleaved forward passes: only the chunk that mixes labeled and unlabeled rows (chunk 0)
     updates the BN moving statistics (spec §6.4);
  4. L = labeled_loss + w_match * ramp(step) * unlabeled_loss, with the two hooks
     labeled_loss = mean soft cross-entropy, unlabeled_loss = mean L2 (RealMix overrides both);
  5. Adam, decoupled weight decay of the kernels, EMA update (libml.train.algorithm.SSLModel.apply_update).

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

from libml.nn import ops
from libml.nn import replicas
from libml.train.config import KIMG, non_negative, positive, whole_kimg
from libml.data.pipeline import Unlabeled
from libml.train.algorithm import LOSS_NCLASS, SSLModel, hparam


class MixMatch(SSLModel):
    """MixMatch on a Wide ResNet. beta: MixUp Beta(beta, beta) parameter (the paper's alpha);
    w_match: lambda_U, ramped linearly over warmup_kimg; temperature: sharpening T;
    batched_passes: run the chunks of a pass as one call (same arithmetic); loss_nclass: the
    class count the unlabeled L2 divides by (0 = nclass; 10 on a 6-way mismatch head = the
    released scale, docs/fidelity.md). The seed also draws the per-step lambda and permutation
    (stateless functions of (seed, step)). Other arguments as SSLModel."""

    HPARAMS = dict(
        beta=hparam(0.75, "MixUp Beta(beta, beta) parameter (the paper's alpha).",
                    positive, float),
        w_match=hparam(75.0, "Unlabeled-loss weight lambda_U (ramped over --warmup_kimg).",
                       non_negative("use a weight >= 0 (the paper: 75)"), float),
        warmup_kimg=hparam(1024.0, "Linear ramp-up of w_match, in kimg (fractions allowed).",
                           non_negative("use a ramp length >= 0 kimg"), whole_kimg),
        temperature=hparam(0.5, check=positive, parse=float, flag=False),
        batched_passes=hparam(True, parse=bool, flag=False),
        loss_nclass=LOSS_NCLASS,
    )
    unlabeled = Unlabeled(views=("weak", "weak"))    # NU = 2 views of each unlabeled image

    @property
    def nu(self) -> int:
        return len(self.unlabeled.views)

    def hparams(self) -> dict:
        return dict(super().hparams(), beta=self.beta, w_match=self.w_match,
                    warmup_kimg=self.warmup_kimg, nu=self.nu, temperature=self.temperature,
                    **({"loss_nclass": self.loss_nclass} if self.loss_nclass else {}))

    # ----------------------------------------------------------------------------------------
    def draws(self, step, batch):
        """MixUp's lambda and permutation for the rows of the global batch (stateless in
        (seed, step)): every replica draws the same ones."""
        lam_seed, perm_seed = self.step_seeds(step)
        total = replicas.MixPlan(batch, self.nu, self.replica_mode).global_rows
        return dict(lam=ops.sample_mixup_lambda(total, self.beta, lam_seed),
                    index=ops.sample_permutation(total, perm_seed))

    def train_loss(self, labeled, unlabeled, step, draws):
        x, labels = labeled["image"], labeled["label"]
        plan = replicas.MixPlan(x.shape[0], self.nu, self.replica_mode)
        views = tf.unstack(unlabeled["image"], axis=1)                  # NU x [B, H, W, C]

        # 1. Label guessing (raw weights, batch statistics, moving stats untouched), and the
        #    unlabeled images' OOD scores where the algorithm ranks by one (RealMix).
        guess = tf.stop_gradient(
            ops.guess_label(self.forward(views, update_first=False), self.temperature))
        scores = self.unlabeled_scores(x, labels, views)

        # 2. MixUp over the concatenation of the labeled and all unlabeled views.
        inputs = tf.concat([x] + views, axis=0)
        targets = tf.concat([tf.one_hot(labels, self.nclass)] + [guess] * self.nu, axis=0)
        #    With several replicas, over the rows of every replica; this one keeps its part
        #    of each interleaved chunk (libml.nn.replicas.MixPlan).
        chunks, targets_x, targets_u = plan.mix(inputs, targets, draws["lam"], draws["index"])

        # 3. Interleaved passes; only chunk 0 updates the BN moving statistics.
        logits_x, logits_u = plan.restore(self.forward(chunks, update_first=True))

        # 4. Losses: the two hooks, the unlabeled one weighted by the ramped w_match.
        loss_xe, labeled_scalars = self.labeled_loss(logits_x, targets_x, step)
        loss_l2u, unlabeled_scalars = self.unlabeled_loss(logits_u, targets_u, scores)
        w_match = ops.unlabeled_weight(step, self.w_match, round(self.warmup_kimg * KIMG))
        loss = loss_xe + w_match * loss_l2u

        confidence = replicas.confidence_stats(tf.nn.softmax(logits_u), self.replica_mode)
        return loss, {   # every value is this replica's share (libml.nn.replicas.totals sums them)
            "losses/xe": loss_xe,
            "losses/l2u": loss_l2u,
            "losses/overall": loss,
            "monitors/w_match": replicas.share(w_match),
            **labeled_scalars,
            **unlabeled_scalars,
            **{tag: replicas.share(value) for tag, value in confidence.items()},
        }

    def forward(self, chunks, update_first):
        """Training-mode logits (float32) of each chunk, each normalised with its own batch
        statistics; the moving statistics follow chunk 0 if update_first, else stay put."""
        if not self.batched_passes:
            return [self.net(c, training=True, update_bn_stats=update_first and i == 0)
                    for i, c in enumerate(chunks)]
        logits = self.net(tf.concat(chunks, axis=0), training=True,
                          update_bn_stats=update_first, bn_groups=len(chunks))
        return tf.split(logits, len(chunks))

    # -- the hooks: (loss, {tag: monitor}), both as this replica's share (libml/nn/replicas.py:
    #    the shares of all replicas sum to the value; one device: the value itself) ----------
    def labeled_loss(self, logits_x, targets_x, step):
        """Mean soft cross-entropy of the mixed labeled part."""
        del step
        return replicas.mean(ops.soft_cross_entropy(targets_x, logits_x)), {}

    def unlabeled_scores(self, x, labels, views):
        """Per unlabeled image [B], how in-distribution it looks (None: no score; RealMix's
        --ood_score=prototype has one)."""
        del x, labels, views
        return None

    def unlabeled_loss(self, logits_u, targets_u, scores=None):
        """Mean L2 between the mixed guesses and the predictions (over loss_nclass classes)."""
        del scores
        loss = replicas.mean(ops.l2_consistency(targets_u, logits_u))
        if self.loss_nclass:
            loss = loss * (self.nclass / self.loss_nclass)
        return loss, {}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("mixmatch")
