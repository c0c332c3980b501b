import sys

import pytest

from helpers import REPO, TOY_PLUGIN
from utils.options import (
    apply_override,
    find_options_file,
    import_plugins,
    load_options,
    parse_yaml,
)
from utils.schema import ConfigError


def write(tmp_path, text, name="exp.yml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_reads_exponent_floats():
    assert parse_yaml("lr: 1e-5\nb: !!float 2e-4\nc: 3")["lr"] == pytest.approx(1e-5)
    assert isinstance(parse_yaml("lr: 1e-5")["lr"], float)
    assert parse_yaml("c: 3")["c"] == 3


def test_overrides_are_parsed_as_yaml(tmp_path):
    p = write(tmp_path, "train:\n  niter: 10\n")
    opt = load_options(
        p, ["train.niter=20", "train.gen_lr_steps=[5, 8]", "logger.print_freq=3", "name=foo"]
    )
    assert opt["train"] == {"niter": 20, "gen_lr_steps": [5, 8]}
    assert opt["logger"]["print_freq"] == 3 and opt["name"] == "foo"


def test_override_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "train.niter")
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_override({"train": 5}, "train.niter=3")


def test_interpolation(tmp_path):
    p = write(
        tmp_path,
        "train:\n  niter: 100\n  val_freq: ${train.niter}\n"
        "logger:\n  save_checkpoint_freq: ${train.val_freq}\n",
    )
    opt = load_options(p, ["train.niter=40"])
    assert opt["train"]["val_freq"] == 40 and opt["logger"]["save_checkpoint_freq"] == 40


def test_interpolation_error_names_key(tmp_path):
    p = write(tmp_path, "train:\n  niter: ${train.nitre}\n")
    with pytest.raises(ConfigError, match="train.niter.*interpolation"):
        load_options(p)


def test_private_keys_and_base_dir(tmp_path):
    p = write(tmp_path, "name: x\n")
    opt = load_options(p)
    assert opt["_base_dir"] == str(tmp_path.resolve())


def test_find_options_file_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO / "codebase")
    assert (
        find_options_file("experiments/toy_regression.yml")
        == (REPO / "experiments" / "toy_regression.yml").resolve()
    )
    with pytest.raises(FileNotFoundError, match="nope.yml"):
        find_options_file("experiments/nope.yml")


def test_plugin_by_path_and_by_module(tmp_path):
    import_plugins([TOY_PLUGIN], tmp_path)
    from data import DATASETS

    assert "toy_regression" in DATASETS
    (tmp_path / "my_plugin_mod.py").write_text(
        "from trainer.losses import Loss\n"
        "class ZeroLoss(Loss):\n"
        "    def forward(self, state):\n"
        "        return 0\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import_plugins(["my_plugin_mod"], tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
    from trainer.losses import LOSSES

    assert "zero" in LOSSES
    with pytest.raises(ConfigError, match="plugins\\[0\\].*missing_plugin"):
        import_plugins(["missing_plugin.py"], tmp_path)
    with pytest.raises(ConfigError, match="cannot be imported"):
        import_plugins(["no_such_module_xyz"], tmp_path)


def test_duplicate_keys_are_an_error_with_both_lines():
    text = "name: a\nsteps:\n  s: 1\n  t: 2\n  s: 3\ntrain: {niter: 1}\nsteps: {}\n"
    with pytest.raises(ConfigError) as e:
        parse_yaml(text, "x.yml")
    problems = dict(e.value.problems)
    assert problems["steps.s"].startswith("given twice, at lines 3 and 5")
    assert problems["steps"].startswith("given twice, at lines 2 and 7")
    assert "x.yml" in str(e.value)
    # a merge key's values may be overridden; that is not a duplicate
    assert parse_yaml("b: &b {x: 1}\nm: {<<: *b, x: 2}\n")["m"] == {"x": 2}
