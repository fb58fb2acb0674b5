"""The recipe schema: every kind of error has its exact text, overrides, round trip, shipped recipes, diff."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO, write_recipe
from imgcls.recipe import Recipe, load_recipe, recipe_diff, recipe_to_toml
from imgcls.errors import RecipeError

RECIPES = sorted((REPO / "recipes").glob("*.toml"))
HUB_DATA = 'source = "hub"\ndataset = "someone/tiny"'


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_recipe(tmp_path / "tiny.toml", HUB_DATA)


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(tmp_path: Path, extra: str = "", data: str = 'dataset = "someone/tiny"') -> Path:
    return write(tmp_path, f'name = "x"\n[data]\n{data}\n{extra}\n')


def problems(path: Path, overrides: list[str] = ()) -> tuple[str, list[str]]:
    """Load a recipe that must fail: (first line, [problem lines without the '  - ' bullet])."""
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    head, *rest = str(e.value).split("\n")
    assert all(line.startswith("  - ") for line in rest), str(e.value)
    return head, [line[4:] for line in rest]


def one_problem(path: Path, overrides: list[str] = ()) -> str:
    head, found = problems(path, overrides)
    assert head == f"{path}: 1 problem in the recipe:"
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------- error texts
def test_unknown_key_suggests_the_close_one(tmp_path):
    path = minimal(tmp_path, "[train]\nepoch = 3")
    assert one_problem(path) == "train.epoch: unknown key; did you mean 'epochs'?"


def test_unknown_key_in_nested_table_suggests_from_that_table(tmp_path):
    path = minimal(tmp_path, "[data.augment]\nhflp = 0.5")
    assert one_problem(path) == "data.augment.hflp: unknown key; did you mean 'hflip'?"


def test_unknown_top_level_section(tmp_path):
    assert one_problem(minimal(tmp_path, "[trian]\nepochs = 3")) == "trian: unknown key; did you mean 'train'?"
    assert one_problem(minimal(tmp_path, "[zzz]\nq = 1")) == (
        "zzz: unknown key; known keys: name, seed, data, model, optim, schedule, train, probe, checkpoint, tracking, "
        "export")


def test_wrong_type(tmp_path):
    assert one_problem(minimal(tmp_path, '[train]\nepochs = "ten"')) == (
        'train.epochs: Input should be a valid integer (got "ten", a string)')


@pytest.mark.parametrize("section, line, expected", [
    ("", "seed = true", "seed: Input should be a valid integer (got true, a boolean)"),
    ("", 'seed = "3"', 'seed: Input should be a valid integer (got "3", a string)'),
    ("", "seed = 3.0", "seed: Input should be a valid integer (got 3.0, a float)"),
    ("data", "shuffle = 1", "data.shuffle: Input should be a valid boolean (got 1, an integer)"),
    ("data", 'shuffle = "yes"', 'data.shuffle: Input should be a valid boolean (got "yes", a string)'),
    ("optim", "lr = true", "optim.lr: Input should be a valid number (got true, a boolean)"),
    ("optim", 'lr = "0.1"', 'optim.lr: Input should be a valid number (got "0.1", a string)'),
    ("data", "image_size = [28, true]", "data.image_size.1: Input should be a valid integer (got true, a boolean)"),
    ("data", "channels = true", "data.channels: Input should be 1 or 3 (got true, a boolean)"),
    ("checkpoint", "output_dir = 3", "checkpoint.output_dir: Input should be a valid string (got 3, an integer)"),
])
def test_types_are_strict(tmp_path, section, line, expected):
    """TOML has real types: nothing is coerced (true is not 1, "3" is not 3, 1 is not true)."""
    tables = {"data": 'dataset = "someone/tiny"'}
    if section:
        tables[section] = "\n".join(filter(None, [tables.get(section, ""), line]))
    top = "" if section else line
    text = f'name = "x"\n{top}\n' + "".join(f"[{k}]\n{v}\n" for k, v in tables.items())
    assert one_problem(write(tmp_path, text)) == expected


def test_ints_are_accepted_where_floats_are_expected(tmp_path):
    recipe = load_recipe(minimal(tmp_path, "[optim]\nlr = 1\nweight_decay = 0"))
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.weight_decay == 0.0


def test_bad_choice_lists_the_allowed_values(tmp_path):
    assert one_problem(minimal(tmp_path, '[optim]\nname = "adam"')) == (
        "optim.name: Input should be 'sgd' or 'adamw' (got 'adam')")


def test_out_of_range(tmp_path):
    assert one_problem(minimal(tmp_path, "[train]\nglobal_batch_size = 0")) == (
        "train.global_batch_size: Input should be greater than or equal to 1 (got 0)")
    assert one_problem(minimal(tmp_path, "[data.augment]\nhflip = 1.5")) == (
        "data.augment.hflip: Input should be less than or equal to 1 (got 1.5)")


def test_missing_required_name(tmp_path):
    path = write(tmp_path, '[data]\ndataset = "someone/tiny"\n')
    assert one_problem(path) == "name: required key is missing"


def test_name_must_be_a_folder_name(tmp_path):
    path = write(tmp_path, 'name = "a/b"\n[data]\ndataset = "someone/tiny"\n')
    assert one_problem(path) == "name: must be a plain folder name (it names runs/<name>/) (got 'a/b')"


def test_several_problems_are_one_error_listing_all(tmp_path):
    path = minimal(tmp_path, '[train]\nepoch = 3\nglobal_batch_size = 0\n[optim]\nname = "adam"\n[trian]\nx = 1')
    head, found = problems(path)
    assert head == f"{path}: 4 problems in the recipe:"
    assert sorted(found) == sorted([
        "train.epoch: unknown key; did you mean 'epochs'?",
        "train.global_batch_size: Input should be greater than or equal to 1 (got 0)",
        "optim.name: Input should be 'sgd' or 'adamw' (got 'adam')",
        "trian: unknown key; did you mean 'train'?",
    ])


def test_error_names_the_recipe_file(tmp_path):
    path = write(tmp_path, 'name = "x"\n[data]\ndataset = "a"\n[train]\nepochs = 0\n', name="my_experiment.toml")
    with pytest.raises(RecipeError, match="my_experiment.toml: 1 problem in the recipe:"):
        load_recipe(path)
    assert str(path) in problems(path)[0]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: recipe file not found"


def test_invalid_toml(tmp_path):
    path = write(tmp_path, 'name = "x"\n[data\ndataset = "a"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: not valid TOML: ")
    assert "line 2" in str(e.value)


@pytest.mark.parametrize("data, expected", [
    ('source = "hub"', "data: source = 'hub' needs dataset = '<hub name or local folder>'"),
    ('source = "folder"', "data: source = 'folder' needs root = '<folder>'"),
    ('source = "listfile"\nroot = "d"', "data: source = 'listfile' needs train_list = '<file>'"),
    ('source = "hub"\ndataset = "a"\ntrain_list = "t.txt"', "data: ['train_list'] do not apply to source = 'hub'"),
    ('source = "hub"\ndataset = "a"\nroot = "r"\nseparator = "----"',
     "data: ['root', 'separator'] do not apply to source = 'hub'"),
    ('source = "folder"\nroot = "r"\ndataset = "a"', "data: ['dataset'] do not apply to source = 'folder'"),
    ('source = "listfile"\nroot = "r"\ntrain_list = "t"\nrevision = "main"',
     "data: ['revision'] do not apply to source = 'listfile'"),
    ('dataset = "a"\nchannels = 1', "data: mean and std need 1 values (one per channel)"),
    ('dataset = "a"\nmean = [0.5]\nstd = [0.5]', "data: mean and std need 3 values (one per channel)"),
    ('dataset = "a"\nstd = [0.2, 0.0, 0.2]', "data: std values must be > 0"),
    ('source = "listfile"\nroot = "r"\ntrain_list = "t"\nclass_names = ["cat", "dog", "cat"]',
     "data: class_names lists 'cat' more than once; each class needs its own name"),
])
def test_data_source_consistency(tmp_path, data, expected):
    assert one_problem(minimal(tmp_path, data=data)) == expected


def test_data_problems_are_reported_together(tmp_path):
    path = minimal(tmp_path, data='source = "hub"\nchannels = 1\nroot = "r"')
    assert one_problem(path) == ("data: mean and std need 1 values (one per channel); ['root'] do not apply to "
                                 "source = 'hub'; source = 'hub' needs dataset = '<hub name or local folder>'")


@pytest.mark.parametrize("model, expected", [
    ('train_mode = "finetune"', "model: train_mode = 'finetune' needs weights = '<file or artifact dir>'"),
    ('train_mode = "update"', "model: train_mode = 'update' needs weights = '<file or artifact dir>'"),
    ('weights = "w.pth"', "model: weights is set but train_mode = 'fromscratch'; use 'finetune' or 'update'"),
])
def test_model_train_mode_vs_weights(tmp_path, model, expected):
    assert one_problem(minimal(tmp_path, f"[model]\n{model}")) == expected


def test_finetune_with_weights_is_valid(tmp_path):
    r = load_recipe(minimal(tmp_path, '[model]\ntrain_mode = "finetune"\nweights = "w.pth"'))
    assert (r.model.train_mode, r.model.weights) == ("finetune", "w.pth")


def test_recipe_is_frozen(tiny):
    r = load_recipe(tiny)
    with pytest.raises(Exception, match="frozen"):
        r.train.epochs = 99


# ---------------------------------------------------------------- overrides
def test_precedence_defaults_file_override(tiny):
    r = load_recipe(tiny)
    assert r.train.epochs == 3                     # file (default is 10)
    assert r.train.grad_accum_steps == 1           # default, not in the file
    assert r.optim.lr == 0.1
    r = load_recipe(tiny, ["train.epochs=7", "train.grad_accum_steps=2", "optim.lr=0.05"])
    assert (r.train.epochs, r.train.grad_accum_steps, r.optim.lr) == (7, 2, 0.05)
    assert r.train.global_batch_size == 16         # untouched file value survives


def test_later_override_wins(tiny):
    assert load_recipe(tiny, ["train.epochs=4", "train.epochs=6"]).train.epochs == 6


def test_override_values_are_toml(tiny):
    r = load_recipe(tiny, ["train.epochs=3", "data.image_size=[32,32]", "model.args={width=8}",
                           "optim.name=adamw", 'tracking.notes="quoted"', "train.label_smoothing=0.1",
                           "train.calibrate=false", "data.dataset=someone/other"])
    assert r.train.epochs == 3 and type(r.train.epochs) is int
    assert r.data.image_size == (32, 32)
    assert r.model.args == {"width": 8}            # a table value replaces the whole table
    assert r.optim.name == "adamw"                 # a bare word is a string
    assert r.tracking.notes == "quoted"
    assert r.train.label_smoothing == 0.1
    assert r.train.calibrate is False
    assert r.data.dataset == "someone/other"


def test_override_dotted_key_merges_into_table(tiny):
    r = load_recipe(tiny, ["model.args.width=4"])
    assert r.model.args == {"width": 4, "dropout": 0.0}


def test_override_nested_table_created(tiny):
    r = load_recipe(tiny, ["data.augment.hflip=0.5", "data.augment.crop_padding=2"])
    assert (r.data.augment.hflip, r.data.augment.crop_padding) == (0.5, 2)
    assert r.data.augment.rotation == 0.0
    r = load_recipe(tiny, ["export.formats=['onnx']"])   # a section absent from the file
    assert r.export.formats == ["onnx"]


@pytest.mark.parametrize("bad", ["trainepochs", "=3"])
def test_malformed_override(tiny, bad):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny, [bad])
    assert str(e.value) == f"override {bad!r}: expected section.key=value, e.g. train.epochs=3"


def test_override_into_a_value(tiny):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny, ["name.x=3"])
    assert str(e.value) == "override 'name.x=3': 'name' is a value, not a table"


def test_override_that_makes_recipe_invalid(tiny):
    assert one_problem(tiny, ["train.epochs=-1"]) == "train.epochs: Input should be greater than or equal to 0 (got -1)"
    assert one_problem(tiny, ["train.epoch=3"]) == "train.epoch: unknown key; did you mean 'epochs'?"
    assert one_problem(tiny, ["optim.name=adam"]) == "optim.name: Input should be 'sgd' or 'adamw' (got 'adam')"
    head, found = problems(tiny, ["train.epochs=ten", "data.channels=3"])
    assert head == f"{tiny}: 2 problems in the recipe:"
    assert sorted(found) == ["data: mean and std need 3 values (one per channel)",
                             'train.epochs: Input should be a valid integer (got "ten", a string)']


# ---------------------------------------------------------------- round trip and shipped recipes
def roundtrip(r: Recipe, tmp_path: Path) -> Recipe:
    return load_recipe(write(tmp_path, recipe_to_toml(r), name="resolved.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_round_trips(path, tmp_path):
    r = load_recipe(path)
    again = roundtrip(r, tmp_path)
    assert again == r
    assert recipe_diff(r, again) == {}


def test_round_trip_keeps_overrides_and_nondefaults(tiny, tmp_path):
    r = load_recipe(tiny, ["data.augment.hflip=0.5", "model.train_mode=finetune", "model.weights=w.pth",
                           "model.freeze=['layer1']", "tracking.backends=['tensorboard']"])
    assert roundtrip(r, tmp_path) == r


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"mnist.toml", "fashion_mnist.toml", "imagefolder_resnet18.toml",
                                         "listfile.toml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_and_names_its_run_command(path):
    r = load_recipe(path)
    assert r.name == path.stem
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    header = [line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]]
    assert any(f"imgcls.train recipes/{path.name}" in line for line in header), header
    from imgcls.models.registry import build_model  # the model's own arguments are checked when it is built

    # the architecture as shipped; pretrained weights are not downloaded here (tests/test_pretrained.py loads them)
    model = build_model(r.model.model_copy(update={"pretrained": False}), 10, r.data.channels, r.data.image_size)
    assert model(torch.zeros(2, r.data.channels, *r.data.image_size)).shape == (2, 10)


# ---------------------------------------------------------------- diff
def test_recipe_diff_names_exactly_the_changed_keys(tiny):
    a = load_recipe(tiny)
    b = load_recipe(tiny, ["train.epochs=5", "data.augment.hflip=0.5", "model.args.width=4", "optim.name=adamw",
                           "train.epochs=3"])   # back to the file value: not a change
    assert recipe_diff(a, b) == {
        "data.augment.hflip": (0.0, 0.5),
        "model.args": ({"width": 8, "dropout": 0.0}, {"width": 4, "dropout": 0.0}),
        "optim.name": ("sgd", "adamw"),
    }
    assert recipe_diff(a, a) == {}
    assert recipe_diff(b, a) == {k: (new, old) for k, (old, new) in recipe_diff(a, b).items()}


# ---------------------------------------------------------------- values that crash later or train nonsense (#20.20)
BOUNDED = [
    ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1)"),
    ("seed=1099511627776", "seed: Input should be less than or equal to 4294967295 (got 1099511627776)"),
    ("data.split_seed=-3", "data.split_seed: Input should be greater than or equal to 0 (got -3)"),
    ("data.std=[nan, 0.2, 0.2]", "data.std.0: Input should be a finite number (got nan)"),
    ("data.mean=[inf, 0.5, 0.5]", "data.mean.0: Input should be a finite number (got inf)"),
    ("optim.betas=[2.0, -1.0]", "optim.betas.0: Input should be less than 1 (got 2.0)\n"
                                "optim.betas.1: Input should be greater than or equal to 0 (got -1.0)"),
    ("data.augment.scale=[nan, nan]", "data.augment.scale.0: Input should be a finite number (got nan)\n"
                                      "data.augment.scale.1: Input should be a finite number (got nan)"),
    ("data.augment.scale=[5, -1]", "data.augment.scale.0: Input should be less than or equal to 1 (got 5)\n"
                                   "data.augment.scale.1: Input should be greater than 0 (got -1)"),
    ("data.augment.scale=[0.9, 0.1]",
     "data.augment: scale is [smallest, largest] fraction of the image area, found [0.9, 0.1]"),
    ("data.workers=1000000", "data.workers: Input should be less than or equal to 256 (got 1000000)"),
    ("data.image_size=[100000, 16]", "data.image_size.0: Input should be less than or equal to 8192 (got 100000)"),
    ("data.working_size=[16, 9000]", "data.working_size.1: Input should be less than or equal to 8192 (got 9000)"),
    ("train.max_time=inf", "train.max_time: Input should be a finite number (got inf)"),
]


@pytest.mark.parametrize("override,expected", BOUNDED)
def test_values_that_would_crash_later_are_bounded(tmp_path, override, expected):
    path = minimal(tmp_path)
    head, found = problems(path, [override])
    assert found == expected.split("\n")
    assert head == f"{path}: {len(found)} problem{'s' if len(found) > 1 else ''} in the recipe:"


def test_a_name_with_a_control_character_is_refused(tmp_path):
    path = write(tmp_path, 'name = "a\\u0000b"\n[data]\ndataset = "someone/tiny"\n')
    assert one_problem(path) == ("name: must be a plain folder name (it names runs/<name>/): no control characters, "
                                 "no / or \\ (got 'a\\x00b')")


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_table_nested_too_deeply_is_one_clear_error(tmp_path, where):
    deep = "{ a = " * 1000 + "1" + " }" * 1000
    if where == "file":
        path = minimal(tmp_path, f"[model]\nargs = {deep}")
        with pytest.raises(RecipeError) as e:
            load_recipe(path)
        assert str(e.value) == f"{path}: not valid TOML: arrays or tables nested too deeply"
    else:
        with pytest.raises(RecipeError) as e:
            load_recipe(minimal(tmp_path), [f"model.args={deep}"])
        assert str(e.value) == f"override 'model.args=...': arrays or tables nested too deeply"


def test_a_table_nested_deeper_than_a_recipe_needs_is_refused(tmp_path):
    path = minimal(tmp_path, "[model]\nargs = " + "{ a = " * 40 + "1" + " }" * 40)
    assert one_problem(path) == "model.args: tables and arrays nested more than 32 levels deep; no recipe key needs that"


@pytest.mark.parametrize("revision", ["../../outside", "main/../../x", "/etc/passwd", "v1\\x", "a b", "-rf", "x.lock"])
def test_a_hub_revision_that_is_not_a_git_ref_or_commit_is_refused(tmp_path, revision):
    # huggingface_hub stores a ref as <cache>/refs/<revision> and reads it back offline: a revision with '..'
    # would make it read and write outside the cache
    path = minimal(tmp_path)
    head, found = problems(path, [f"data.revision={revision}"])
    assert found == [f"data.revision: must be a branch, tag or commit of the dataset repository (letters, digits, "
                     f"'.', '_', '-' and '/' between names; no '..', no leading '-', '/' or '.', no '.lock' "
                     f"ending) (got {revision!r})"]


@pytest.mark.parametrize("revision", ["", "main", "refs/pr/3", "v1.0.2", "release/2024-01_a",
                                      "3f9e0c0f2a1b4c5d6e7f8a9b0c1d2e3f4a5b6c7d"])
def test_git_ref_and_commit_revisions_are_accepted(tmp_path, revision):
    assert load_recipe(minimal(tmp_path), [f"data.revision={revision}"]).data.revision == revision
