"""'auto' evaluation modes and monitor, resolved against the data's cameras and protocol;
the shipped re-ID configs keep the modes and monitor they always had."""

import pytest

from ctl_jax.configs import load_config
from ctl_jax.data.records import RetrievalDataset, Split
from ctl_jax.errors import ConfigError
from ctl_jax.evaluator import resolve_evaluation

ALL_MODES = ("instance", "centroid", "centroid_camera", "centroid_camera_reference")
SPLIT = Split.from_lists(["a.jpg", "b.jpg"], [1, 2], [0, 1])


def dataset(has_cameras=True, **kwargs):
    return RetrievalDataset("d", SPLIT, SPLIT, SPLIT, has_cameras=has_cameras, **kwargs)


@pytest.mark.parametrize(
    "config_file, modes",
    [
        ("default", ALL_MODES),
        ("baseline_default", ALL_MODES),
        ("market1501", ("instance", "centroid_camera", "centroid_camera_reference")),
        ("dukemtmc", ("instance", "centroid_camera", "centroid_camera_reference")),
        ("msmt17", ("instance", "centroid_camera", "centroid_camera_reference")),
    ],
)
def test_shipped_reid_configs_keep_their_modes_and_monitor(config_file, modes):
    config = load_config(f"configs/{config_file}.py")
    resolved, line = resolve_evaluation(config, dataset(has_cameras=True))
    assert tuple(resolved.eval.modes) == modes
    assert resolved.train.monitor == "centroid_camera/mAP"
    assert line.startswith(f"evaluation modes: {', '.join(modes)} (")
    assert line.endswith("; monitor: centroid_camera/mAP (auto)")


def test_data_without_cameras_gets_the_camera_free_modes_and_monitor():
    config = load_config("configs/default.py")
    resolved, line = resolve_evaluation(config, dataset(has_cameras=False))
    assert tuple(resolved.eval.modes) == ("instance", "centroid")
    assert resolved.train.monitor == "centroid/mAP"
    assert line == (
        "evaluation modes: instance, centroid (auto: the data has no camera ids); "
        "monitor: centroid/mAP (auto)"
    )
    # The config itself is left as written.
    assert tuple(config.eval.modes) == ("auto",) and config.train.monitor == "auto"
    _, without_monitor = resolve_evaluation(config, dataset(False), describe_monitor=False)
    assert (
        without_monitor == "evaluation modes: instance, centroid (auto: the data has no camera ids)"
    )


def test_a_config_can_still_ask_for_the_camera_modes_and_a_monitor():
    config = load_config("configs/default.py")
    config.eval.modes = ("instance", "centroid_camera_reference")
    resolved, line = resolve_evaluation(config, dataset(has_cameras=False))
    assert tuple(resolved.eval.modes) == ("instance", "centroid_camera_reference")
    assert resolved.train.monitor == "instance/mAP"  # auto: the first camera-free mode
    assert "(eval.modes; the data has no camera ids)" in line
    config.train.monitor = "centroid_camera_reference/mAP"
    resolved, line = resolve_evaluation(config, dataset(has_cameras=False))
    assert resolved.train.monitor == "centroid_camera_reference/mAP"
    assert line.endswith("monitor: centroid_camera_reference/mAP (train.monitor)")
    config.eval.modes = ()
    resolved, line = resolve_evaluation(config, dataset())
    assert tuple(resolved.eval.modes) == () and line.startswith("evaluation modes: none")
    config.eval.modes = ("auto", "instance")
    with pytest.raises(ConfigError, match="'auto' stands alone"):
        resolve_evaluation(config, dataset())


def test_auto_under_other_protocols():
    config = load_config("configs/default.py")
    sop = dataset(False, protocols=("recall_at_k",), ground_truth={"recall_ks": (1, 10)})
    resolved, _ = resolve_evaluation(config, sop)
    assert tuple(resolved.eval.modes) == ("instance", "centroid")
    assert resolved.train.monitor == "instance/recall@1"
    holidays = dataset(False, protocols=("holidays", "recall_at_k"))
    resolved, line = resolve_evaluation(config, holidays)
    assert tuple(resolved.eval.modes) == ("instance",)
    assert resolved.train.monitor == "instance/mAP"
    assert "(auto: protocol holidays)" in line
    # A training source without query/gallery: left for check_trainable to report.
    source = dataset(False, protocols=())
    assert resolve_evaluation(config, source) == (config, "")
