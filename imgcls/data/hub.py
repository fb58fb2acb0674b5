"""The hub source: a Hugging Face hub dataset, or a local folder in hub layout, through `datasets`.

Failures are told apart by exception type (what `datasets` 5 and `huggingface_hub` 2 raise, checked with
HF_HUB_OFFLINE=1 and with the hub unreachable): unreachable (`datasets` wraps it in the builtin
ConnectionError), not found or not accessible, a wrong config; anything else is a bug and propagates.

An unreachable hub used to cost 23 s before our error: huggingface_hub retries a failed connection 5 times
(waits of 1, 2, 4, 8, 8 s) whatever the timeouts. So, unless offline mode is on, one HEAD request to the
endpoint (PROBE_TIMEOUT_S) comes first; if it fails, the dataset is loaded from the local cache only, as
with HF_HUB_OFFLINE=1, for this load alone.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path

from PIL import Image

from imgcls.data.images import check_image, open_image
from imgcls.recipe import DataConfig
from imgcls.data.split import Split
from imgcls.errors import DataError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


class HubRows:
    """Item i is row i of a `datasets.Dataset` as `load_dataset` returns it (no indices mapping), read from its
    arrow table: ~3 us a row instead of ~55 us through `Dataset.__getitem__`. Pickles by the dataset's arrow
    file paths (a few kB), so DataLoader workers reopen it lazily."""

    def __init__(self, ds, image_col: str, name: str, dataset: str):
        self.ds, self.image_col, self.name, self.dataset = ds, image_col, name, dataset
        self._column = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_column": None}

    def _source(self, i: int) -> bytes | str:
        if self._column is None:
            self._column = self.ds.data.column(self.image_col)
        cell = self._column[i]
        return cell["bytes"].as_py() or cell["path"].as_py()

    def open(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image:
        return open_image(self._source(i), draft)

    def describe(self, i: int) -> str:
        return f"{self.dataset} [{self.name}] row {i}"

    def check(self, i: int) -> None:
        check_image(self._source(i))

    def raw(self, i: int) -> bytes:
        source = self._source(i)
        return source if isinstance(source, bytes) else Path(source).read_bytes()


# ---------------------------------------------------------------- errors by type
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client huggingface_hub uses (requests' are OSErrors)."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(client).TransportError)
    return tuple(errors)


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError

    # datasets raises the builtin ConnectionError (OfflineModeIsEnabled is one too) for an unreachable hub
    return (ConnectionError, TimeoutError, LocalEntryNotFoundError, *_transport_errors()[1:])


def _not_found_errors() -> tuple[type[BaseException], ...]:
    from datasets.exceptions import DatasetsError
    from huggingface_hub.errors import HfHubHTTPError

    # DatasetNotFoundError (also gated), DataFilesNotFoundError and EmptyDatasetError are FileNotFoundErrors;
    # a wrong config name is a ValueError ("BuilderConfig 'x' not found. Available: [...]")
    return (FileNotFoundError, DatasetsError, HfHubHTTPError, ValueError)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _hub_unreachable(cfg: DataConfig, reason: str) -> DataError:
    return DataError(
        f"data.dataset = {cfg.dataset!r}: could not load it from the Hugging Face hub and it is not in the local "
        f"cache ({reason}). If this machine is offline, point the recipe at a local copy: a folder in hub layout "
        f"(parquet files + README.md), e.g. `data.dataset=\"/data/mnist\"`; or an image folder with "
        f"`data.source=\"folder\" data.root=\"/data/imgs\"`; or run once where the hub is reachable so the dataset "
        f"is cached, then use HF_HUB_OFFLINE=1."
    )


# ---------------------------------------------------------------- reaching the hub
def _offline() -> bool:
    import datasets
    import huggingface_hub

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str:
    """'' when the hub endpoint answers one HEAD request within `timeout` s (any HTTP status), else why not.
    Through huggingface_hub's own session, so proxies and certificates are the ones the load would use."""
    import datasets
    from huggingface_hub.utils import get_session

    endpoint = datasets.config.HF_ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except _transport_errors() as e:
        return f"{endpoint} did not answer: {_first_line(e)}"
    return ""


@contextlib.contextmanager
def _cache_only():
    """HF_HUB_OFFLINE=1 for one load: both libraries read these flags when called, not only at import."""
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _log_through_the_application() -> None:
    """`datasets` and `huggingface_hub` give their loggers a stderr handler of their own and also pass each
    record on to the root logger: once the application logs through the root logger (imgcls-train does),
    every warning prints twice. Keep the application's path (its format, and train.log)."""
    if not logging.getLogger().handlers:
        return
    for name in ("datasets", "huggingface_hub"):
        library = logging.getLogger(name)
        for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
            library.removeHandler(handler)


