"""torchreid OSNet state dicts: recognising them and inferring the OSNet they hold.

Names map onto `ctl_jax.models.osnet` mechanically (`mapping.torch_key`: `conv2.0.conv2b.1`
<-> `conv2_0/conv2b_1`). The widths are read from the stem and conv5, the IBN variant from
the instance norm of the first stage. torchreid's `fc` embedding layer and `classifier`
come after the backbone feature and are left unused; a converted OSNet gets an identity
BNNeck and a fresh classifier.
"""

from __future__ import annotations

import numpy as np

from ctl_jax.models.osnet import OSNET_SPECS
from ctl_jax.weights.torch_pickle import TorchFileError

LAYOUT = "torchreid_osnet"


def is_osnet_layout(tensors: dict[str, np.ndarray]) -> bool:
    """Whether the keys are a torchreid OSNet's (the stem's conv and an omni-scale block)."""
    return "conv1.conv.weight" in tensors and "conv2.0.conv2a.conv1.weight" in tensors


def infer_architecture(tensors: dict[str, np.ndarray], source: str, architecture_cls):
    """The `OSNET_SPECS` entry of a torchreid OSNet state dict, as an `architecture_cls`
    (`mapping.Architecture`) with `width` set to the feature width.

    Raises:
      TorchFileError: a width combination no `OSNET_SPECS` entry has.
    """
    try:
        channels = (
            int(tensors["conv1.conv.weight"].shape[0]),
            int(tensors["conv2.0.conv3.conv.weight"].shape[0]),
            int(tensors["conv3.0.conv3.conv.weight"].shape[0]),
            int(tensors["conv5.conv.weight"].shape[0]),
        )
    except KeyError as e:
        raise TorchFileError(f"{source}: an OSNet without {e.args[0]}") from None
    ibn = "conv2.0.IN.weight" in tensors
    for arch, spec in OSNET_SPECS.items():
        if spec.channels == channels and spec.ibn == ibn:
            return architecture_cls(arch, (), False, ibn, width=channels[-1])
    known = ", ".join(f"{a} {s.channels}" for a, s in OSNET_SPECS.items())
    raise TorchFileError(
        f"{source}: an OSNet{' IBN' if ibn else ''} with channels {channels}, which ctl_jax "
        f"does not build (known: {known})"
    )
