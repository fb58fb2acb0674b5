"""Pretrained weights by name (`[model] pretrained`), hub weight files (`weights = "hf-hub:owner/repo"`), one
clear error when they are not cached and cannot be downloaded (the preprocessing the weights were trained with:
`imgcls.models.weights_preprocess`).

    check_pretrained(cfg.model)                       # the weights exist (nothing is downloaded)
    state, what = torchvision_state_dict(cfg.model)   # torchvision: DEFAULT or a named weights enum
    with fetching(timm_source(cfg.model)): ...        # timm.create_model(..., pretrained=True) inside
    path = hub_file("hf-hub:owner/repo")              # the repo's model.safetensors, through the HF cache

`pretrained = true` picks torchvision's DEFAULT weights (gem_resnet: its backbone's) or a timm name's default
tag; a string picks a torchvision weights name ("IMAGENET1K_V2"). Downloads go to the libraries' caches: torch's
hub cache ($TORCH_HOME/hub/checkpoints) and the Hugging Face cache ($HF_HUB_CACHE, HF_HUB_OFFLINE honoured).
Offline and not cached is one `WeightsError` (a RecipeError: the trainer prints `error: ...` and exits 2) naming
the weights, where they come from and the exact cache path to put them at. torch checks the SHA-256 prefix in a
torchvision file name only when it downloads the file; a file found in the cache (put there by hand, as the error
says) is checked here.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torchvision
from accelerate.logging import get_logger
from accelerate.state import PartialState, is_initialized
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from imgcls.models import timm_models
from imgcls.models.gem import GeMResNet
from imgcls.errors import RecipeError, WeightsError
from imgcls.models.spec import ModelSpec

_log = get_logger(__name__)

HUB_PREFIX = "hf-hub:"
HUB_FILE = "model.safetensors"
COMMIT = re.compile(r"[0-9a-f]{40}")  # a commit hash, as huggingface_hub writes it into refs/<revision>


def _say(level: int, msg: str) -> None:
    """Once per job under accelerate; plain logging before any Accelerator/PartialState exists."""
    try:
        _log.log(level, msg)
    except RuntimeError:
        logging.getLogger(__name__).log(level, msg)


def _info(msg: str) -> None:
    _say(logging.INFO, msg)


def _warn(msg: str) -> None:
    _say(logging.WARNING, msg)


# ---------------------------------------------------------------- where weights come from
@dataclass(frozen=True)
class Source:
    """Where a set of weights comes from and where its cached copy is, or would be."""

    key: str  # the recipe key that asks for them
    what: str  # "torchvision's ResNet18_Weights.IMAGENET1K_V1"
    url: str
    cache: Path  # the file in torch's hub cache, or the repo's folder in the Hugging Face cache
    file: str  # the file to name in the alternative (model.weights = "/path/to/<file>")
    repo: str = ""  # Hugging Face repo id, when they come from the hub
    revision: str = ""


def _url_source(key: str, what: str, url: str) -> Source:
    file = Path(urlparse(url).path).name
    return Source(key, what, url, Path(torch.hub.get_dir()) / "checkpoints" / file, file)


def _hub_source(key: str, what: str, repo_spec: str, file: str) -> Source:
    repo, _, revision = repo_spec.partition("@")
    cache = Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    return Source(key, what, f"{hf_constants.ENDPOINT}/{repo}", cache, file, repo, revision)


def _not_cached(src: Source, reason: str) -> WeightsError:
    if src.key == "model.pretrained":
        alternative = (f'train from a copy of {src.file}: model.pretrained = false, '
                       f'model.weights = "/path/to/{src.file}"')
    else:
        alternative = f'use a copy of {src.file}: model.weights = "/path/to/{src.file}"'
    if src.repo:
        revision = f" --revision {src.revision}" if src.revision else ""
        fetch = (f"Run `hf download {src.repo} {src.file}{revision}` where the hub is reachable ({src.url}) and "
                 f"copy the cache folder it fills to {src.cache}")
    else:
        fetch = f"Download {src.url} where the network is reachable and put it at {src.cache}"
    return WeightsError(f"{src.key}: cannot load {src.what}: not in the cache and cannot be downloaded ({reason}). "
                        f"{fetch}, or {alternative}.")


def _reason(e: BaseException) -> str:
    if isinstance(e, OfflineModeIsEnabled) or (isinstance(e, LocalEntryNotFoundError) and hf_constants.HF_HUB_OFFLINE):
        return "HF_HUB_OFFLINE is set"
    if isinstance(e, LocalEntryNotFoundError):
        return "the hub cannot be reached; HF_HUB_OFFLINE=1 stops trying at once"
    return str(e.reason) if isinstance(e, URLError) else str(e) or type(e).__name__


@contextlib.contextmanager
def _local_main_first() -> Iterator[None]:
    """Under several processes, the local main one fetches first and the others find its copy in the cache. The
    barrier after it is reached also when it fails, so the others are not left waiting."""
    state = PartialState() if is_initialized() else None
    if state is None or state.num_processes == 1:
        yield
        return
    if not state.is_local_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_local_main_process:
            state.wait_for_everyone()


@contextlib.contextmanager
def fetching(src: Source) -> Iterator[None]:
    """Around code that may download `src`: offline and not cached (urllib's URLError from torch, the hub's
    LocalEntryNotFoundError / OfflineModeIsEnabled) becomes one WeightsError that says what to do."""
    with _local_main_first():
        _check_cached_ref(src)
        try:
            yield
        except (URLError, ConnectionError, TimeoutError, LocalEntryNotFoundError) as e:
            raise _not_cached(src, _reason(e)) from None
        except HfHubHTTPError as e:  # no such repo or file, gated, ...: the hub's own words
            raise WeightsError(f"{src.key}: cannot load {src.what} from {src.url}: {e}") from None
        except RuntimeError as e:
            if "invalid hash value" not in str(e):
                raise
            raise WeightsError(f"{src.key}: the download of {src.what} from {src.url} is damaged ({e}); "
                               "try again") from None


def _check_cached_ref(src: Source) -> None:
    """A ref in the Hugging Face cache (refs/main) holds the commit it points to, 40 hex digits as
    huggingface_hub writes it; huggingface_hub reads anything else into a path (a raw ValueError for `../..`)."""
    revision = src.revision or "main"
    ref = src.cache / "refs" / revision
    if not src.repo or COMMIT.fullmatch(revision) or not ref.is_file():
        return
    text = ref.read_text(errors="replace")
    if not COMMIT.fullmatch(text):
        raise WeightsError(f"{src.key}: cannot load {src.what}: the Hugging Face cache folder {src.cache} is damaged "
                           f"or was changed by hand (refs/{revision} holds {text[:60]!r}, not a commit hash). Delete "
                           f"{src.cache} and download the weights again where the hub is reachable.")


def _check_cached_hash(src: Source) -> None:
    """A cached torch hub file against the SHA-256 prefix in its name (torch checks only its own downloads)."""
    match = torch.hub.HASH_REGEX.search(src.cache.name)
    if match is None or not src.cache.is_file():
        return
    digest = hashlib.sha256()
    with open(src.cache, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    expected, got = match.group(1), digest.hexdigest()
    if not got.startswith(expected):
        raise WeightsError(f"{src.key}: {src.cache} is not {src.what}: its SHA-256 begins {got[:len(expected)]}, "
                           f"its name says {expected}. Delete it to download it again from {src.url}, or put the "
                           "right file there.")


# ---------------------------------------------------------------- torchvision
def _torchvision_arch(cfg: ModelSpec) -> str:
    """The torchvision model whose weights `cfg` loads: the name itself, or gem_resnet's backbone."""
    if cfg.name == "gem_resnet":
        return str(cfg.args.get("backbone", inspect.signature(GeMResNet).parameters["backbone"].default))
    return cfg.name