def _load(cfg: DataConfig, path: str, local: bool):
    import datasets

    kwargs = {"name": cfg.config or None, "revision": cfg.revision or None}
    reason = "" if local or _offline() else unreachable_reason()
    try:
        with _cache_only() if reason else contextlib.nullcontext():
            dsd = datasets.load_dataset(path, **kwargs)
    except _unreachable_errors() as e:
        raise _hub_unreachable(cfg, reason or _first_line(e)) from None
    except _not_found_errors() as e:
        raise DataError(f"data.dataset = {cfg.dataset!r}: {_first_line(e).rstrip('.')}. Check data.dataset, "
                        f"data.config and data.revision; a gated or private dataset needs `hf auth login` first."
                        ) from None
    if reason:
        log.warning("the Hugging Face hub is not reachable (%s): loaded %r from the local cache, as with "
                    "HF_HUB_OFFLINE=1", reason, cfg.dataset)
    return dsd


# ---------------------------------------------------------------- splits
def streaming_refusal(cfg: DataConfig) -> DataError:
    """data.streaming = true, refused: a `datasets` streaming dataset cannot resume exactly."""
    name = cfg.dataset or "the dataset"
    return DataError(
        f"data.streaming = true: imgcls resumes every run bit-exactly, and a `datasets` streaming dataset cannot: "
        f"its state_dict keeps the shard and example position but not the shuffle buffer's content (on load "
        f"\"the shuffle buffer will be refilled before starting to yield new examples\"), so a resumed run sees "
        f"other samples than the run it continues. To train on {name} without downloading it on every training "
        f"machine, convert it once where it fits (`imgcls-data shard RECIPE OUT` writes Parquet shards and a "
        f"manifest), put OUT where the training machines can read it (a folder, an https:// URL, or a hub "
        f"dataset repo: hf://datasets/<owner>/<repo>/<path>) and train with data.source = \"shards\" and "
        f"data.root = that place: each process streams its shards through a bounded local cache and resumes "
        f"exactly. Or remove data.streaming to download {name} into the datasets cache.")


def load_hub(cfg: DataConfig) -> tuple[dict[str, Split], list[str]]:
    """Splits of a hub dataset or local hub-layout folder, plus class names from its ClassLabel."""
    import datasets

    _log_through_the_application()
    local = Path(cfg.dataset).expanduser()
    looks_local = cfg.dataset.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise DataError(f"data.dataset = {cfg.dataset!r}: no such folder")
    dsd = _load(cfg, str(local) if looks_local else cfg.dataset, looks_local)
    first = next(iter(dsd.values()))
    image_col, label_col = _hub_columns(cfg, first.features)
    labels = {split_name: [int(v) for v in ds[label_col]] for split_name, ds in dsd.items()}
    for split_name, values in list(labels.items()):
        missing = sum(v < 0 for v in values)
        if missing and missing == len(values):  # a test split whose answers are withheld (imagenet-1k's)
            log.warning("data: split %r of %s has no labels (label -1 on all %d rows, as a hub test split whose "
                         "answers are withheld): it is left out, so this run has no %s result", split_name,
                         cfg.dataset, len(values), split_name)
            del labels[split_name]
        elif missing:
            raise DataError(f"data: split {split_name!r} of {cfg.dataset} has {missing} of {len(values)} rows without "
                            "a label (-1); label every row, or leave the split out of the dataset")
    names = _hub_class_names(first, label_col, labels)
    splits = {}
    for split_name, values in labels.items():
        if max(values, default=0) >= len(names):
            raise DataError(f"data: split {split_name!r} of {cfg.dataset} has label {max(values)}, but the "
                            f"{label_col!r} column names {len(names)} classes; fix the labels or the class names")
        rows = dsd[split_name].cast_column(image_col, datasets.Image(decode=False))
        splits[split_name] = Split(split_name, values, HubRows(rows, image_col, split_name, cfg.dataset))
    return splits, names


def _hub_columns(cfg: DataConfig, features) -> tuple[str, str]:
    import datasets

    cols = list(features)
    image_col = cfg.image_column or next((c for c in cols if isinstance(features[c], datasets.Image)), "")
    label_col = cfg.label_column or next((c for c in cols if isinstance(features[c], datasets.ClassLabel)), "")
    label_col = label_col or next((c for c in ("label", "labels", "target") if c in cols), "")
    for key, col in (("image_column", image_col), ("label_column", label_col)):
        if not col or col not in cols:
            raise DataError(f"data.{key}: {f'{col!r} not found' if col else 'no column found'} in {cfg.dataset!r}; "
                            f"its columns are {cols}. "
                            f"Set data.{key} = \"<column>\".")
    return image_col, label_col


def _hub_class_names(ds, label_col: str, labels: dict[str, list[int]]) -> list[str]:
    """The ClassLabel's names; for plain integer labels "0".."K-1", K = the largest label of any split + 1."""
    import datasets

    feature = ds.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(max((max(v, default=0) for v in labels.values()), default=0) + 1)]
