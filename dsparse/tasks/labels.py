"""How every label is stored, decoded, flipped and masked: one declaration per encoding.

A task's label is declared once, here, and every part of dsparse reads it from there:
the dataset writer turns values into the stored form with it (refusing values it would
damage), the loader flips, pads and batches stored labels with it and decodes whole
batches, and the losses and metrics use its validity rule, so a model is never trained
on pixels it is not evaluated on (or the reverse). How stored arrays become bytes (PNG,
or raw arrays compressed with zstd) is the dataset codec's job
(:mod:`dsparse.data.codecs`), the same for every label. "No label here" lives inside the
value itself:

==========  ==========================================  ================================
label       stored array                                batch tensor
==========  ==========================================  ================================
rgb         uint8 [H, W, 3]                             float [B, 3, H, W], normalised
seg         uint8 [H, W] class id, 255 = ignore         long [B, H, W]
depth       uint16 [H, W] ``round(d * scale)``, 0 =     float [B, 1, H, W] metres (or the
            invalid (``scale`` from the manifest)       dataset's unit), 0 = invalid
normal      uint8 [H, W, 3] ``round((n + 1) * 127.5)``  float [B, 3, H, W] unit vectors (x
            (grey 128 = invalid)                        right, y down, z forward), 0 = invalid
keypoint,   uint16 [H, W]: 0 = invalid, else            float [B, 1, H, W] in [0, 1],
edge        ``round(v * 65534) + 1``                    negative = invalid
==========  ==========================================  ================================

Encoders refuse what they would damage (a class id past the class count, a depth past
the 16-bit range, a heat value above 1, a non-unit normal, NaN) with a :class:`LabelError`
that says what to change. The one documented rescaling: float RGB in [0, 1] is stored as
``round(x * 255)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = 255
_U16_MAX = 65535


class LabelError(ValueError):
    """A label value its encoding would damage, or a decoded label that breaks the rules."""


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
    """The stored form and semantics of one label (see the module table).

    A label is kept in its *stored* form, a small integer array (``stored_dtype``), from
    the writer to the batch: the dataset codec only packs those arrays into bytes, the
    loader crops, flips and stacks them as they are, and :meth:`from_stored` turns a whole
    batch into the float targets in one vectorised step (in the loader worker, or on the
    GPU). Subclasses set ``channels`` (None for ``[H, W]``), ``stored_dtype``,
    ``stored_fill`` (the stored "no label here" value, used to pad crops) and implement
    :meth:`to_stored` / :meth:`from_stored`. Parameters that vary per dataset (a depth
    scale) are dataclass fields, recorded in the manifest by :meth:`params` and restored by
    :meth:`with_params`.
    """

    channels: ClassVar[int | None] = None
    stored_dtype: ClassVar[str] = "uint16"
    stored_fill: ClassVar[int] = 0
    description: ClassVar[str] = ""

    def to_stored(self, array: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        """The stored array; raises :class:`LabelError` instead of damaging values."""
        raise NotImplementedError

    def from_stored(self, stored: Tensor) -> Tensor:
        """``[B, H, W(, C)]`` stored labels (any device) -> the target tensor the task's loss takes."""
        raise NotImplementedError

    def decode_stored(self, stored: np.ndarray) -> np.ndarray:
        """One stored label -> its decoded value (``[H, W(, C)]``, the layout of the module
        table), through the same arithmetic as a batch."""
        target = self.from_stored(torch.from_numpy(np.array(stored)[None]))[0]
        return (target.permute(1, 2, 0) if target.dim() == 3 and self.channels else target.squeeze(0)
                if target.dim() == 3 else target).numpy()

    def check_stored(self, array: np.ndarray, num_classes: int | None = None) -> None:
        """Raise :class:`LabelError` if a stored label read from a shard breaks the dataset's rules."""

    def flip_stored(self, array: np.ndarray) -> np.ndarray:
        """The stored label of the horizontally mirrored image."""
        return array[:, ::-1]

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

    def stored_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        return tuple(image_size) if self.channels is None else (*image_size, self.channels)

    def check_shape(self, array: np.ndarray, what: str) -> None:
        """Rank and channels of an array to encode, or of a stored one read back."""
        rank = 2 if self.channels is None else 3
        if array.ndim != rank or (self.channels is not None and array.shape[-1] != self.channels):
            expected = "[H, W]" if self.channels is None else f"[H, W, {self.channels}]"
            raise LabelError(f"{what} has shape {tuple(array.shape)}, expected {expected}")


def _channels_first(batch: Tensor) -> Tensor:
    """``[B, H, W, C]`` -> float ``[B, C, H, W]`` (contiguous); ``[B, H, W]`` -> ``[B, 1, H, W]``.
    One pass: the copy converts and transposes at once (5x faster than permute, then
    contiguous, then float), and the callers go on in place."""
    if batch.dim() == 3:
        return batch.unsqueeze(1).float()
    out = torch.empty((batch.shape[0], batch.shape[3], *batch.shape[1:3]), dtype=torch.float32, device=batch.device)
    return out.copy_(batch.permute(0, 3, 1, 2))


@dataclass(frozen=True)
class ImageSpec(LabelSpec):
    """The RGB input. uint8 (or integers in 0-255) as is; float in [0, 1] is rescaled by 255."""

    channels: ClassVar[int | None] = 3
    stored_dtype: ClassVar[str] = "uint8"
    description: ClassVar[str] = "8-bit RGB; float input in [0, 1] is stored as round(x * 255)"

    def to_stored(self, array: np.ndarray, num_classes: int | None = None) -> np.ndarray:
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

    def from_stored(self, stored: Tensor) -> Tensor:
        """``[B, H, W, 3]`` uint8 -> float ``[B, 3, H, W]`` in [0, 1] (normalised by the caller)."""
        return _channels_first(stored).div_(255.0)


