"""Config keys: every numeric key of every shipped config has a declared range, the shipped
configs pass, a value just outside a range is refused naming the key; the command line's
config errors are one line and `--config_help` lists the keys of the chosen config."""

import math

import ml_collections
import pytest
from test_cli import REPO, assert_one_line_error, run

from ctl_jax import config_schema
from ctl_jax.configs import load_config, load_module
from ctl_jax.errors import ConfigError
from ctl_jax.training import loop

CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def _shipped():
    """(name, config) of every shipped config and each of its `:variant` forms."""
    for path in CONFIG_FILES:
        yield path.name, load_config(str(path))
        for variant in getattr(load_module(path), "VARIANTS", ()):
            yield f"{path.name}:{variant}", load_config(f"{path}:{variant}")


SHIPPED = list(_shipped())


def _leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_the_variant_lists_are_what_the_files_accept():
    # Every config file whose get_config takes a variant declares the ones it accepts.
    names = [name for name, _ in SHIPPED]
    for expected in ("default.py:gem", "cuhk03.py:labeled", "street2shop.py:small"):
        assert expected in names
    assert "deepfashion.py:large" in names


@pytest.mark.parametrize("name,config", SHIPPED, ids=[n for n, _ in SHIPPED])
def test_every_shipped_config_passes_and_every_key_is_described(name, config):
    config_schema.check(config)
    for key, value in _leaves(config):
        assert key in config_schema.SCHEMA, f"{name}: {key} has no meaning in config_schema"
        numeric = _is_number(value) or (
            isinstance(value, tuple) and value and all(_is_number(v) for v in value)
        )
        if numeric:
            assert config_schema.SCHEMA[key].numeric, f"{name}: {key}={value!r} has no range"


def _outside(field: config_schema.Field) -> list:
    """Values just outside the field's range, on each bounded side."""
    values = []
    if field.choices is not None:
        values += [min(field.choices) - 1, max(field.choices) + 1]
    if field.low is not None:
        if field.integer:
            values.append(int(field.low) - (0 if field.low_open else 1))
        else:
            values.append(field.low if field.low_open else math.nextafter(field.low, -math.inf))
    if field.high is not None:
        if field.integer:
            values.append(int(field.high) + (0 if field.high_open else 1))
        else:
            values.append(field.high if field.high_open else math.nextafter(field.high, math.inf))
    return values


NUMERIC = sorted(k for k, f in config_schema.SCHEMA.items() if f.numeric)


@pytest.mark.parametrize("key", NUMERIC)
def test_a_value_just_outside_the_range_is_refused_naming_the_key(key):
    field = config_schema.SCHEMA[key]
    values = _outside(field)
    assert values, key
    for value in values:
        config = load_config(str(REPO / "configs" / "default.py"))
        group, _, leaf = key.rpartition(".")
        node = config[group] if group else config
        node[leaf] = (value,) if field.each else value
        with pytest.raises(ConfigError) as error:
            config_schema.check(config)
        message = str(error.value)
        assert message.startswith(f"config {key}=") and "\n" not in message, message
        assert field.range_text() in message


def test_ranges_read_as_written():
    schema = config_schema.SCHEMA
    assert schema["solver.base_lr"].range_text() == "> 0"
    assert schema["solver.num_epochs"].range_text() == "an integer >= 1"
    assert schema["data.flip_prob"].range_text() == "in [0, 1]"
    assert schema["loss.label_smoothing"].range_text() == "in [0, 1)"
    assert schema["model.last_stride"].range_text() == "one of 1, 2"
    for key, good, bad in [
        ("solver.base_lr", 1e-9, -1.0),
        ("solver.num_epochs", 1, 0),
        ("data.num_identities", 1, -3),
        ("data.height", 1, 0),
        ("data.erasing_prob", 1.0, 1.5),
        ("solver.milestones", (1, 5), (0, 5)),
        ("loss.classifier_margin", None, -0.1),
        ("solver.base_lr", 1.0, math.nan),
    ]:
        assert schema[key].accepts(good) and not schema[key].accepts(bad), key


def test_training_refuses_an_out_of_range_value_before_writing(tmp_path):
    config = load_config(str(REPO / "configs" / "default.py"))
    config.solver.num_epochs = 0
    config.data.root = str(tmp_path / "no_data")  # read after the check: never reached
    with pytest.raises(ConfigError, match=r"^config solver\.num_epochs=0: expected an integer"):
        loop.train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("--config.solver.base_lr=-1", "config solver.base_lr=-1.0: expected > 0"),
        ("--config.data.height=0", "config data.height=0: expected an integer >= 1"),
    ],
)
def test_train_refuses_out_of_range_overrides_in_one_line(tmp_path, override, fragment):
    result = run("ctl_jax.train", override, f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "w").exists()


def test_config_file_errors_are_one_line(tmp_path):
    not_a_config = tmp_path / "x.py"
    not_a_config.write_text("def get_config():\n    return {'a': 1}\n")
    result = run("ctl_jax.train", f"--config={not_a_config}", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(
        result, f"{not_a_config}: get_config() returned dict, expected an ml_collections.ConfigDict"
    )
    # The README's format of an unknown key, with an explicit --config too.
    result = run(
        "ctl_jax.train",
        "--config=configs/market1501.py",
        "--config.solver.bse_lr=1",
        f"--workdir={tmp_path / 'w'}",
    )
    assert_one_line_error(
        result, "unknown config key in an override: bse_lr (did you mean base_lr?)"
    )
    result = run("ctl_jax.train", "--config=configs/cuhk03.py:foo", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, "configs/cuhk03.py:foo: config variant must be")
    assert not (tmp_path / "w").exists()


def test_config_help_lists_the_keys_of_the_chosen_config():
    result = run("ctl_jax.train", "--config=configs/cuhk03.py:labeled", "--config_help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    config = load_config(str(REPO / "configs" / "cuhk03.py:labeled"))
    for key, value in _leaves(config):
        row = [line for line in lines if line.startswith(f"  {key}={value!r} ")]
        assert len(row) == 1, key
        assert config_schema.SCHEMA[key].meaning in row[0]
    assert "data.name='cuhk03_labeled'" in result.stdout  # the variant's values
    assert "solver.base_lr=0.00035" in result.stdout and "; > 0" in result.stdout
    usage = run("ctl_jax.train", "--help")
    assert "--config:" in usage.stdout and "--config_help" in usage.stdout


def test_schema_lists_no_key_that_no_config_has():
    keys = {key for _, config in SHIPPED for key, _ in _leaves(config)}
    assert set(config_schema.SCHEMA) - keys == set()


def test_the_documented_ranges_are_the_schema():
    text = (REPO / "docs" / "method.md").read_text()
    section = text.split("## Config ranges", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [
        f"| `{key}` | {field.range_text()} | {field.meaning} |"
        for key, field in config_schema.SCHEMA.items()
        if field.numeric
    ]
    assert rows == expected
