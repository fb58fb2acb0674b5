"""The recipe schema: one typed section per TOML table, and `load_recipe(path, overrides)`.

A recipe is read as: defaults < TOML file < `section.key=value` overrides. Every problem (unknown key,
wrong type, bad choice, out-of-range value) is collected into ONE `RecipeError` naming the file and the
dotted key, with a "did you mean" for misspelled keys. This module imports no torch on purpose: the
launcher validates recipes before any process starts.
"""
from __future__ import annotations

import difflib
import re
import sys
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from imgcls.errors import RecipeError


class Section(BaseModel):
    # strict: TOML values have real types, so nothing is coerced (`seed = true` is not 1, "3" is not 3);
    # an integer is still accepted where a float is expected. TOML's nan and inf are no setting of any key.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _array_to_tuple(value: Any) -> Any:
    """TOML arrays arrive as lists; strict mode would refuse them for fixed-length fields."""
    return tuple(value) if isinstance(value, list) else value


def _not_a_boolean(value: Any) -> Any:
    """`Literal[1, 3]` alone would take `true` as 1 (True == 1 in Python)."""
    if isinstance(value, bool):
        raise PydanticCustomError("literal_error", "Input should be 1 or 3")
    return value


MAX_SIDE = 8192  # pixels per image side: one 8192x8192 RGB float32 image is already 0.8 GB
MAX_WORKERS = 256
MAX_DEPTH = 32  # nesting of tables and arrays (the shipped recipes nest 4 deep at most)
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's seeds; torch takes them too
SizePair = Annotated[tuple[Side, Side], BeforeValidator(_array_to_tuple)]
FractionPair = Annotated[tuple[Fraction, Fraction], BeforeValidator(_array_to_tuple)]
BetaPair = Annotated[tuple[Beta, Beta], BeforeValidator(_array_to_tuple)]


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_seconds(value: Any) -> Any:
    """`"2h"`, `"30m"`, `"90s"`, `"1.5h"` or a number of seconds -> seconds; `""` -> 0 (no limit)."""
    if isinstance(value, str):
        text = value.strip().lower()
        number, unit = (text[:-1], text[-1]) if text and text[-1] in DURATION_UNITS else (text, "s")
        try:
            return float(number or 0) * DURATION_UNITS[unit]
        except ValueError:
            raise PydanticCustomError("duration", "expected seconds or a duration such as \"2h\", \"30m\", "
                                                  "\"90s\"") from None
    return value


Seconds = Annotated[float, Field(ge=0.0), BeforeValidator(_duration_seconds)]


class AugmentConfig(Section):
    """`[data.augment]`: train-time augmentation (evaluation never augments)."""

    random_resized_crop: bool = False
    scale: FractionPair = (0.08, 1.0)  # [smallest, largest] fraction of the image area a random crop keeps
    crop_padding: int = Field(0, ge=0)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    rotation: float = Field(0.0, ge=0.0, le=180.0)
    color_jitter: float = Field(0.0, ge=0.0)
    # torchvision's RandAugment / TrivialAugmentWide / AutoAugment (ImageNet policy), after the flip
    auto_augment: Literal["", "randaugment", "trivialaugment", "autoaugment"] = ""
    randaugment_ops: int = Field(2, ge=0)
    randaugment_magnitude: int = Field(9, ge=0, le=30)  # bin of 31 (num_magnitude_bins)
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)  # probability; on the normalized image, value 0
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _scale_in_order(self) -> "AugmentConfig":
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"scale is [smallest, largest] fraction of the image area, found {list(self.scale)}")
        return self


