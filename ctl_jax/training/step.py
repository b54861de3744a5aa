"""The pure training step: forward, the four losses (docs/method.md, 'Losses'), both
optimisers."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ctl_jax import losses, margin_losses
from ctl_jax.data import on_device
from ctl_jax.errors import ConfigError
from ctl_jax.models import pooling
from ctl_jax.training.optimizer import learning_rate
from ctl_jax.training.state import TrainState

Batch = dict[str, jax.Array]


def compute_losses(outputs: dict, batch: Batch, centers: jax.Array, loss_cfg, num_instances: int):
    """Weighted total loss and its parts for one P x M batch.

    Args:
      outputs: model outputs: `features` (N, D), `logits` (N, K).
      batch: `labels` (N,) int32, `valid` (N,) bool.
      centers: (K, D) center-loss centers.
      loss_cfg: the config's `loss` group.
      num_instances: M.

    Returns:
      (total, metrics): the scalar to differentiate and a flat dict of scalar metrics.

    The center loss enters twice with a stop-gradient each: weighted, for the gradient that
    reaches the network; and as `x - stop_gradient(x)` (value 0) for the centers, so that their
    gradient is the *unweighted* one, which the original obtains by rescaling the centers'
    gradient by 1 / center_weight before their SGD step.
    """
    features, logits = outputs["features"], outputs["logits"]
    labels, valid = batch["labels"], batch["valid"]
    margin = None if loss_cfg.soft_margin else loss_cfg.margin
    metrics = {}

    if loss_cfg.get("metric", "triplet") == "contrastive":
        metric_loss, aux = losses.contrastive_loss(
            features, labels, valid, margin=loss_cfg.margin, distance=loss_cfg.distance
        )
        metrics.update(
            contrastive_loss=metric_loss, dist_pos=aux["dist_pos"], dist_neg=aux["dist_neg"]
        )
    else:
        metric_loss, aux = losses.batch_hard_triplet_loss(
            features, labels, valid, margin=margin, distance=loss_cfg.distance
        )
        metrics.update(triplet_loss=metric_loss, dist_ap=aux["dist_ap"], dist_an=aux["dist_an"])

    classifier = loss_cfg.get("classifier", "softmax")
    if classifier != "softmax":  # the model's logits are cosines; argmax is the same
        logits_for_ce = margin_losses.margin_logits(
            logits,
            labels,
            classifier,
            loss_cfg.scale,
            loss_cfg.classifier_margin,
            loss_cfg.easy_margin,
        )
    else:
        logits_for_ce = logits
    ce = losses.cross_entropy_label_smooth(
        logits_for_ce, labels, valid, epsilon=loss_cfg.label_smoothing
    )
    metrics["ce_loss"] = ce
    metrics["accuracy"] = jnp.sum((jnp.argmax(logits, -1) == labels) * valid) / jnp.maximum(
        jnp.sum(valid), 1
    )

    center_for_net = losses.center_loss(features, labels, jax.lax.stop_gradient(centers), valid)
    center_for_centers = losses.center_loss(jax.lax.stop_gradient(features), labels, centers, valid)
    metrics["center_loss"] = center_for_net

    total = (
        loss_cfg.triplet_weight * metric_loss
        + loss_cfg.ce_weight * ce
        + loss_cfg.center_weight * center_for_net
        + (center_for_centers - jax.lax.stop_gradient(center_for_centers))
    )
    if loss_cfg.centroid_weight:
        ctl, aux = losses.centroid_triplet_loss(
            features, labels, valid, num_instances, margin=margin, distance=loss_cfg.distance
        )
        metrics.update(centroid_loss=ctl, centroid_norm=aux["centroid_norm"])
        total = total + loss_cfg.centroid_weight * ctl
    metrics["total_loss"] = total
    return total, metrics


METRICS = ("triplet", "contrastive")


def check_head_config(config) -> None:
    """One-line ConfigErrors for bad pooling, metric-loss or classifier settings of a full
    config (the training loop calls it before writing anything)."""
    model = config.model
    pooling.check_pooling(
        model.get("pooling", "avg"), model.get("gem_p", 3.0), model.get("rmac_levels", 3)
    )
    check_loss_config(config.loss)


def check_loss_config(loss_cfg) -> None:
    """One-line ConfigErrors for a bad metric loss or classifier head setting."""
    metric = loss_cfg.get("metric", "triplet")
    if metric not in METRICS:
        raise ConfigError(f"loss.metric={metric!r} is not one of {', '.join(METRICS)}")
    if metric == "contrastive" and loss_cfg.soft_margin:
        raise ConfigError("loss.soft_margin=True: the contrastive loss has no soft margin")
    classifier = loss_cfg.get("classifier", "softmax")
    margin_losses.check_classifier(
        classifier, loss_cfg.get("scale", 30.0), loss_cfg.get("classifier_margin", None)
    )


def make_train_step(
    model, tx: optax.GradientTransformation, config
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Returns the pure step `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    `batch` holds `images` (N, H, W, 3), `labels` (N,) int32, `valid` (N,) bool; N is
    the global batch P * M. Images are uint8 with `erase` (N, 4) int32 as the training
    pipeline yields them (normalised and erased here, `ctl_jax.data.on_device`), or float32
    already normalised. Under `jax.jit` with the batch sharded over a device mesh, batch
    norm statistics, hard-example mining and the centroids all see the global batch.
    """
    loss_cfg, solver_cfg = config.loss, config.solver
    num_instances = config.data.num_instances
    erasing_fill = config.data.get("erasing_fill", "original")
    check_loss_config(loss_cfg)
    if getattr(model, "classifier", "softmax") != loss_cfg.get("classifier", "softmax"):
        raise ValueError(
            f"loss.classifier={loss_cfg.classifier!r} needs the model built with that head "
            f"(ctl_jax.build.build_model(config, ...) builds it)"
        )

    seed = int(config.get("seed", 0))

    def train_step(state: TrainState, batch: Batch):
        images = on_device.train_images(batch, erasing_fill)
        # The random stream of a ViT's stochastic depth: a function of the seed and the
        # step, so a resumed run draws what the uninterrupted one would have (a ResNet
        # draws nothing from it).
        dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params, centers):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                valid=batch["valid"],
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            total, metrics = compute_losses(outputs, batch, centers, loss_cfg, num_instances)
            return total, (metrics, updates["batch_stats"])

        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (_, (metrics, batch_stats)), (grads, center_grads) = grad_fn(state.params, state.centers)

        lr = learning_rate(state.epoch, solver_cfg)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
        centers = state.centers - loss_cfg.center_lr * center_grads

        metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=lr)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            centers=centers,
        )
        return new_state, metrics

    return train_step
