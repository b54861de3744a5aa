"""Gordo et al.'s landmark retrieval recipe (*End-to-end learning of deep visual representations
for image retrieval*, IJCV 2017), adapted to this code: ResNet-101 from ImageNet weights,
R-MAC pooling (3 scales), trained with the triplet loss alone on L2-normalised descriptors,
then PCA whitening learned on the training images.

Data: one folder per landmark, `data/landmarks/{train,query,gallery}/<landmark>/<images>`
(`data.name='folder'`). Images are resized to 384x384 (Gordo used up to 800 px on the long
side; raise data.height/width with the memory to do it).

Differences kept from the paper: the descriptor of the triplet loss is the pooled R-MAC vector
(before the BNNeck), compared by cosine distance; Gordo's margin 0.1 on squared distances of
unit vectors is 0.05 in cosine distance (|a - b|^2 = 2 (1 - cos)). Batch-hard mining over
P x M batches replaces his offline hard-triplet mining. The classification, center and
centroid losses are off; the BNNeck stays, as the retrieval embedding. Whitening after
training:

    python -m ctl_jax.train --config=configs/rmac_landmarks.py
    python -m ctl_jax.embed --workdir=runs/rmac_landmarks --images=data/landmarks/train \\
        --output=runs/rmac_landmarks/train.npz
    python -m ctl_jax.whiten --embeddings=runs/rmac_landmarks/train.npz \\
        --output=runs/rmac_landmarks/whitening.npz
    python -m ctl_jax.evaluate --workdir=runs/rmac_landmarks \\
        --whitening=runs/rmac_landmarks/whitening.npz
"""

from ctl_jax.configs import base_config


def get_config():
    config = base_config(__file__)
    config.name = "rmac_landmarks"
    config.data.name = "folder"
    config.data.root = "data/landmarks"
    config.data.height, config.data.width = 384, 384
    config.data.num_identities, config.data.num_instances = 8, 4
    config.data.worker_count = 2
    config.data.eval_batch_size = 32
    config.model.arch = "resnet101"
    config.model.last_stride = 2
    config.model.init_checkpoint = "checkpoints/resnet101_imagenet"
    config.model.pooling = "rmac"
    config.model.rmac_levels = 3
    config.loss.metric = "triplet"
    config.loss.distance = "cosine"
    config.loss.margin = 0.05
    config.loss.triplet_weight = 1.0
    config.loss.ce_weight = 0.0
    config.loss.center_weight = 0.0
    config.loss.centroid_weight = 0.0
    config.solver.base_lr = 1e-5
    config.solver.warmup_epochs = 0
    config.solver.milestones = ()
    config.solver.num_epochs = 30
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 1000
    config.train.eval_every_epochs = 10
    config.train.monitor = "instance/mAP"
    config.eval.modes = ("instance", "centroid")
    return config
