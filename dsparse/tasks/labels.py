"""How every label is stored, decoded, flipped and masked: one declaration per encoding.

A task's label is declared once, here, and every part of dsparse reads it from there:
the dataset writer encodes with it (refusing values the encoding would damage), the
loader decodes, flips and batches with it, and the losses and metrics use its validity
rule, so a model is never trained on pixels it is not evaluated on (or the reverse).
"No label here" lives inside the value itself:

==========  ===============  ========================================================
label       shard member     decoded array (numpy), batch tensor
==========  ===============  ========================================================
rgb         ``rgb.png``      uint8 [H, W, 3]; batch float [B, 3, H, W], normalised
seg         ``seg.png``      uint8 [H, W] class id, 255 = ignore; batch long [B, H, W]
depth       ``depth.png``    float32 [H, W] metres (or the dataset's unit), 0 = invalid;
                             16-bit, ``round(d * scale)`` with the manifest's ``scale``
normal      ``normal.png``   float32 [H, W, 3] unit vectors (x right, y down, z forward),
                             zero vector = invalid; 8-bit RGB ``(n + 1) * 127.5``
keypoint,   ``keypoint.png``   float32 [H, W] in [0, 1], negative = invalid; 16-bit,
edge        ``edge.png``     0 = invalid, else ``round(v * 65534) + 1``
==========  ===============  ========================================================

Encoders refuse what they would damage (a class id past the class count, a depth past
the 16-bit range, a heat value above 1, a non-unit normal, NaN) with a :class:`LabelError`
that says what to change. The one documented rescaling: float RGB in [0, 1] is stored as
``round(x * 255)``.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IGNORE_INDEX = 255
_U16_MAX = 65535


class LabelError(ValueError):
    """A label value its encoding would damage, or a decoded label that breaks the rules."""


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _describe_values(array: np.ndarray, bad: np.ndarray) -> str:
    values = np.unique(array[bad])
    shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
    return f"{int(bad.sum())} pixel(s) with value(s) {shown}"


def _finite_float(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "iuf":
        raise LabelError(f"{what} must be a numeric array, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise LabelError(f"{what} holds NaN or inf; mark invalid pixels with the encoding's invalid value")
    return array


@dataclass(frozen=True)
class LabelSpec:
    """The storage and semantics of one label (see the module table).

    A label of task ``t`` is the shard member ``<key>.<t>.<extension>``. Subclasses set
    ``channels`` (None for ``[H, W]``) and ``dtype`` (of the decoded array), and implement
    encode/decode. Parameters that vary per
    dataset (a depth scale) are dataclass fields, recorded in the manifest by
    :meth:`params` and restored by :meth:`with_params`.
    """

    extension: ClassVar[str] = "png"
    channels: ClassVar[int | None] = None
    dtype: ClassVar[str] = "float32"
    description: ClassVar[str] = ""
    fill: ClassVar[float] = 0.0  # the decoded "no label here" value, used to pad crops

    def encode(self, array: np.ndarray, num_classes: int | None = None) -> bytes:
        """Bytes stored in the shard; raises :class:`LabelError` instead of damaging values."""
        raise NotImplementedError

    def decode(self, data: bytes) -> np.ndarray:
        """The decoded array of the module table."""
        raise NotImplementedError

    def check_decoded(self, array: np.ndarray, num_classes: int | None = None) -> None:
        """Raise :class:`LabelError` if a decoded label breaks the dataset's rules."""

    def flip(self, array: np.ndarray) -> np.ndarray:
        """The label of the horizontally mirrored image."""
        return array[:, ::-1]

    def to_batch(self, stacked: np.ndarray) -> Tensor:
        """``[B, H, W(, C)]`` decoded labels -> the target tensor the task's loss takes."""
        tensor = torch.from_numpy(np.ascontiguousarray(stacked))
        return tensor.permute(0, 3, 1, 2).contiguous() if tensor.dim() == 4 else tensor.unsqueeze(1)

    def valid(self, target: Tensor) -> Tensor:
        """Bool mask of the pixels that carry a label."""
        raise NotImplementedError

    def params(self) -> dict:
        """Per-dataset parameters, stored in the manifest beside its ``description``."""
        return dataclasses.asdict(self)

    def with_params(self, params: dict) -> LabelSpec:
        """This spec with the manifest's parameters; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise LabelError(f"{type(self).__name__} has no parameter(s) {unknown}; it has {sorted(names)}")
        return dataclasses.replace(self, **params) if params else self

    def manifest_entry(self) -> dict:
        return {"description": self.describe(), **self.params()}

    def describe(self) -> str:
        return self.description

    def check_shape(self, array: np.ndarray, what: str) -> None:
        """Rank and channels of an array to encode, or of a decoded one."""
        rank = 2 if self.channels is None else 3
        if array.ndim != rank or (self.channels is not None and array.shape[-1] != self.channels):
            expected = "[H, W]" if self.channels is None else f"[H, W, {self.channels}]"
            raise LabelError(f"{what} has shape {tuple(array.shape)}, expected {expected}")


@dataclass(frozen=True)
class ImageSpec(LabelSpec):
    """The RGB input. uint8 (or integers in 0-255) as is; float in [0, 1] is rescaled by 255."""

    channels: ClassVar[int | None] = 3
    dtype: ClassVar[str] = "uint8"
    description: ClassVar[str] = "8-bit RGB; float input in [0, 1] is stored as round(x * 255)"

    def to_uint8(self, array: np.ndarray) -> np.ndarray:
        """The 8-bit image that is stored (the documented rescaling of float input)."""
        array = np.asarray(array)
        self.check_shape(array, "rgb")
        if array.dtype == np.uint8:
            return array
        values = _finite_float(array, "rgb")
        if array.dtype.kind == "f":
            bad = (values < 0) | (values > 1)
            if bad.any():
                raise LabelError(f"float rgb must lie in [0, 1] (it is stored as round(x * 255)); "
                                 f"{_describe_values(values, bad)}; pass uint8 for 0-255 images")
            return np.round(values * 255).astype(np.uint8)
        bad = (values < 0) | (values > 255)
        if bad.any():
            raise LabelError(f"integer rgb must lie in [0, 255]; {_describe_values(values, bad)}")
        return values.astype(np.uint8)

    def encode(self, array: np.ndarray, num_classes: int | None = None) -> bytes:
        return _png_bytes(self.to_uint8(array))

    def decode(self, data: bytes) -> np.ndarray:
        return _png_array(data)


@dataclass(frozen=True)
class ClassLabel(LabelSpec):
    """Class ids 0..num_classes-1, ``IGNORE_INDEX`` (255) = unlabelled; at most 255 classes."""

    dtype: ClassVar[str] = "uint8"
    ignore: ClassVar[int] = IGNORE_INDEX
    fill: ClassVar[float] = IGNORE_INDEX

    def describe(self) -> str:
        return f"8-bit class id, {self.ignore} = ignore"

    def _check_ids(self, values: np.ndarray, num_classes: int | None, what: str, fix: str) -> None:
        if num_classes is None:
            raise LabelError(f"{what}: class ids need the dataset's class list (num_classes)")
        bad = (values != self.ignore) & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise LabelError(f"{what}: {_describe_values(values, bad)} outside the {num_classes} classes "
                             f"(ids 0-{num_classes - 1}, {self.ignore} = ignore); {fix}")

    def encode(self, array: np.ndarray, num_classes: int | None = None) -> bytes:
        array = np.asarray(array)
        self.check_shape(array, "class label")
        if array.dtype.kind not in "iub":
            raise LabelError(f"class labels must be an integer array, got {array.dtype}; map them to "
                             f"ids 0-{(num_classes or 1) - 1} and {self.ignore} (ignore) and cast to an integer type")
        self._check_ids(array, num_classes, "class label",
                        "list every class (a background class too) or map unlabelled pixels to the ignore id")
        return _png_bytes(array.astype(np.uint8))

    def decode(self, data: bytes) -> np.ndarray:
        array = _png_array(data)
        if array.dtype != np.uint8:
            raise LabelError(f"class label PNG is {array.dtype}, expected 8-bit")
        return array

    def check_decoded(self, array: np.ndarray, num_classes: int | None = None) -> None:
        self._check_ids(array, num_classes, "class label", "the shard disagrees with manifest.json's classes; "
                        "rewrite the dataset (dsparse data convert or dsparse data synth)")

    def to_batch(self, stacked: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(stacked)).long()

    def valid(self, target: Tensor) -> Tensor:
        return target != self.ignore


@dataclass(frozen=True)
class DepthLabel(LabelSpec):
    """Non-negative depth (or inverse depth), 0 = invalid, as 16-bit ``round(d * scale)``.

    ``scale`` is stored units per label unit: 1000 keeps millimetres up to 65.535 m, 512 is
    Taskonomy's own 1/512 m (up to 128 m). A value past the 16-bit range, or so small
    that it would round to the invalid 0, is refused: choose another scale.
    """

    scale: float = 1000.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and np.isfinite(self.scale) and self.scale > 0):
            raise LabelError(f"depth scale must be a positive number, got {self.scale!r}")

    def describe(self) -> str:
        return f"16-bit, round(depth * {self.scale:g}), 0 = invalid"

    def encode(self, array: np.ndarray, num_classes: int | None = None) -> bytes:
        values = _finite_float(array, "depth")
        self.check_shape(values, "depth")
        if (values < 0).any():
            raise LabelError(f"depth must be >= 0 (0 marks invalid pixels); {_describe_values(values, values < 0)}")
        stored = np.round(values * self.scale)
        too_far = stored > _U16_MAX
        if too_far.any():
            raise LabelError(f"depth above {_U16_MAX / self.scale:g} (the 16-bit range at scale {self.scale:g}): "
                             f"{_describe_values(values, too_far)}; use a smaller depth scale")
        lost = (values > 0) & (stored == 0)
        if lost.any():
            raise LabelError(f"depth below the resolution 1/{self.scale:g} would become invalid: "
                             f"{_describe_values(values, lost)}; use a larger depth scale or set them to 0")
        return _png_bytes(stored.astype(np.uint16))

    def decode(self, data: bytes) -> np.ndarray:
        return (_png_array(data).astype(np.float32) / np.float32(self.scale)).astype(np.float32)

    def valid(self, target: Tensor) -> Tensor:
        return depth_valid(target)


@dataclass(frozen=True)
class NormalLabel(LabelSpec):
    """Unit surface normals (camera frame x right, y down, z forward); zero vector = invalid.

    Stored as 8-bit RGB ``round((n + 1) * 127.5)``; a zero vector becomes grey 128, which
    decodes to a near-zero vector and back to invalid. A flip negates x.
    """

    channels: ClassVar[int | None] = 3
    description: ClassVar[str] = ("8-bit RGB, n = v / 127.5 - 1 renormalised (x right, y down, z forward), "
                                  "grey 128 = invalid")
    tolerance: ClassVar[float] = 0.02

    def encode(self, array: np.ndarray, num_classes: int | None = None) -> bytes:
        values = _finite_float(array, "normal")
        self.check_shape(values, "normal")
        length = np.linalg.norm(values, axis=-1)
        bad = (length > 0) & (np.abs(length - 1) > self.tolerance)
        if bad.any():
            raise LabelError(f"normals must be unit vectors or zero (invalid); {int(bad.sum())} pixel(s) have "
                             f"length {float(length[bad].min()):.3g}-{float(length[bad].max()):.3g}; normalise them")
        return _png_bytes(np.round((values + 1) * 127.5).astype(np.uint8))

    def decode(self, data: bytes) -> np.ndarray:
        vectors = _png_array(data).astype(np.float32) / 127.5 - 1.0
        length = np.linalg.norm(vectors, axis=-1, keepdims=True)
        return np.where(length > 0.5, vectors / np.maximum(length, 1e-6), 0.0).astype(np.float32)

    def flip(self, array: np.ndarray) -> np.ndarray:
        return array[:, ::-1] * np.array([-1.0, 1.0, 1.0], dtype=np.float32)

    def valid(self, target: Tensor) -> Tensor:
        return normal_valid(target)


@dataclass(frozen=True)
class HeatLabel(LabelSpec):
    """A map in [0, 1] (keypoints, edges), negative = invalid, as 16-bit ``round(m * 65534) + 1``."""

    description: ClassVar[str] = "16-bit s: 0 = invalid, else the map value m = (s - 1) / 65534 in [0, 1]"
    fill: ClassVar[float] = -1.0

    def encode(self, array: np.ndarray, num_classes: int | None = None) -> bytes:
        values = _finite_float(array, "map")
        self.check_shape(values, "map")
        above = values > 1
        if above.any():
            raise LabelError(f"map values must lie in [0, 1] (negative = invalid); "
                             f"{_describe_values(values, above)}; rescale the map to [0, 1]")
        stored = np.where(values < 0, 0, np.round(values * (_U16_MAX - 1)) + 1)
        return _png_bytes(stored.astype(np.uint16))

    def decode(self, data: bytes) -> np.ndarray:
        raw = _png_array(data).astype(np.float32)
        return np.where(raw == 0, -1.0, (raw - 1) / (_U16_MAX - 1)).astype(np.float32)

    def valid(self, target: Tensor) -> Tensor:
        return heat_valid(target)


RGB = ImageSpec()


def seg_valid(target: Tensor) -> Tensor:
    """``[B, H, W]`` class indices -> bool ``[B, H, W]``; ``IGNORE_INDEX`` (255) is invalid."""
    return target != IGNORE_INDEX


def normal_valid(target: Tensor) -> Tensor:
    """``[B, 3, H, W]`` vectors -> bool ``[B, H, W]``; the all-zero vector is invalid."""
    return (target != 0).any(dim=1)


def depth_valid(target: Tensor) -> Tensor:
    """``[B, 1, H, W]`` metres -> bool, same shape; depth ``<= 0`` is invalid."""
    return target > 0


def heat_valid(target: Tensor) -> Tensor:
    """``[B, 1, H, W]`` keypoint/edge maps -> bool, same shape; negative is invalid."""
    return target >= 0


def check_shapes(
    task: str, pred: Tensor, target: Tensor, *, pred_channels: int, target_channels: int | None
) -> None:
    """Raise ``ValueError`` unless ``pred`` is ``[B, C, H, W]`` and ``target`` matches it.

    Checked explicitly because broadcasting would otherwise turn a ``[B, H, W]`` depth
    target against a ``[B, 1, H, W]`` prediction into a silent ``[B, B, H, W]`` error map.

    Args:
        task: task name, for the message.
        pred: the prediction.
        target: the label.
        pred_channels: expected ``C`` of the prediction.
        target_channels: expected channels of the target, or ``None`` when the target has
            no channel dimension (segmentation).
    """
    if pred.dim() != 4 or pred.shape[1] != pred_channels:
        raise ValueError(
            f"{task}: prediction must be [B, {pred_channels}, H, W], got {list(pred.shape)}"
        )
    channels = () if target_channels is None else (target_channels,)
    expected = (pred.shape[0], *channels, *pred.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{task}: target must have shape {list(expected)} to match the prediction "
            f"{list(pred.shape)}, got {list(target.shape)} (predictions are expected at "
            "label resolution)"
        )