def torchvision_weights(cfg: ModelSpec) -> torchvision.models.WeightsEnum:
    """The weights enum member `cfg.pretrained` names (true: DEFAULT)."""
    arch = _torchvision_arch(cfg)
    if cfg.name != "gem_resnet" and arch not in torchvision.models.list_models(module=torchvision.models):
        raise RecipeError(f"model.pretrained: {cfg.name} has no pretrained weights; set pretrained = false, or "
                          "start from a file with model.weights")
    enum = torchvision.models.get_model_weights(arch)
    if cfg.pretrained is True:
        return enum.DEFAULT
    names = [w.name for w in enum]
    if cfg.pretrained not in [*names, "DEFAULT"]:
        raise RecipeError(f"model.pretrained: {cfg.pretrained!r} is not a weights name of torchvision's {arch}; "
                          f"its weights: {', '.join(names)} (true picks DEFAULT = {enum.DEFAULT.name})")
    return enum[cfg.pretrained]


def torchvision_source(weights: torchvision.models.WeightsEnum) -> Source:
    return _url_source("model.pretrained", f"torchvision's {type(weights).__name__}.{weights.name}", weights.url)


def torchvision_state_dict(cfg: ModelSpec) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's pretrained tensors for `cfg` and what they are called. They come through torchvision's own
    builder (torch's hub cache, hash check, and the builder's key fixes such as densenet's), then leave it."""
    weights = torchvision_weights(cfg)
    src = torchvision_source(weights)
    with fetching(src):
        _check_cached_hash(src)
        reference = torchvision.models.get_model(_torchvision_arch(cfg), weights=weights)
    return reference.state_dict(), src.what


# ---------------------------------------------------------------- timm and the hub
def timm_source(cfg: ModelSpec) -> Source:
    pc = timm_models.pretrained_cfg(cfg.name)
    what = f"timm's {timm_models.timm_name(cfg.name)} weights"
    if pc.get("hf_hub_id"):
        return _hub_source("model.pretrained", what, pc["hf_hub_id"], pc.get("hf_hub_filename") or HUB_FILE)
    return _url_source("model.pretrained", what, pc["url"])


def hub_file(spec: str) -> Path:
    """`hf-hub:owner/repo[@revision]` -> the local copy of the repo's model.safetensors (downloaded into the
    Hugging Face cache when it is not there and the hub can be reached)."""
    repo_spec = spec[len(HUB_PREFIX):]
    try:
        validate_repo_id(repo_spec.partition("@")[0])
    except HFValidationError as e:
        raise RecipeError(f"model.weights: {spec}: not a hub repo 'hf-hub:owner/name[@revision]' ({e})") from None
    src = _hub_source("model.weights", f"{HUB_FILE} of {spec}", repo_spec, HUB_FILE)
    with fetching(src):
        return Path(hf_hub_download(src.repo, HUB_FILE, revision=src.revision or None))


def check_pretrained(cfg: ModelSpec) -> None:
    """RecipeError unless the model has the weights `cfg.pretrained` asks for (nothing is downloaded)."""
    if cfg.pretrained is False:
        return
    if not timm_models.is_timm(cfg.name):
        torchvision_weights(cfg)
        return
    arch = timm_models.timm_name(cfg.name).partition(".")[0]
    if isinstance(cfg.pretrained, str):
        raise RecipeError(f"model.pretrained: {cfg.pretrained!r}: a timm model takes its pretrained tag in its "
                          f"name (timm:{arch}.<tag>) and pretrained = true")
    if not timm_models.pretrained_cfg(cfg.name):
        raise RecipeError(f"model.pretrained: timm has no pretrained weights for {cfg.name}; "
                          f"`imgcls-models --timm '{arch}*' --pretrained` lists the names that have some")


def weights_file(spec: str) -> Path:
    """`model.weights` -> the file: itself, an artifact folder's model.safetensors, or a hub repo's."""
    file = hub_file(spec) if spec.startswith(HUB_PREFIX) else Path(spec)
    if file.is_dir():
        file = file / "model.safetensors"
        if not file.is_file():
            raise RecipeError(f"model.weights: {spec} is a directory without model.safetensors (not a model artifact)")
    elif not file.is_file():
        raise RecipeError(f"model.weights: {spec}: file not found")
    return file


