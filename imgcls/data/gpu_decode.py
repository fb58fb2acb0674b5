"""`data.decode = "gpu"`: training JPEGs decoded by nvJPEG on the model's CUDA device, a batch in one call.

    pixels = EncodedImages(split, pre, size)        # the train split, data.cache = "none"
    batch, labels, positions = pixels.__getitems__([3, 1, 4])   # in DataLoader workers: bytes, no decode
    images = decode_batch(batch, device, pixels.size, pre)      # uint8 [B, C, H, W] on the device

Where the CPU would spend ~2 ms per 224-px JPEG in DataLoader workers, workers here only read the file's bytes
and look at its header; the main process hands the whole batch to `torchcodec.decoders.decode_jpeg(...,
device="cuda")` and resizes on the device. A file nvJPEG cannot take as it is (not a JPEG, a CMYK JPEG, an EXIF
orientation other than "upright", which nvJPEG does not apply) is decoded and framed on the CPU in the worker,
as `data.cache = "none"` does, and travels as pixels.

What differs from the CPU path, by design: only the train split is decoded on the GPU (val/test keep the CPU
pixels that imgcls-predict and the ONNX export see, so the parity guarantee holds), and its resize is torch's
antialiased interpolation on the device rather than PIL's, so training pixels may differ from the CPU path's by
resampling rounding (at a working size equal to the image's size there is no resize, and torchcodec's CPU
libjpeg-turbo gives PIL's pixels exactly: tested). Augmentation is unchanged: per-sample parameters of
(seed, epoch, sample position).

Requirements, checked before training with the fix in the message (`check_gpu_decode`): a CUDA device,
`data.cache = "none"`, and torchcodec (`pip install "imgcls[gpu-decode]"`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from imgcls.recipe import DataConfig
from imgcls.errors import RecipeError
from imgcls.data.split import Split
from imgcls.data.store import Framer, _Batches
from imgcls.data.transforms import Preprocess, ResizeCover

NVJPEG_MODES = ("L", "RGB")  # JPEG colour modes nvJPEG decodes as PIL would (not CMYK, not YCCK)


@dataclass
class EncodedBatch:
    """A batch as it leaves the workers: per item, the JPEG's bytes (decoded on the device) or uint8 pixels
    [C, H, W] at the working size (decoded on the CPU). No `.to()`: accelerate leaves it on the CPU, where
    nvJPEG wants its input."""

    items: list[bytes | torch.Tensor]

    def __len__(self) -> int:
        return len(self.items)


def nvjpeg_can_take(data: bytes) -> bool:
    """A baseline/progressive JPEG in L or RGB, upright by its EXIF orientation (header read only)."""
    if data[:2] != b"\xff\xd8":
        return False
    with Image.open(io.BytesIO(data)) as im:
        return im.format == "JPEG" and im.mode in NVJPEG_MODES and im.getexif().get(0x0112, 1) == 1


class EncodedImages(_Batches):
    """The train split for data.decode = "gpu": workers read bytes; `decode_batch` decodes on the device."""

    def __init__(self, split: Split, pre: Preprocess, size: tuple[int, int] | None = None):
        if not callable(getattr(split.reader, "raw", None)):
            raise RecipeError(f'data.decode = "gpu": the {type(split.reader).__name__} source cannot hand over '
                              f'encoded bytes; use data.decode = "cpu"')
        self.framer = Framer(split, pre, "train", size)
        self.labels = self.framer.labels()

    @property
    def size(self) -> tuple[int, int]:
        return self.framer.shape[1:]

    def __getitems__(self, positions: list[int]) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(positions, dtype=torch.int64)
        items: list[bytes | torch.Tensor] = []
        for k in index.tolist():
            data = self.framer.split.reader.raw(self.framer.split.indices[k])
            items.append(data if nvjpeg_can_take(data) else self.framer(k))
        return EncodedBatch(items), self.labels.index_select(0, index), index

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, labels, _ = self.__getitems__(positions.tolist())
        return decode_batch(encoded, torch.device("cpu"), self.size, self.framer.pre), labels


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [1, H, W] of uint8 [3, H, W], PIL's convert("L") in its own fixed point (ITU-R 601-2 weights).
    Decoding straight to gray gives the JPEG's Y plane, which is up to ~13 levels from PIL's for colour JPEGs."""
    r, g, b = rgb.int().unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def decode_batch(batch: EncodedBatch, device: torch.device, size: tuple[int, int], pre: Preprocess) -> torch.Tensor:
    """uint8 [B, C, H, W] on `device`: the JPEG items decoded there in one call and resized to `size`."""
    from torchcodec.decoders import decode_jpeg

    jpegs = [k for k, item in enumerate(batch.items) if isinstance(item, bytes)]
    out = torch.empty((len(batch), pre.channels, *size), dtype=torch.uint8, device=device)
    if jpegs:
        decoded = decode_jpeg([batch.items[k] for k in jpegs], mode="RGB", device=device)
        for k, image in zip(jpegs, decoded):
            image = luma(image) if pre.channels == 1 else image
            out[k] = image if tuple(image.shape[-2:]) == tuple(size) else \
                v2.functional.center_crop(ResizeCover(size, pre.interp)(image), list(size))  # the store's train frame
    for k, item in enumerate(batch.items):
        if not isinstance(item, bytes):
            out[k] = item.to(device, non_blocking=True)
    return out


def check_gpu_decode(cfg: DataConfig, device: torch.device) -> None:
    """data.decode = "gpu" before anything starts: a CUDA device, cache "none", torchcodec importable."""
    if cfg.decode != "gpu":
        return
    if device.type != "cuda":
        why = "no CUDA device here (torch.cuda.is_available() is False)" if not torch.cuda.is_available() else \
            "accelerate was told to compute on the CPU (--cpu or ACCELERATE_USE_CPU)"
        raise RecipeError(f'data.decode = "gpu" decodes training JPEGs with nvJPEG on a CUDA device, and this '
                          f'process computes on {device.type}: {why}. Use data.decode = "cpu" (the default: '
                          f'DataLoader workers decode), or run on a CUDA machine.')
    try:
        import torchcodec.decoders  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        raise RecipeError(f'data.decode = "gpu" needs torchcodec, which did not load ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""}); install it with pip install '
                          f'"imgcls[gpu-decode]" (a torchcodec matching your torch), or use data.decode = "cpu"') \
            from None