@dataclass(frozen=True)
class ClassLabel(LabelSpec):
    """Class ids 0..num_classes-1, ``IGNORE_INDEX`` (255) = unlabelled; at most 255 classes."""

    stored_dtype: ClassVar[str] = "uint8"
    stored_fill: ClassVar[int] = IGNORE_INDEX
    ignore: ClassVar[int] = IGNORE_INDEX

    def describe(self) -> str:
        return f"8-bit class id, {self.ignore} = ignore"

    def _check_ids(self, values: np.ndarray, num_classes: int | None, what: str, fix: str) -> None:
        if num_classes is None:
            raise LabelError(f"{what}: class ids need the dataset's class list (num_classes)")
        bad = (values != self.ignore) & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise LabelError(f"{what}: {_describe_values(values, bad)} outside the {num_classes} classes "
                             f"(ids 0-{num_classes - 1}, {self.ignore} = ignore); {fix}")

    def to_stored(self, array: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        array = np.asarray(array)
        self.check_shape(array, "class label")
        if array.dtype.kind not in "iub":
            raise LabelError(f"class labels must be an integer array, got {array.dtype}; map them to "
                             f"ids 0-{(num_classes or 1) - 1} and {self.ignore} (ignore) and cast to an integer type")
        self._check_ids(array, num_classes, "class label",
                        "list every class (a background class too) or map unlabelled pixels to the ignore id")
        return array.astype(np.uint8)

    def check_stored(self, array: np.ndarray, num_classes: int | None = None) -> None:
        self._check_ids(array, num_classes, "class label", "the shard disagrees with manifest.json's classes; "
                        "rewrite the dataset (dsparse data convert or dsparse data synth)")

    def from_stored(self, stored: Tensor) -> Tensor:
        return stored.long()

    def decode_stored(self, stored: np.ndarray) -> np.ndarray:
        return np.asarray(stored)

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

    def to_stored(self, array: np.ndarray, num_classes: int | None = None) -> np.ndarray:
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
        return stored.astype(np.uint16)

    def from_stored(self, stored: Tensor) -> Tensor:
        return _channels_first(stored).div_(np.float32(self.scale).item())

    def valid(self, target: Tensor) -> Tensor:
        return depth_valid(target)


@dataclass(frozen=True)
class NormalLabel(LabelSpec):
    """Unit surface normals (camera frame x right, y down, z forward); zero vector = invalid.

    Stored as 8-bit RGB ``round((n + 1) * 127.5)``; a zero vector becomes grey 128, which
    decodes to a near-zero vector and back to invalid. A flip negates x: stored ``255 - s``.
    """

    channels: ClassVar[int | None] = 3
    stored_dtype: ClassVar[str] = "uint8"
    stored_fill: ClassVar[int] = 128
    description: ClassVar[str] = ("8-bit RGB, n = v / 127.5 - 1 renormalised (x right, y down, z forward), "
                                  "grey 128 = invalid")
    tolerance: ClassVar[float] = 0.02

    def to_stored(self, array: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        values = _finite_float(array, "normal")
        self.check_shape(values, "normal")
        length = np.linalg.norm(values, axis=-1)
        bad = (length > 0) & (np.abs(length - 1) > self.tolerance)
        if bad.any():
            raise LabelError(f"normals must be unit vectors or zero (invalid); {int(bad.sum())} pixel(s) have "
                             f"length {float(length[bad].min()):.3g}-{float(length[bad].max()):.3g}; normalise them")
        return np.round((values + 1) * 127.5).astype(np.uint8)

    def from_stored(self, stored: Tensor) -> Tensor:
        vectors = _channels_first(stored).div_(127.5).sub_(1.0)
        length = vectors.square().sum(1, keepdim=True).sqrt_()
        valid = length > 0.5
        return vectors.div_(length.clamp_min_(1e-6)).mul_(valid)  # invalid: 0 (or -0.0; == 0 all the same)

    def flip_stored(self, array: np.ndarray) -> np.ndarray:
        flipped = array[:, ::-1].copy()
        flipped[..., 0] = 255 - flipped[..., 0]
        return flipped

    def valid(self, target: Tensor) -> Tensor:
        return normal_valid(target)


@dataclass(frozen=True)
class HeatLabel(LabelSpec):
    """A map in [0, 1] (keypoints, edges), negative = invalid, as 16-bit ``round(m * 65534) + 1``."""

    description: ClassVar[str] = "16-bit s: 0 = invalid, else the map value m = (s - 1) / 65534 in [0, 1]"

    def to_stored(self, array: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        values = _finite_float(array, "map")
        self.check_shape(values, "map")
        above = values > 1
        if above.any():
            raise LabelError(f"map values must lie in [0, 1] (negative = invalid); "
                             f"{_describe_values(values, above)}; rescale the map to [0, 1]")
        return np.where(values < 0, 0, np.round(values * (_U16_MAX - 1)) + 1).astype(np.uint16)

    def from_stored(self, stored: Tensor) -> Tensor:
        raw = _channels_first(stored)
        invalid = raw == 0
        return raw.sub_(1).div_(_U16_MAX - 1).masked_fill_(invalid, -1.0)

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
