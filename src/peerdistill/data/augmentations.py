"""A registry of batched augmentations that turn a normalised view into another normalised batch.

Good-DA-in-KD (Wang et al., NeurIPS 2022; spec §5.2) compares augmentations by adding
``x_aug = DA(x)`` to every step, where ``x`` is the standard (crop + flip) view. Each augmentation here
takes that normalised view and the step's :class:`~peerdistill.data.views.ViewContext` (its seeded
generator ``ctx.gen``; its no-grad teacher / peer logits for pickers) and returns an :class:`Augmented`
batch. Pixel-space operations (crop with zero padding, AutoAugment) run on the uint8 images recovered from the
view by inverting ``ctx.normalize`` exactly, as the reference code denormalises to uint8 before
torchvision's transforms. Every registered mixer (``mixup``, ``cutmix``, ``cutmixpick``, ...) is usable
too: its mixed batch is the augmented batch and its record says how the labels mix.

    aug = build_augmentation("cutout")
    out = aug(view.x, ctx)          # out.x: (B, C, H, W) normalised; out.mix: MixRecord | None
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import PeerdistillError, nearest
from ..params import NonNegativeInt
from ..registry import Registry, with_defaults
from .batch_augment import cutout, random_crop, random_flip
from .host import host_values, to_device
from .mix import MIXERS, CutMix, Mixer, MixRecord, MixUp
from .pick import CutMixPick
from .policy import kornia_auto, seeded
from .views import ViewContext



@dataclass
class Augmented:
    """An augmented batch.

    Attributes:
        x: (B', C, H, W) normalised images (B' = B except for pickers with ``n_pick`` != B).
        mix: how row j mixes rows of the input view (``None``: row j is input row j, transformed).
        teacher_logits: (B', K) the teacher's logits on ``x`` when the augmentation computed them anyway
            (a picker scoring by the teacher), so a caller need not run the teacher again.
    """

    x: Tensor
    mix: MixRecord | None = None
    teacher_logits: Tensor | None = None


class Augmentation:
    """Base class: ``aug(x, ctx) -> Augmented``. Subclasses implement :meth:`apply` (normalised in,
    normalised out) or set ``on_uint8 = True`` and implement :meth:`apply_uint8` (uint8 in and out)."""

    on_uint8: bool = False

    def __init__(self) -> None:
        self.image_size: tuple[int, int] | None = None
        self.crop_padding: int | None = None

    def setup(self, image_size: tuple[int, int], crop_padding: int | None = None) -> None:
        """The data's image size and standard crop padding (``None``: unknown), for size-dependent defaults."""
        self.image_size, self.crop_padding = tuple(image_size), crop_padding

    def __call__(self, x: Tensor, ctx: ViewContext) -> Augmented:
        if self.on_uint8:
            return Augmented(ctx.normalize(self.apply_uint8(to_uint8(x, ctx), ctx)))
        return self.apply(x, ctx)

    def apply(self, x: Tensor, ctx: ViewContext) -> Augmented:
        raise NotImplementedError

    def apply_uint8(self, images: Tensor, ctx: ViewContext) -> Tensor:
        raise NotImplementedError

    def size(self, x: Tensor) -> tuple[int, int]:
        return self.image_size or (x.shape[-2], x.shape[-1])


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


def to_uint8(x: Tensor, ctx: ViewContext) -> Tensor:
    """The uint8 images behind a normalised view: the exact inverse of ``ctx.normalize`` (an affine map
    per channel, probed at 0 and 255), rounded. The reference code truncates instead (``.type(uint8)``
    after ``* 255``), which darkens some pixels by one level; rounding is the exact inverse."""
    c = x.shape[1]
    probe = torch.tensor([0, 255], dtype=torch.uint8, device=x.device).view(2, 1, 1, 1).expand(2, c, 1, 1)
    lo, hi = ctx.normalize(probe.contiguous()).float()  # (C, 1, 1) each
    return ((x.float() - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)


@AUGMENTATIONS.register("identity")
class Identity(Augmentation):
    """x_aug = x: the same images again (a second student forward, its own BN batch)."""

    def apply(self, x: Tensor, ctx: ViewContext) -> Augmented:
        return Augmented(x)


@AUGMENTATIONS.register("flip")
class Flip(Augmentation):
    """Horizontal flip of each image with probability 0.5 (a pixel permutation: done on the view itself).

    Args:
        same_on_batch: one coin for the whole batch, as the reference code's torchvision transform on
            the batch tensor does (default: one coin per image, the usual per-image augmentation).
    """

    def __init__(self, same_on_batch: bool = False) -> None:
        super().__init__()
        self.same_on_batch = same_on_batch

    def apply(self, x: Tensor, ctx: ViewContext) -> Augmented:
        if self.same_on_batch:
            return Augmented(x.flip(3) if host_values(torch.rand((), generator=ctx.gen)) < 0.5 else x)
        return Augmented(random_flip(x, ctx.gen, ctx.shard))


@AUGMENTATIONS.register("crop_flip", aliases=("crop+flip",))
class CropFlip(Augmentation):
    """Random crop of the original size from the zero-padded image, then a horizontal flip.

    Args:
        padding: crop padding; ``None``: the dataset's standard padding when known, else ``H // 8``
            (the reference code's 4 at 32 px, 8 at 64 px, 28 at 224 px).
        same_on_batch: one crop offset and one flip coin for the whole batch (the reference code's
            torchvision transform on the batch tensor); default per image.
    """

    on_uint8 = True

    def __init__(self, padding: NonNegativeInt | None = None, same_on_batch: bool = False) -> None:
        super().__init__()
        self.padding, self.same_on_batch = padding, same_on_batch

    def pad(self, images: Tensor) -> int:
        if self.padding is not None:
            return self.padding
        return self.crop_padding if self.crop_padding is not None else max(1, self.size(images)[0] // 8)

    def apply_uint8(self, images: Tensor, ctx: ViewContext) -> Tensor:
        pad, gen = self.pad(images), ctx.gen
        if not self.same_on_batch:
            return random_flip(random_crop(images, pad, gen, ctx.shard), gen, ctx.shard)
        oy, ox = host_values(torch.randint(0, 2 * pad + 1, (2,), generator=gen))
        h, w = images.shape[-2:]
        out = torch.nn.functional.pad(images, (pad,) * 4)[..., oy:oy + h, ox:ox + w]
        return out.flip(3) if host_values(torch.rand((), generator=gen)) < 0.5 else out


@AUGMENTATIONS.register("cutout")
class Cutout(Augmentation):
    """Cutout (DeVries & Taylor 2017): one ``length`` x ``length`` hole, zero in normalised space, centred
    uniformly and clipped to the image.

    Args:
        length: hole side; 0: ``H // 4``, which gives the reference code's 8 on CIFAR-100 (32 px),
            16 on Tiny-ImageNet (64 px), 56 on ImageNet (224 px) and 7 on Fashion-MNIST (28 px).
        same_on_batch: one hole location for the whole batch, as the reference code's ``cutout``
            (Good-DA ``helper/loops.py``: one (H, W) mask multiplies the batch); the default, so the
            paper's list measures what its code did. ``false``: a location per image (DeVries & Taylor's
            per-image transform, and this library's ``data.cutout``).
    """

    def __init__(self, length: NonNegativeInt = 0, same_on_batch: bool = True) -> None:
        super().__init__()
        self.length, self.same_on_batch = length, same_on_batch

    def apply(self, x: Tensor, ctx: ViewContext) -> Augmented:
        size = self.length or self.size(x)[0] // 4
        if not self.same_on_batch:
            return Augmented(cutout(x, size, ctx.gen, ctx.shard))
        # one draw, the same on every rank under torchrun: one location for the global batch
        mask = cutout(torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device), size, ctx.gen)
        return Augmented(x * mask)


@AUGMENTATIONS.register("autoaugment")
class AutoAugment(Augmentation):
    """AutoAugment (Cubuk et al. 2019) with kornia's CIFAR10 or IMAGENET policy on the uint8 batch.

    kornia picks one sub-policy per call and draws each operation's application and magnitude per
    image; it draws from torch's global RNG, so each call runs under a seed drawn from the step's
    generator and the global RNG state is restored afterwards (resume stays exact). Grey images are
    replicated to RGB for the call (every operation then acts alike on the three channels, so the
    result is the grey image's, as torchvision's own grey handling gives).

    Args:
        policy: ``cifar10``, ``imagenet``, or ``auto`` (CIFAR10 up to 32 px, IMAGENET above, as the
            reference code: CIFAR10 for CIFAR, IMAGENET for Tiny-ImageNet / ImageNet).
        select: ``batch``: one sub-policy for the whole batch (kornia's design, and the reference code,
            whose torchvision transform on the batch tensor also draws once); ``image``: a sub-policy
            per image (the usual per-image pipeline; one kornia call per distinct sub-policy, slower).
    """

    on_uint8 = True

    def __init__(self, policy: Literal["auto", "cifar10", "imagenet"] = "auto",
                 select: Literal["batch", "image"] = "batch") -> None:
        super().__init__()
        self.policy, self.select = policy, select
        self._ops: dict[str, Any] = {}
        _kornia()  # a missing extra is reported when the augmentation is configured, not mid-run

    def apply_uint8(self, images: Tensor, ctx: ViewContext) -> Tensor:
        policy = self.policy if self.policy != "auto" else ("cifar10" if self.size(images)[0] <= 32 else "imagenet")
        x = images.float().div_(255.0)
        c = x.shape[1]
        if c == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.select == "batch":
            out = self._call(self._op(policy, None), x, ctx)
        else:
            out = self._per_image(policy, x, ctx)
        return out[:, :c].mul(255.0).round_().clamp_(0, 255).to(torch.uint8)

    def _per_image(self, policy: str, x: Tensor, ctx: ViewContext) -> Tensor:
        n = len(_policy_table(policy))
        which = torch.randint(0, n, (x.shape[0],), generator=ctx.gen)  # (B,) host draws
        out = torch.empty_like(x)
        for k in sorted(set(host_values(which))):
            rows = to_device((which == k).nonzero().flatten(), x.device)
            out[rows] = self._call(self._op(policy, k), x[rows], ctx)
        return out

    def _op(self, policy: str, k: int | None) -> Any:
        key = f"{policy}:{k}"
        if key not in self._ops:
            sub = policy if k is None else [_policy_table(policy)[k]]
            self._ops[key] = _kornia().AutoAugment(sub)
        return self._ops[key]

    @staticmethod
    def _call(op: Any, x: Tensor, ctx: ViewContext) -> Tensor:
        seed = host_values(torch.randint(0, 2**62, (), generator=ctx.gen))
        # kornia draws for the local batch only: under torchrun each process seeds its calls by its rank
        with seeded((seed + 7919 * ctx.shard[0]) % 2**62, x.device):
            return op(x)


def _kornia() -> Any:
    return kornia_auto("augmentation 'autoaugment'")


def _policy_table(policy: str) -> list[Any]:
    """kornia's sub-policy list of ``policy`` (``cifar10_policy`` / ``imagenet_policy``)."""
    _kornia()
    return getattr(importlib.import_module("kornia.augmentation.auto.autoaugment.autoaugment"), f"{policy}_policy")


class MixerAugmentation(Augmentation):
    """Any mixer as an augmentation: the mixed batch, with the record that mixes its labels."""

    def __init__(self, mixer: Mixer) -> None:
        super().__init__()
        self.mixer = mixer

    def apply(self, x: Tensor, ctx: ViewContext) -> Augmented:
        rec = self.mixer.draw(x, ctx.gen, ctx)
        return Augmented(x) if rec is None else Augmented(rec.mix_images(x), rec)


def mixer_augmentation(mixer: type[Mixer], doc: str, **defaults: Any) -> Any:
    """A registered mixer used as an augmentation: the mixer's one definition (parameters, checks, kernel and
    draw order) with this use's documented defaults: every batch mixed (``prob=1``) plus ``defaults``."""
    return with_defaults(mixer, MixerAugmentation, doc, **{"prob": 1.0, **defaults})


# Good-DA's extra batch: MixUp with lam ~ Beta(1, 1) and a random permutation, CutMix with a derangement
# ([CODE helper/loops.py ``mixup_data``, ``cutmix``]); ``prob`` and every other parameter stay settable, so
# ``extra_aug=cutmix extra_aug_args={prob: 0.5, derangement: false}`` is ``mixer=cutmix`` draw for draw.
AUGMENTATIONS.register("mixup")(mixer_augmentation(
    MixUp, "MixUp as Good-DA uses it (the mixer ``mixup``): lam ~ Beta(1, 1), a random permutation, every batch "
           "mixed."))
AUGMENTATIONS.register("cutmix")(mixer_augmentation(
    CutMix, "CutMix as Good-DA uses it (the mixer ``cutmix`` with ``prob=1``, ``derangement=true``): lam ~ Beta(1, 1), "
            "``rand_bbox``, a derangement, every batch mixed.", derangement=True))


class PickAugmentation(MixerAugmentation):
    """A picker as an augmentation; hands back the teacher logits it scored the picked images with."""

    mixer: CutMixPick

    def apply(self, x: Tensor, ctx: ViewContext) -> Augmented:
        rec, logits = self.mixer.pick(x, ctx.gen, ctx)
        return Augmented(rec.mix_images(x), rec, logits)


def build_augmentation(name: str, args: dict[str, Any] | None = None) -> Augmentation:
    """An augmentation by name, else any registered mixer wrapped as one (``cutmixpick`` among them);
    a one-line error otherwise."""
    args = dict(args or {})
    if name in AUGMENTATIONS:
        return AUGMENTATIONS.build(name, **args)
    if name in MIXERS:
        mixer = MIXERS.build(name, **args)
        return PickAugmentation(mixer) if isinstance(mixer, CutMixPick) else MixerAugmentation(mixer)
    names = sorted({*AUGMENTATIONS, *MIXERS})
    raise PeerdistillError(f"unknown augmentation {name!r}{nearest(name, names)}; choose from {', '.join(names)}")


def augmentation_params(name: str) -> dict[str, Any]:
    """Constructor defaults of an augmentation or mixer (for canonical labels)."""
    reg = AUGMENTATIONS if name in AUGMENTATIONS else MIXERS
    return reg.params(name) if name in reg else {}


def aug_label(name: str, args: dict[str, Any] | None = None) -> str:
    """A canonical label: ``name`` plus the arguments that differ from the defaults, sorted
    (``cutmixpick:criterion=student_entropy``); ``none`` for no augmentation."""
    if not name or name == "none":
        return "none"
    name = AUGMENTATIONS.canonical(name)  # crop+flip (an older spelling) is crop_flip
    defaults = augmentation_params(name)
    kept = {k: v for k, v in sorted((args or {}).items()) if k not in defaults or defaults[k] != v}
    return name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in kept.items()) if kept else "")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}: {_fmt(x)}" for k, x in sorted(v.items())) + "}"
    return str(v)


def parse_aug_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value,key=value`` (values read as YAML) -> (name, args)."""
    import yaml

    name, _, rest = spec.partition(":")
    args: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise PeerdistillError(f"augmentation {spec!r}: {item!r} must look like key=value "
                                   f"(e.g. cutmixpick:criterion=student_entropy)")
        try:
            args[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            args[key.strip()] = text
    return name.strip(), args


#: The paper's list (spec §5.2), in its order; CutMixPick (S. ent.) needs a student. Cutout's default is the
#: code's (one hole location per batch); flip and crop_flip draw per image (their ``same_on_batch`` is the code's).
PAPER_AUGS = ("identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix",
              "cutmixpick:criterion=student_entropy", "cutmixpick:criterion=teacher_entropy")
