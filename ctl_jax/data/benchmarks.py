"""The benchmark datasets beyond Market-1501, DukeMTMC-reID and the fashion sets: their
readers, by name, for `catalog.open_dataset`, and the `data.*` config keys each one reads.

| name | reader | config keys |
| --- | --- | --- |
| msmt17 | `readers_reid.read_msmt17` | `data.use_val` |
| cuhk03_detected, cuhk03_labeled | `readers_reid.read_cuhk03_np` | |
| veri776 | `readers_reid.read_veri776` | |
| roxford5k, rparis6k | `landmarks.read_revisited` | `data.distractors` |
| holidays | `landmarks.read_holidays` | `data.rotation_fix` |
| gldv2 | `landmarks.read_gldv2` | |
| sop, inshop | `products.read_sop`, `products.read_inshop` | |
"""

from __future__ import annotations

import functools

from ctl_jax.data import landmarks, products, readers_reid

READERS = {
    "msmt17": readers_reid.read_msmt17,
    "cuhk03_detected": functools.partial(readers_reid.read_cuhk03_np, variant="detected"),
    "cuhk03_labeled": functools.partial(readers_reid.read_cuhk03_np, variant="labeled"),
    "veri776": readers_reid.read_veri776,
    "roxford5k": functools.partial(landmarks.read_revisited, name="roxford5k"),
    "rparis6k": functools.partial(landmarks.read_revisited, name="rparis6k"),
    "holidays": landmarks.read_holidays,
    "gldv2": landmarks.read_gldv2,
    "sop": products.read_sop,
    "inshop": products.read_inshop,
}

# Reader keyword argument <- `data.<key>` of the config, per dataset.
_CONFIG_OPTIONS = {
    "msmt17": {"use_val": "use_val"},
    "roxford5k": {"distractors": "distractors"},
    "rparis6k": {"distractors": "distractors"},
    "holidays": {"rotation_fix": "rotation_fix"},
}


def reader_options(name: str, data_cfg) -> dict:
    """Keyword arguments for the reader of `name` from a config's `data` group (keys a
    config saved before they existed lacks are left at the reader's default)."""
    options = {}
    for argument, key in _CONFIG_OPTIONS.get(name, {}).items():
        if key in data_cfg:
            options[argument] = data_cfg[key]
    return options