HUB_KEYS = {"dataset", "config", "revision"}
FOLDER_KEYS = {"root"}
LIST_KEYS = {"train_list", "val_list", "test_list", "separator", "class_names", "labels_are_indices"}
SHARD_KEYS = {"shard_cache_dir", "shard_cache_gb"}
# a branch, tag or commit: huggingface_hub keeps a ref as <cache>/refs/<revision> and reads it back offline, so
# '..' or a leading '/' would reach outside the cache (git's own ref-name rules, the part that matters here)
GIT_REF = re.compile(r"(?![-/.])(?!.*\.\.)(?!.*//)(?!.*/\.)(?!.*\.lock$)(?!.*/$)[A-Za-z0-9._/-]+")
FOREIGN_KEYS = {"hub": FOLDER_KEYS | LIST_KEYS | SHARD_KEYS, "folder": HUB_KEYS | LIST_KEYS | SHARD_KEYS,
                "listfile": HUB_KEYS | SHARD_KEYS, "shards": HUB_KEYS | LIST_KEYS}


class DataConfig(Section):
    """`[data]`: where images come from, how splits are formed, and the preprocessing the model owns."""

    source: Literal["hub", "folder", "listfile", "shards"] = "hub"
    # hub (a hub name, or a local folder in hub layout: the same `datasets.load_dataset` path)
    dataset: str = ""
    config: str = ""
    revision: str = ""
    streaming: bool = False  # refused, with the reason and the alternative: see hub.streaming_refusal
    image_column: str = ""
    label_column: str = ""
    # folder and list file: paths are relative to root
    root: str = ""
    train_list: str = ""
    val_list: str = ""
    test_list: str = ""
    separator: str = " "
    class_names: list[str] = []
    labels_are_indices: bool = False  # list-file labels are 0-based indices into class_names, not names
    # shards (`imgcls-data shard`): root is their folder, an http(s):// URL or hf://datasets/<owner>/<repo>/<path>;
    # remote shards are kept in shard_cache_dir ("" -> <cache root>/shards/<hash of root>), at most shard_cache_gb
    shard_cache_dir: str = ""
    shard_cache_gb: float = Field(20.0, gt=0)
    allow_rare_classes: bool = False  # folder/list file: accept classes with few images or in one split only
    # split model: train / val / test
    train_split: str = "train"
    val_split: str = ""
    test_split: str = ""
    val_size: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    val_pick: Literal["first", "random"] = "random"
    split_seed: Seed = 0
    on_bad_image: Literal["error", "skip"] = "error"
    # an image of more pixels is a bad image (through on_bad_image), refused from its header before decoding: a
    # decompression bomb under Pillow's own limit costs ~1 GB per decoder. 64 Mpx = 67,108,864 (9,500 x 7,000)
    max_image_pixels: int = Field(64 * 2**20, ge=1)
    # preprocessing, stored with the model
    image_size: SizePair = (224, 224)
    channels: Annotated[Literal[1, 3], BeforeValidator(_not_a_boolean)] = 3
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    crop_pct: float = Field(1.0, gt=0.0, le=1.0)
    augment: AugmentConfig = AugmentConfig()
    # loading
    workers: int = Field(0, ge=0, le=MAX_WORKERS)
    shuffle: bool = True
    # "balanced": each epoch draws len(train) images with replacement, each class about equally often (imbalance.py)
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    cache: Literal["none", "memory", "disk"] = "none"
    decode: Literal["cpu", "gpu"] = "cpu"  # "gpu": train JPEGs decoded by nvJPEG on the device (gpu_decode.py)
    cache_dir: str = ""  # data.cache = "disk": "" -> $IMGCLS_CACHE, else ~/.cache/imgcls
    # [height, width] of the stored train images, which augmentation crops from; [] = image_size (divided by
    # crop_pct when < 1). A random-resized-crop recipe may store larger images to zoom into.
    working_size: list[Side] = []

    @field_validator("revision")
    @classmethod
    def _revision_is_a_ref(cls, v: str) -> str:
        if v and not GIT_REF.fullmatch(v):
            raise ValueError("must be a branch, tag or commit of the dataset repository (letters, digits, '.', '_', "
                             "'-' and '/' between names; no '..', no leading '-', '/' or '.', no '.lock' ending)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        problems = []
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean and std need {self.channels} values (one per channel)")
        if any(s <= 0 for s in self.std):
            problems.append("std values must be > 0")
        twice = [n for i, n in enumerate(self.class_names) if n in self.class_names[:i]]
        if twice:
            problems.append(f"class_names lists {twice[0]!r} more than once; each class needs its own name")
        if len(self.working_size) not in (0, 2):
            problems.append("working_size is [height, width], or [] for image_size")
        foreign = FOREIGN_KEYS[self.source] & self.model_fields_set
        if foreign:
            problems.append(f"{sorted(foreign)} do not apply to source = {self.source!r}")
        if self.source == "hub" and not self.dataset:
            problems.append("source = 'hub' needs dataset = '<hub name or local folder>'")
        if self.source in ("folder", "listfile", "shards") and not self.root:
            problems.append(f"source = {self.source!r} needs root = '<folder>'")
        if self.source == "listfile" and not self.train_list:
            problems.append("source = 'listfile' needs train_list = '<file>'")
        if self.decode == "gpu" and self.cache != "none":
            problems.append(f"decode = 'gpu' decodes the files of each batch on the device: it needs cache = 'none' "
                            f"(a {self.cache!r} store already holds decoded pixels)")
        if self.sampler == "balanced" and self.source == "shards":
            problems.append("sampler = 'balanced' does not apply to source = 'shards': shards are read in their own "
                            "order (each process reads its own run of shards); use sampler = 'shuffle', or train "
                            "from the folder, list file or hub source to balance classes")
        if self.sampler == "balanced" and not self.shuffle:
            problems.append("sampler = 'balanced' draws a random sample every epoch: it needs shuffle = true")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ModelConfig(Section):
    """`[model]`: architecture by registry name, its arguments, and where initial weights come from."""

    name: str = "small_cnn"
    args: dict[str, Any] = {}
    train_mode: Literal["fromscratch", "finetune", "update"] = "fromscratch"
    weights: str = ""
    # true: the model's default pretrained weights (torchvision DEFAULT, timm's tag); a torchvision weights name
    pretrained: Union[bool, str] = False
    freeze: Union[Literal["none", "backbone"], list[str]] = "none"
    # BatchNorm keeps its pretrained running statistics while training (its scale and shift still learn): for
    # fine-tuning on a few hundred images, whose batch statistics are noisy and unlike ImageNet's
    freeze_bn: bool = False
    sync_batchnorm: bool = False

    @model_validator(mode="after")
    def _weights_for_mode(self) -> "ModelConfig":
        if self.pretrained is not False:
            if self.pretrained == "":
                raise ValueError("pretrained = '' names no weights; use false, true or a weights name such as "
                                 "'IMAGENET1K_V2'")
            if self.weights:
                raise ValueError("pretrained and weights are both set; the initial weights come from one of them")
            if self.train_mode != "finetune":
                raise ValueError(f"pretrained weights load with train_mode = 'finetune' (the classifier is replaced "
                                 f"for the data's classes), not {self.train_mode!r}")
            return self
        if self.train_mode != "fromscratch" and not self.weights:
            raise ValueError(f"train_mode = {self.train_mode!r} needs weights = '<file or artifact dir>'")
        if self.train_mode == "fromscratch" and self.weights:
            raise ValueError("weights is set but train_mode = 'fromscratch'; use 'finetune' or 'update'")
        return self


class OptimConfig(Section):
    """`[optim]`: the optimizer; weight decay skips norm layers and biases unless told otherwise."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: BetaPair = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    decay_norm_and_bias: bool = False
    grad_clip_norm: float = Field(0.0, ge=0.0)
    backbone_lr_scale: float = Field(1.0, gt=0.0)  # everything but the classifier head trains at lr x this
    # timm models: each layer below the head at lr x backbone_lr_scale x layer_decay^(its depth from the top),
    # the layers of timm's group_matcher (timm's param_groups_layer_decay); 1.0 = off
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)


class ScheduleConfig(Section):
    """`[schedule]`: per-optimizer-step learning-rate schedule."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    decay: float = Field(0.1, gt=0.0, le=1.0)
    decay_every_epochs: int = Field(30, ge=1)


class TrainConfig(Section):
    """`[train]`: how long, how big a batch, precision, and evaluation cadence."""

    epochs: int = Field(10, ge=0)  # 0: no training loop, only [probe] (which needs probe.enabled)
    global_batch_size: int = Field(128, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    max_steps: int = Field(0, ge=0)
    mixed_precision: Literal["config", "no", "bf16", "fp16"] = "config"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] = "none"  # "balanced": loss weight n / (classes x count of the class)
    evaluate_before_train: bool = False
    eval_every_epochs: int = Field(1, ge=1)
    log_every_steps: int = Field(50, ge=1)
    early_stop_patience: int = Field(0, ge=0)
    calibrate: bool = True
    test_tta: bool = False  # also test the best model on the mean softmax of each image and its flip: row "test_tta"
    cpu_threads: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = "auto"  # intra-op threads per CPU process
    max_time: Seconds = 0.0  # wall time of this process's run (a resumed run counts its own); 0 = no limit
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss: stop (exit 1), or skip that optimizer step
    max_skipped_steps: int = Field(10, ge=0)  # on_nonfinite = "skip": more skipped steps in a row stop the run
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # EMA of the weights, validated as "val_ema"; 0 = off
    ema_warmup_steps: int = Field(0, ge=0)  # decay = min(ema_decay, (1 + t) / (10 + t)) for the first t updates
    channels_last: bool = False  # model and train batches in torch.channels_last memory format
    compile: bool = False  # torch.compile the model (on CPU it needs a C++ compiler)


class ProbeConfig(Section):
    """`[probe]`: stage 1 of probe-then-fine-tune (LP-FT). The frozen backbone's features are computed once (eval
    mode, cached on disk) and a new linear head is fitted on them to convergence by L-BFGS; stage 2 is the
    ordinary training loop (`train.epochs`, 0 = probe only), started from that head."""

    enabled: bool = False
    views: int = Field(1, ge=1, le=64)  # per train image: 1 = its eval framing; k > 1 adds k-1 data.augment views
    # the penalty strengths tried (each fitted from zero); the head with the lowest val cross-entropy is kept
    l2: list[Annotated[float, Field(gt=0.0)]] = Field([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], min_length=1)
    max_iter: int = Field(200, ge=1)  # L-BFGS iterations per fit


class CheckpointConfig(Section):
    """`[checkpoint]`: where runs go, how often resume state is saved, and which model is "best"."""

    output_dir: str = "runs"
    every_steps: int = Field(0, ge=0)
    every_epochs: int = Field(1, ge=0)
    keep_last: int = Field(2, ge=1)
    select_metric: Literal["top1", "loss", "macro_f1", "balanced_accuracy"] = "top1"  # all but loss: higher is better
    select_ema: bool = False  # with train.ema_decay: the EMA weights are selected as best and go to model/best


class TrackingConfig(Section):
    """`[tracking]`: experiment trackers beside the always-on metrics.jsonl."""

    backends: list[Literal["wandb", "tensorboard"]] = []
    project: str = "imgcls"
    entity: str = ""
    run_name: str = ""
    group: str = ""
    tags: list[str] = []
    notes: str = ""
    mode: Literal["online", "offline"] = "online"
    upload_model: bool = False
    plots: bool = True


class ExportConfig(Section):
    """`[export]`: formats written at the end of training (also available later via `imgcls-export`)."""

    formats: list[Literal["onnx", "torchscript", "torch_export"]] = []
    opset: int = Field(17, ge=11)
    onnx_fp16: bool = False
    parity_images: int = Field(32, ge=1)
    parity_atol: float = Field(1e-3, gt=0.0)


class Recipe(Section):
    name: str
    seed: Seed = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    probe: ProbeConfig = ProbeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (it names runs/<name>/)")
        if "\\" in v or any(unicodedata.category(c) == "Cc" for c in v):
            raise ValueError("must be a plain folder name (it names runs/<name>/): no control characters, no / or \\")
        return v

    @model_validator(mode="after")
    def _stages(self) -> "Recipe":
        problems = []
        if self.train.epochs == 0 and not self.probe.enabled:
            problems.append("train.epochs = 0 trains nothing: set train.epochs >= 1, or probe.enabled = true for a "
                            "probe-only run (a new head fitted on the frozen backbone's features)")
        if self.probe.enabled and self.model.pretrained is False and not self.model.weights:
            problems.append("probe.enabled = true fits a head on the features of pretrained weights: set "
                            "model.pretrained = true or model.weights = '<file>' (a random backbone's features "
                            "are not worth probing)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def per_device_batch(global_batch: int, world_size: int, accum: int) -> int:
    """The global batch is the recipe's; each process gets global / (world x accumulation). Here, without torch,
    so that the launcher checks it before any process starts."""
    share = world_size * accum
    if global_batch % share:
        raise RecipeError(
            f"train.global_batch_size = {global_batch} does not divide into {world_size} process(es) x "
            f"{accum} accumulation step(s); pick a multiple of {share}"
        )
    return global_batch // share


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (["train", "epochs"], 3). The value is read as TOML; a bare word is a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r}: expected section.key=value, e.g. train.epochs=3")
    if "\n" in text or "\r" in text:  # TOML would read the next line as another key, which then goes nowhere
        raise RecipeError(f"override {text!r}: a value cannot span lines; give each key its own section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:  # tomllib parses nesting by recursion
        raise RecipeError(f"override {key.strip() + '=...'!r}: arrays or tables nested too deeply") from None
    return [part.strip() for part in key.split(".")], value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {part!r} is a value, not a table")
        node[path[-1]] = value
    return tree


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the section that holds `loc` (for "did you mean")."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int)) or ("(recipe)",)
    dotted = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1)
        tip = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(_fields_at(loc))}"
        return f"{dotted}: unknown key{tip}"
    if err["type"] == "missing":
        return f"{dotted}: required key is missing"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict):
        shown = ""
    elif err["type"].endswith("_type") or err["type"] == "int_from_float" or isinstance(got, bool):
        shown = f" (got {_toml_value(got)}, {_TOML_TYPES.get(type(got), type(got).__name__)})"
    else:
        shown = f" (got {got!r})"
    return f"{dotted or '(recipe)'}: {msg}{shown}"


