"""The tiny synthetic re-ID set the training, CLI and multi-process tests share."""

from ctl_jax.data import synthetic


def make_tiny_reid(root, seed=3, num_train_ids=8, num_test_ids=4, height=32, width=16):
    """Writes a Market-style dataset of a few hundred 32x16 images under `root` (~1 s)."""
    synthetic.generate(
        root,
        seed=seed,
        num_train_ids=num_train_ids,
        num_test_ids=num_test_ids,
        num_distractors=2,
        num_background=4,
        num_junk=2,
        num_cameras=3,
        height=height,
        width=width,
    )
    return root
