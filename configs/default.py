"""Default config: the synthetic re-ID CPU demo (small ResNet, small images, minutes on 2 cores).

Every other config starts from this one and changes a few visible lines. Field groups:
`data` (dataset and input pipeline), `model`, `loss`, `solver` (optimiser, schedule, epochs),
`train` (logging, checkpoints, periodic evaluation), `eval` (evaluation modes); top-level
`name`, `seed` and `cpu_fast_path`.

Variants (`--config=configs/default.py:<variant>`), each the demo with one change, to compare
retrieval heads on the synthetic set: `gem`, `max`, `rmac` (pooling), `cosface`, `arcface`
(classifier), `contrastive` (instead of the batch-hard triplet loss), `vit` (a small ViT,
`vit_mini8`: 8x8 patches, 4 blocks of width 192, instead of the ResNet-18; learning rate
1e-3), `osnet` (OSNet x1.0 instead of the ResNet-18; AMSGrad, learning rate 1.5e-3).
"""

import ml_collections
from ml_collections import config_dict

from ctl_jax.errors import ConfigError

VARIANTS = ("gem", "max", "rmac", "cosface", "arcface", "contrastive", "vit", "osnet")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "default"
    config.seed = 0
    # How the model runs, not what it is (checkpoints do not depend on it): "auto" uses the
    # CPU layers of ctl_jax/cpu/ (same parameters and results, faster on XLA's CPU backend)
    # on the CPU backend in float32 and the plain Flax layers elsewhere; "on" / "off" force.
    config.cpu_fast_path = "auto"
    # CPU layers only: their backward passes recompute elementwise intermediates (Winograd
    # transforms, patches, the batch norm's xhat) instead of keeping them: half the step's
    # memory at ResNet-50, up to ~8% slower at small sizes (docs/performance.md). False keeps.
    config.cpu_recompute = True
    # CPU layers only: stride-1 3x3 convolutions on maps of at least 8x8 by Winograd
    # F(4x4, 3x3) (4 = default; fewer multiplies and less memory traffic, relative rounding
    # ~1e-5 instead of ~1e-6) or only F(2x2, 3x3) (2; docs/performance.md).
    config.cpu_winograd_tile = 4

    config.data = data = ml_collections.ConfigDict()
    # One of: synthetic, market1501, dukemtmc, street2shop, deepfashion, folder, msmt17,
    # cuhk03_detected, cuhk03_labeled, veri776, roxford5k, rparis6k, holidays, gldv2, sop,
    # inshop (the last ten read `root` as their unpacked download; see docs/datasets.md).
    data.name = "synthetic"
    # Folder holding the dataset, relative to the folder the command runs from (for
    # market1501/dukemtmc: the folder *containing* market1501/ or DukeMTMC-reID/; for
    # synthetic: the dataset folder itself).
    data.root = "data/synthetic_reid"
    # "folder": read images straight from the dataset folders; "tfds": read a prepared
    # TensorFlow Datasets build from `tfds_data_dir`.
    data.source = "folder"
    data.tfds_data_dir = ""
    # COCO-style JSON files of the fashion datasets (relative to root when not absolute).
    data.train_json = ""
    data.query_json = ""
    data.gallery_json = ""
    # Evaluate on another dataset than the one trained on (e.g. train gldv2, evaluate
    # roxford5k); "" evaluates on `name`'s own query/gallery. `eval_root` defaults to `root`.
    data.eval_name = ""
    data.eval_root = ""
    # Training identities with fewer than `num_instances` images: "pad" keeps them (their
    # P x M groups are padded with masked slots), "drop" removes them (folder source only).
    data.small_identities = "pad"
    # MSMT17: add list_val.txt to the training images (the published 32,621-image set).
    data.use_val = True
    # Revisited Oxford/Paris: the revisitop1m folder (revisitop1m.txt, jpg/) as +1M
    # distractors added to the gallery; "" for none.
    data.distractors = ""
    # INRIA Holidays: "" (images as stored), "exif" (turned upright by their EXIF tag), or a
    # file of '<image name> <degrees clockwise>' lines naming the images to turn.
    data.rotation_fix = ""
    data.height = 64
    data.width = 32
    data.num_identities = 8  # P
    data.num_instances = 4  # M
    data.flip_prob = 0.5
    data.pad = 10
    data.erasing_prob = 0.5
    # "original": erase with the constants (0.485, 0.456, 0.406) after normalisation, as
    # the original code does; "zero": erase with the dataset mean (0 after normalisation).
    data.erasing_fill = "original"
    data.worker_count = 0
    data.prefetch_buffer = 2
    data.skip_unreadable = True
    data.eval_batch_size = 128

    config.model = model = ml_collections.ConfigDict()
    model.arch = "resnet18"
    model.last_stride = 1
    # None: automatic (no ReLU after the stem BN for plain ResNets, as the original;
    # ReLU for IBN-a). Set True/False to force.
    model.stem_relu = config_dict.placeholder(bool)
    model.dtype = "float32"  # "bfloat16" on accelerators: bf16 compute, f32 parameters.
    # A ctl_jax checkpoint (e.g. converted ImageNet weights) to initialise from; "" = random.
    model.init_checkpoint = ""
    # Global pooling of the last feature map (ctl_jax/models/pooling.py): "avg" (the CTL
    # paper), "max" (MAC), "gem" (generalised mean, exponent gem_p, trained when
    # gem_learnable) or "rmac" (regional max over rmac_levels scales, Tolias et al.).
    model.pooling = "avg"
    model.gem_p = 3.0
    model.gem_learnable = False
    model.rmac_levels = 3
    # ViTs only (model.arch vit_*; ctl_jax/models/vit.py): the patch embedding's stride
    # (None = the patch size, no overlap; 12 with 16x16 patches is TransReID's overlapping
    # embedding, a 21x10 grid at 256x128) and the stochastic depth rate of the last block.
    # A ViT's feature is its class token: `pooling` must stay "avg" (unused).
    model.vit_stride = config_dict.placeholder(int)
    model.drop_path = 0.0

    config.loss = loss = ml_collections.ConfigDict()
    loss.triplet_weight = 1.0  # weight of the metric loss (`metric`: triplet or contrastive)
    loss.ce_weight = 1.0
    loss.center_weight = 5e-4
    loss.centroid_weight = 1.0  # 0 turns the centroid triplet loss off (the BNNeck baseline).
    loss.margin = 0.5
    loss.soft_margin = False
    loss.distance = "euclidean"  # or "cosine"
    loss.label_smoothing = 0.1
    loss.center_lr = 0.5
    # "triplet" (batch-hard) or "contrastive" (all pairs, Hadsell et al.); both use `margin`
    # (the contrastive loss has no soft margin) and `distance`.
    loss.metric = "triplet"
    # Identity classifier on the BNNeck output: "softmax" (linear), or "cosface" / "arcface"
    # (normalised features and class weights, margin on the target class, logits scaled by
    # `scale`; ctl_jax/margin_losses.py). classifier_margin None = the paper's value
    # (CosFace 0.35, ArcFace 0.5); easy_margin: ArcFace's margin only where cos > 0.
    loss.classifier = "softmax"
    loss.scale = 30.0
    loss.classifier_margin = config_dict.placeholder(float)
    loss.easy_margin = False

    config.solver = solver = ml_collections.ConfigDict()
    # "adam" (with L2 decay, as the original), "amsgrad" (Adam's AMSGrad variant, L2 decay)
    # or "sgd" (with `momentum`); schedule "step"
    # (warm-up, then x gamma at each milestone) or "cosine" (warm-up, then a cosine from
    # base_lr to min_lr_factor x base_lr over num_epochs); ctl_jax/training/optimizer.py.
    solver.optimizer = "adam"
    solver.momentum = 0.9
    solver.schedule = "step"
    solver.min_lr_factor = 0.0
    solver.base_lr = 3.5e-4
    solver.weight_decay = 5e-4
    solver.beta1 = 0.9
    solver.beta2 = 0.999
    solver.eps = 1e-8
    solver.warmup_epochs = 3
    solver.milestones = (16, 22)
    solver.gamma = 0.1
    solver.num_epochs = 25

    config.train = train = ml_collections.ConfigDict()
    train.log_every_steps = 10
    train.checkpoint_every_steps = 200  # plus one at the end of every epoch
    train.keep_checkpoints = 2  # the latest N; the best by `monitor` is kept as well
    train.eval_every_epochs = 5
    # The metric whose best value marks the kept best checkpoint. "auto": the mAP of
    # `centroid_camera` when the data has camera ids, else of `centroid` (Recall@1, medium
    # mAP ... under other protocols; ctl_jax.evaluator.resolve_evaluation).
    train.monitor = "auto"

    config.eval = evaluation = ml_collections.ConfigDict()
    # "" = the dataset's published protocol; else market, recall_at_k, revisited, holidays.
    evaluation.protocol = ""
    # ("auto",): every mode (instance, centroid, centroid_camera, centroid_camera_reference)
    # when the data has camera ids (Market-style names, MSMT17 lists), else instance and
    # centroid (folder, COCO-style data: the camera modes would compare made-up cameras);
    # the protocol's modes under another protocol. Name modes to use exactly those, e.g.
    # --config.eval.modes="('instance','centroid_camera')"; () evaluates nothing.
    evaluation.modes = ("auto",)
    # Flip test: embed each image and its horizontal mirror and average (twice the cost).
    evaluation.flip = False
    return apply_variant(config, variant)


def apply_variant(config: ml_collections.ConfigDict, variant: str | None):
    """The demo with one retrieval head changed (see the module docstring)."""
    if variant is None:
        return config
    if variant not in VARIANTS:
        raise ConfigError(f"config variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    config.name = f"{config.name}_{variant}"
    if variant in ("gem", "max", "rmac"):
        config.model.pooling = variant
        config.model.gem_learnable = variant == "gem"
    elif variant in ("cosface", "arcface"):
        config.loss.classifier = variant
    elif variant == "vit":
        config.model.arch = "vit_mini8"
        # A ViT from scratch learns faster here with a larger rate (10 epochs on the demo
        # set: centroid_camera mAP 9.1 at 1e-3, 5.5 at the ResNet's 3.5e-4).
        config.solver.base_lr = 1e-3
    elif variant == "osnet":
        config.model.arch = "osnet_x1_0"
        # torchreid's optimiser for OSNet (10 epochs on the demo set: centroid_camera mAP
        # 22.8 with it, 6.6 with the demo's Adam 3.5e-4).
        config.solver.optimizer = "amsgrad"
        config.solver.base_lr = 1.5e-3
    else:
        config.loss.metric = variant
    return config