_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}


def _toml_value(value: Any) -> str:
    """A value as it is written in TOML (true, "3"), so the user recognises their own line."""
    try:
        return tomli_w.dumps({"v": value}).partition("=")[2].strip()
    except (TypeError, ValueError):
        return repr(value)


def _too_deep(tree: dict) -> str | None:
    """The section.key under which tables and arrays nest deeper than MAX_DEPTH (a walk without recursion)."""
    stack: list[tuple[tuple, Any, int]] = [((), tree, 1)]
    while stack:
        path, node, level = stack.pop()
        if level > MAX_DEPTH:
            return ".".join(str(p) for p in path[:2])
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [((*path, k), v, level + 1) for k, v in children if isinstance(v, (dict, list))]
    return None


def validate_tree(tree: dict, source: str) -> Recipe:
    deep = _too_deep(tree)
    if deep:
        raise RecipeError(f"{source}: 1 problem in the recipe:\n  - {deep}: tables and arrays nested more than "
                          f"{MAX_DEPTH} levels deep; no recipe key needs that")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        head = f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the recipe:"
        raise RecipeError("\n  - ".join([head, *problems])) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nesting by recursion
        raise RecipeError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    return validate_tree(apply_overrides(tree, list(overrides)), str(path))


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe; keys of other data sources are left out, so that it loads back to the same Recipe."""
    tree = recipe.model_dump(mode="json")
    tree["data"] = {k: v for k, v in tree["data"].items() if k not in FOREIGN_KEYS[recipe.data.source]}
    return tomli_w.dumps(tree)


def recipe_diff(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs."""
    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            if isinstance(v, dict) and k != "args":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
