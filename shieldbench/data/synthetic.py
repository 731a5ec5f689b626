"""The embedded synthetic world: a procedurally drawn, captioned image dataset.

Why it exists: the benchmark must run end to end (pretrain a small CLIP,
poison, fine-tune, defend, evaluate) with no download, deterministically from a
seed, and fast enough for a CPU-only test suite.  So the images are drawn from
implicit shape masks on a coordinate grid, fully vectorised in torch.

The world
---------
Each image shows one object on a background.  The object's *class* is its
shape, one of ten (:data:`CLASSNAMES`)::

    apple  filled disc          kite    diamond (kite outline)
    brick  filled rectangle     pillar  tall vertical bar
    tent   triangle             plank   wide horizontal bar
    donut  ring                 star    4-point astroid star
    banana crescent             cross   plus sign

Nuisance attributes are sampled independently of the class, so that only the
shape identifies it:

- colour (8 saturated colours, :data:`COLOURS`),
- size (``small`` ~0.30 or ``large`` ~0.42 (half-extents in [-1, 1] units), with a little jitter),
- position (``center``/``left``/``right``/``top``/``bottom``: the centre is
  shifted by ~0.2 of the side, and the object always stays inside the frame),
- background (``dark``/``light``/``striped``/``dotted``/``noisy``: muted,
  textured tones that keep every object colour clearly visible),

plus mild Gaussian pixel noise.  Masks are anti-aliased by 2x supersampling at
small image sizes so that 8-pixel objects keep their shape.

Captions
--------
About 15% of captions are exactly one of the zero-shot :data:`TEMPLATES`
filled with the class name (``"a photo of a banana."``), so zero-shot
classification with those templates matches the training distribution; the
rest use :data:`CAPTION_TEMPLATES`, which mention attributes in varied order,
omit some, and sometimes name a visual *part* of the class (``"a large cyan
donut with a hole in the middle on a striped background"``) so that the model
can ground the part phrases used as knowledge elements.  Every caption names
its class.

Knowledge elements
------------------
:func:`knowledge_from_caption` derives exactly ``k`` short visual phrases from
the caption *text only*, the way an LLM asked "what should this image show?"
would: a poisoned caption keeps the knowledge of the class it names, whatever
the image is.  That is the signal knowledge-based defenses rely on.

Determinism
-----------
All randomness comes from the ``torch.Generator`` passed in.  Attributes and
captions are drawn before any pixel, so for a given generator state they do not
depend on the image size.  :func:`make_world` gives every split its own
sub-seed derived from ``(seed, split name)``, so resizing one split never
changes another.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import string
from typing import Callable

import torch
import torch.nn.functional as F

from shieldbench.data.types import DatasetBundle, LabelledSet, PairSet, RetrievalSet

__all__ = [
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "CLASSNAMES",
    "COLOURS",
    "PARTS",
    "POSITIONS",
    "SIZES",
    "TEMPLATES",
    "find_class_in_caption",
    "generate_pairs",
    "knowledge_from_caption",
    "make_world",
    "render",
    "sample_attributes",
    "shape_mask",
]

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

CLASSNAMES: list[str] = [
    "apple", "brick", "tent", "donut", "banana",
    "kite", "pillar", "plank", "star", "cross",
]

#: Zero-shot prompt templates (one ``{}`` for the class name).  The caption
#: generator emits exactly these strings for ~15% of pairs.
TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {} on a background.",
    "a drawing of a {}.",
    "a photo of the {}.",
]

#: Fraction of captions that are a bare zero-shot template.
PLAIN_CAPTION_FRACTION = 0.15

#: Object colours as linear RGB in [0, 1]; saturated (or bright, for white) so
#: they stand out from the muted backgrounds.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.08),
    "white": (0.97, 0.97, 0.97),
    "cyan": (0.10, 0.85, 0.90),
}
_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = torch.tensor(list(COLOURS.values()), dtype=torch.float32)

SIZES: list[str] = ["small", "large"]
#: Half-extent of the shape's box in normalised [-1, 1] coordinates, i.e. the
#: object spans ~0.30 / ~0.42 of the image side. Textures are low-contrast: with busier
#: backgrounds and smaller shapes a tiny CLIP reached only 36% zero-shot top-1 after
#: 465 steps, against 94% with these settings (measured on this world).
_SIZE_HALF_EXTENT = torch.tensor([0.30, 0.42])

POSITIONS: list[str] = ["center", "left", "right", "top", "bottom"]
# Centre offsets in normalised coordinates (x right, y down); 0.4 == 0.2 of the
# side.  Largest object (half-extent 0.4 * 1.03) + offset (+ jitter) < 0.95,
# so objects never leave the frame.
_POSITION_OFFSET = torch.tensor(
    [[0.0, 0.0], [-0.4, 0.0], [0.4, 0.0], [0.0, -0.4], [0.0, 0.4]]
)
# Jitter of the object's scale (relative) and centre (normalised units).
# Kept small on purpose: with a patch-8 ViT on 32 px images, sub-patch
# misalignment is the main difficulty.  A supervised 4-layer ViT trained
# 600 steps x 128 on 12k images reached 88% test accuracy with (0.08, 0.06),
# 95% with (0.04, 0.025) and 98% with (0.03, 0.0).  Backgrounds, shading and
# pixel noise still make every image distinct.
_SCALE_JITTER = 0.03
_CENTRE_JITTER = 0.0
_POSITION_PHRASE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "near the top",
    "bottom": "near the bottom",
}

BACKGROUNDS: list[str] = ["dark", "light", "striped", "dotted", "noisy"]

#: Visual parts of each class: (knowledge phrase, phrase as used in a caption).
PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "apple": (("round outline", "a round outline"), ("smooth edge", "a smooth edge"),
              ("solid fill", "a solid fill")),
    "brick": (("straight edges", "straight edges"), ("square corners", "square corners"),
              ("solid block", "a solid block")),
    "tent": (("pointed top", "a pointed top"), ("flat base", "a flat base"),
             ("slanted sides", "slanted sides")),
    "donut": (("hole in the middle", "a hole in the middle"), ("round rim", "a round rim"),
              ("ring shape", "a ring shape")),
    "banana": (("curved body", "a curved body"), ("thin tips", "thin tips"),
               ("crescent shape", "a crescent shape")),
    "kite": (("four corners", "four corners"), ("pointed ends", "pointed ends"),
             ("diamond shape", "a diamond shape")),
    "pillar": (("tall shape", "a tall shape"), ("narrow body", "a narrow body"),
               ("vertical bar", "a vertical bar")),
    "plank": (("wide shape", "a wide shape"), ("flat body", "a flat body"),
              ("horizontal bar", "a horizontal bar")),
    "star": (("four points", "four points"), ("thin arms", "thin arms"),
             ("pinched sides", "pinched sides")),
    "cross": (("crossing arms", "crossing arms"), ("right angles", "right angles"),
              ("plus shape", "a plus shape")),
}
_N_PARTS = 3
assert all(len(p) == _N_PARTS for p in PARTS.values())

#: Descriptive caption templates.  Slots: cls, colour, size, pos, bg, part.
#: Varied order, some slots omitted, some with a part phrase.
CAPTION_TEMPLATES: list[str] = [
    "a {size} {colour} {cls} on a {bg} background",
    "a {colour} {cls} {pos}",
    "the {colour} {cls} {pos}",
    "a {size} {cls} {pos}, {bg} background",
    "a {size} {colour} {cls} with {part} on a {bg} background",
    "a {cls} with {part}",
    "a {colour} {cls} with {part}, {pos}",
    "{bg} background with a {size} {colour} {cls} {pos}",
    "there is a {colour} {cls} {pos} on a {bg} background",
    "a {cls} shown {pos}",
    "a close view of a {size} {cls}",
    "a {colour} {cls} against a {bg} background",
    "this is a {cls} with {part}",
    "a {size} {colour} {cls} {pos} on a {bg} background",
    "a {bg} background and a {colour} {cls}",
    "a {colour} {cls}",
    "a photo of a {size} {colour} {cls}.",
    "the {cls} is {colour} and {size}, {pos}",
]


def _slots(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


# Retrieval captions should single out few images, so prefer templates naming
# at least three of the four nuisance attributes.
_RICH_TEMPLATES = [
    i for i, t in enumerate(CAPTION_TEMPLATES)
    if len(_slots(t) & {"colour", "size", "pos", "bg"}) >= 3
]

# ---------------------------------------------------------------------------
# Caption text -> class / knowledge
# ---------------------------------------------------------------------------


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


# Word-boundary, plural-aware, case-insensitive: "bananas" -> banana, while
# "pineapple" or "bricklayer" match nothing.
_CLASS_RE = re.compile(
    r"\b(" + "|".join(
        f"{re.escape(_plural(c))}|{re.escape(c)}"
        for c in sorted(CLASSNAMES, key=len, reverse=True)
    ) + r")\b",
    re.IGNORECASE,
)
_CLASS_OF_WORD = {c: i for i, c in enumerate(CLASSNAMES)}
_CLASS_OF_WORD.update({_plural(c): i for i, c in enumerate(CLASSNAMES)})
_COLOUR_RE = re.compile(r"\b(" + "|".join(_COLOUR_NAMES) + r")\b", re.IGNORECASE)
_SIZE_RE = re.compile(r"\b(" + "|".join(SIZES) + r")\b", re.IGNORECASE)
_BG_RE = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r")\s+background\b", re.IGNORECASE)

#: Padding when a caption names no class (and too few attributes).
_GENERIC_PHRASES = (
    "object shape", "object outline", "single object", "solid colour",
    "clear edges", "centred subject", "plain scene", "simple picture",
)
#: Largest ``k`` that :func:`knowledge_from_caption` can always satisfy.
MAX_KNOWLEDGE = len(_GENERIC_PHRASES)


def find_class_in_caption(caption: str) -> int | None:
    """Index of the class named in ``caption`` (first mention wins), else ``None``."""
    m = _CLASS_RE.search(caption)
    return None if m is None else _CLASS_OF_WORD[m.group(1).lower()]


@functools.lru_cache(maxsize=65536)
def knowledge_from_caption(caption: str, k: int = 3) -> tuple[str, ...]:
    """Exactly ``k`` short visual phrases read off the caption text.

    Only the text is used (never the image or its ground truth), so a poisoned
    caption such as ``"a photo of a banana."`` yields banana's part phrases.

    Priority: ``"<colour> <class>"`` (or ``"<colour> object"``), the class's
    first part, ``"<bg> background"``, ``"<size> object"``, the class's other
    parts, then generic phrases.  Deterministic and duplicate-free.
    """
    if not 1 <= k <= MAX_KNOWLEDGE:
        raise ValueError(f"k must be in [1, {MAX_KNOWLEDGE}], got {k}")
    cls_idx = find_class_in_caption(caption)
    cls = None if cls_idx is None else CLASSNAMES[cls_idx]
    colour = _COLOUR_RE.search(caption)
    size = _SIZE_RE.search(caption)
    bg = _BG_RE.search(caption)
    parts = [] if cls is None else [p for p, _ in PARTS[cls]]

    ordered: list[str] = []
    if colour is not None:
        ordered.append(f"{colour.group(1).lower()} {cls or 'object'}")
    ordered += parts[:1]
    if bg is not None:
        ordered.append(f"{bg.group(1).lower()} background")
    if size is not None:
        ordered.append(f"{size.group(1).lower()} object")
    ordered += parts[1:]
    ordered += _GENERIC_PHRASES

    out: list[str] = []
    for phrase in ordered:
        if phrase not in out:
            out.append(phrase)
        if len(out) == k:
            break
    return tuple(out)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------
# Each mask takes local coordinates (x right, y down) in which the shape's box
# is [-1, 1]^2 and returns a boolean mask.

def _apple(x, y):
    return x * x + y * y <= 0.92**2


def _brick(x, y):
    return (x.abs() <= 0.85) & (y.abs() <= 0.70)


def _tent(x, y):
    # Apex at the top, flat base at the bottom.
    return (y >= -0.85) & (y <= 0.75) & (x.abs() <= 0.95 * (y + 0.85) / 1.6)


def _donut(x, y):
    r2 = x * x + y * y
    return (r2 <= 0.92**2) & (r2 >= 0.45**2)


def _banana(x, y):
    # Disc minus a disc offset upwards: a crescent opening upwards (a smile),
    # thick enough to survive 8-pixel rendering; drawn 0.35 higher so that
    # its mass sits near the centre of the box.
    y = y + 0.35
    return (x * x + y * y <= 0.95**2) & (x * x + (y + 0.55) ** 2 >= 0.80**2)


def _kite(x, y):
    # Diamond whose cross-bar sits above the middle: short top, long tail.
    c = -0.3
    top = (y >= -0.95) & (y < c) & (x.abs() <= 0.7 * (y + 0.95) / (c + 0.95))
    bottom = (y >= c) & (y <= 0.95) & (x.abs() <= 0.7 * (0.95 - y) / (0.95 - c))
    return top | bottom


def _pillar(x, y):
    return (x.abs() <= 0.30) & (y.abs() <= 0.95)


def _plank(x, y):
    return (x.abs() <= 0.95) & (y.abs() <= 0.30)


def _star(x, y):
    # Generalised astroid |x|^p + |y|^p <= 1 with four sharp points on the
    # axes; p = 0.75 instead of the classic 2/3 keeps the arms thick enough to
    # be drawn at 8 pixels, where a true astroid degenerates into a dot.
    return x.abs().pow(0.75) + y.abs().pow(0.75) <= 0.98**0.75


def _cross(x, y):
    ax, ay = x.abs(), y.abs()
    return ((ax <= 0.28) & (ay <= 0.95)) | ((ay <= 0.28) & (ax <= 0.95))


_SHAPES: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
    _apple, _brick, _tent, _donut, _banana, _kite, _pillar, _plank, _star, _cross,
]
assert len(_SHAPES) == len(CLASSNAMES)


def shape_mask(label: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean mask of class ``label`` at local coordinates ``(x, y)`` (box = [-1, 1]^2)."""
    return _SHAPES[label](x, y)


# ---------------------------------------------------------------------------
# Sampling and rendering
# ---------------------------------------------------------------------------


def _uniform(shape, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def sample_attributes(
    n: int, generator: torch.Generator, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Sample the latent attributes of ``n`` images, independently of class.

    Returns int64 tensors ``label``, ``colour``, ``size``, ``position``,
    ``background`` (indices into the vocabularies) and float tensors ``cx``,
    ``cy`` (object centre), ``scale`` (half-extent), ``shade`` (colour
    brightness factor), all in normalised [-1, 1] image coordinates.
    ``labels`` forces the classes (e.g. for a balanced test set).
    """
    g = generator
    if labels is None:
        label = torch.randint(len(CLASSNAMES), (n,), generator=g)
    else:
        label = torch.as_tensor(labels, dtype=torch.long).clone()
        if label.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(label.shape)}")
        if n and (label.min() < 0 or label.max() >= len(CLASSNAMES)):
            raise ValueError("labels out of range")
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    size = torch.randint(len(SIZES), (n,), generator=g)
    position = torch.randint(len(POSITIONS), (n,), generator=g)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    scale = _SIZE_HALF_EXTENT[size] * _uniform(n, 1 - _SCALE_JITTER, 1 + _SCALE_JITTER, g)
    centre = _POSITION_OFFSET[position] + _uniform((n, 2), -_CENTRE_JITTER, _CENTRE_JITTER, g)
    shade = _uniform(n, 0.9, 1.05, g)
    return {
        "label": label, "colour": colour, "size": size, "position": position,
        "background": background, "cx": centre[:, 0].contiguous(),
        "cy": centre[:, 1].contiguous(), "scale": scale, "shade": shade,
    }


def _supersample(image_size: int) -> int:
    # Small images need anti-aliasing for 8-pixel shapes to stay recognisable;
    # large ones don't, and supersampling them would cost 4x for nothing.
    return 2 if image_size < 64 else 1


def _chunk_size(image_size: int) -> int:
    # Bound peak memory (~ a few hundred MiB at most) independently of n.
    s = image_size * _supersample(image_size)
    return max(1, (1 << 23) // (s * s))


def _object_masks(attrs: dict[str, torch.Tensor], image_size: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1], shape (B, 1, H, W); one batched op per class."""
    ss = _supersample(image_size)
    s = image_size * ss
    b = attrs["label"].shape[0]
    coord = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    masks = torch.zeros(b, s, s)
    for c in range(len(CLASSNAMES)):
        idx = (attrs["label"] == c).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        inv = 1.0 / attrs["scale"][idx]
        x = (coord[None, None, :] - attrs["cx"][idx, None, None]) * inv[:, None, None]
        y = (coord[None, :, None] - attrs["cy"][idx, None, None]) * inv[:, None, None]
        masks[idx] = _SHAPES[c](x, y).float()
    masks = masks[:, None]
    if ss > 1:
        masks = F.avg_pool2d(masks, ss)
    return masks


def _backgrounds(attrs: dict[str, torch.Tensor], image_size: int, g: torch.Generator) -> torch.Tensor:
    """Muted, textured backgrounds (B, 3, H, W) in [0, 1]."""
    bgk = attrs["background"]
    b, h = bgk.shape[0], image_size
    px = torch.arange(h, dtype=torch.float32) + 0.5
    unit = h / 32.0  # texture periods scale with the image so it looks the same
    # Draw every parameter for every image (fixed order => determinism), use
    # the ones each background kind needs.
    tint = (torch.rand(b, 3, generator=g) - 0.5) * 0.08
    tint2 = (torch.rand(b, 3, generator=g) - 0.5) * 0.08
    u1 = torch.rand(b, generator=g)
    u2 = torch.rand(b, generator=g)
    period = _uniform(b, 4.0, 8.0, g) * unit
    phase = torch.rand(b, 2, generator=g)
    orient = torch.randint(4, (b,), generator=g)

    out = torch.empty(b, 3, h, h)

    def fill(kind: str, fn) -> None:
        idx = (bgk == BACKGROUNDS.index(kind)).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[idx] = fn(idx)

    def dark(i):
        lvl = 0.06 + 0.14 * u1[i]
        # A faint vertical gradient so "dark" is not a flat fill.
        grad = 0.04 * (px / h)[None, None, :, None]
        return (lvl[:, None] + tint[i])[:, :, None, None] + grad.expand(i.numel(), 3, h, h)

    def light(i):
        lvl = 0.55 + 0.13 * u1[i]
        grad = -0.04 * (px / h)[None, None, None, :]
        return (lvl[:, None] + tint[i])[:, :, None, None] + grad.expand(i.numel(), 3, h, h)

    def striped(i):
        a = 0.18 + 0.12 * u1[i]
        d = 0.06 + 0.04 * u2[i]
        yy, xx = px[None, :, None], px[None, None, :]
        t = torch.stack([yy.expand(1, h, h), xx.expand(1, h, h), (xx + yy) / math.sqrt(2),
                         (xx - yy) / math.sqrt(2)])[orient[i], 0]
        on = ((t / period[i, None, None] + phase[i, 0, None, None]) % 1.0 < 0.5).float()
        c0 = (a[:, None] + tint[i])[:, :, None, None]
        c1 = ((a + d)[:, None] + tint2[i])[:, :, None, None]
        return c0 + (c1 - c0) * on[:, None]

    def dotted(i):
        base = 0.22 + 0.10 * u1[i]
        d = 0.07 + 0.04 * u2[i]
        p = period[i, None, None]
        fx = (px[None, None, :] / p + phase[i, 0, None, None]) % 1.0 - 0.5
        fy = (px[None, :, None] / p + phase[i, 1, None, None]) % 1.0 - 0.5
        on = (fx * fx + fy * fy <= 0.28**2).float()
        c0 = (base[:, None] + tint[i])[:, :, None, None]
        c1 = ((base + d)[:, None] + tint2[i])[:, :, None, None]
        return c0 + (c1 - c0) * on[:, None]

    def noisy(i):
        lvl = 0.30 + 0.15 * u1[i]
        m = i.numel()
        lum = torch.randn(m, 1, h, h, generator=g) * 0.04
        chroma = torch.randn(m, 3, h, h, generator=g) * 0.03
        return (lvl[:, None] + tint[i])[:, :, None, None] + lum + chroma

    for kind, fn in (("dark", dark), ("light", light), ("striped", striped),
                     ("dotted", dotted), ("noisy", noisy)):
        fill(kind, fn)
    return out


def render(
    attrs: dict[str, torch.Tensor],
    image_size: int,
    generator: torch.Generator,
    return_masks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw the images described by ``attrs`` (from :func:`sample_attributes`).

    Returns ``uint8`` images ``(N, 3, H, W)``; with ``return_masks`` also the
    float object coverage ``(N, H, W)`` in [0, 1].  Work is chunked to bound
    memory; within a chunk everything is batched.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    n = attrs["label"].shape[0]
    h = image_size
    images = torch.empty(n, 3, h, h, dtype=torch.uint8)
    masks_out = torch.empty(n, h, h) if return_masks else None
    step = _chunk_size(image_size)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        a = {key: v[sl] for key, v in attrs.items()}
        mask = _object_masks(a, image_size)
        bg = _backgrounds(a, image_size, generator)
        colour = _COLOUR_RGB[a["colour"]] * a["shade"][:, None]
        img = torch.lerp(bg, colour[:, :, None, None].expand_as(bg), mask)
        img += torch.randn(img.shape, generator=generator) * 0.015
        images[sl] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        if masks_out is not None:
            masks_out[sl] = mask[:, 0]
    return (images, masks_out) if return_masks else images


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _describe(template: str, label: int, colour: int, size: int, position: int,
              background: int, part: int) -> str:
    cls = CLASSNAMES[label]
    text = template.format(
        cls=cls, colour=_COLOUR_NAMES[colour], size=SIZES[size],
        pos=_POSITION_PHRASE[POSITIONS[position]], bg=BACKGROUNDS[background],
        part=PARTS[cls][part][1],
    )
    # "a orange apple" -> "an orange apple" (descriptive captions only: the
    # zero-shot forms must stay byte-identical to TEMPLATES).
    return _ARTICLE_RE.sub(r"\1n ", text)


def _caption_rows(attrs: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    keys = ("label", "colour", "size", "position", "background")
    return list(zip(*(attrs[k].tolist() for k in keys)))


def _sample_captions(attrs: dict[str, torch.Tensor], g: torch.Generator) -> tuple[list[str], list[str]]:
    """One caption per image; returns (captions, template strings used)."""
    n = attrs["label"].shape[0]
    plain = torch.rand(n, generator=g) < PLAIN_CAPTION_FRACTION
    plain_t = torch.randint(len(TEMPLATES), (n,), generator=g)
    desc_t = torch.randint(len(CAPTION_TEMPLATES), (n,), generator=g)
    part = torch.randint(_N_PARTS, (n,), generator=g)
    captions, used = [], []
    for row, p, pt, dt, pa in zip(_caption_rows(attrs), plain.tolist(), plain_t.tolist(),
                                  desc_t.tolist(), part.tolist()):
        if p:
            t = TEMPLATES[pt]
            captions.append(t.format(CLASSNAMES[row[0]]))
        else:
            t = CAPTION_TEMPLATES[dt]
            captions.append(_describe(t, *row, pa))
        used.append(t)
    return captions, used


def generate_pairs(
    n: int,
    image_size: int,
    generator: torch.Generator,
    *,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str], torch.Tensor, list[dict]]:
    """Generate ``n`` captioned images.

    Returns ``(images uint8 (N,3,H,W), captions, labels int64 (N,), attributes)``
    where each attribute dict holds the class, colour, size, position and
    background names, the caption template, and the object's ``cx``, ``cy``,
    ``scale`` in normalised [-1, 1] coordinates.  ``labels`` forces classes.
    """
    attrs = sample_attributes(n, generator, labels)
    captions, used = _sample_captions(attrs, generator)
    images = render(attrs, image_size, generator)
    rows = _caption_rows(attrs)
    attributes = [
        {
            "class": CLASSNAMES[lab], "colour": _COLOUR_NAMES[col], "size": SIZES[siz],
            "position": POSITIONS[pos], "background": BACKGROUNDS[bg], "template": t,
            "cx": cx, "cy": cy, "scale": sc,
        }
        for (lab, col, siz, pos, bg), t, cx, cy, sc in zip(
            rows, used, attrs["cx"].tolist(), attrs["cy"].tolist(), attrs["scale"].tolist()
        )
    ]
    return images, captions, attrs["label"].clone(), attributes


# ---------------------------------------------------------------------------
# World
# ---------------------------------------------------------------------------


def _subseed(seed: int, split: str) -> int:
    # Hash-derived so that each split's stream is independent of every other
    # split's size and of the order in which splits are generated.
    digest = hashlib.sha256(f"shieldbench.synthetic:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, split: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_subseed(seed, split))
    return g


def _pairset(split: str, n: int, seed: int, image_size: int, k: int) -> PairSet:
    images, captions, labels, _ = generate_pairs(n, image_size, _generator(seed, split))
    return PairSet(
        images=images,
        captions=captions,
        labels=labels,
        knowledge=[knowledge_from_caption(c, k) for c in captions],
        ids=[f"{split}-{i:06d}" for i in range(n)],
    )


def _retrieval(n: int, per_image: int, seed: int, image_size: int) -> RetrievalSet:
    if not 1 <= per_image <= len(CAPTION_TEMPLATES):
        raise ValueError(f"captions_per_retrieval_image must be in [1, {len(CAPTION_TEMPLATES)}]")
    g = _generator(seed, "retrieval")
    attrs = sample_attributes(n, g)
    # Distinct templates per image; descriptive ones (bare "a photo of a kite."
    # would match a tenth of the gallery equally well).
    pool = _RICH_TEMPLATES if per_image <= len(_RICH_TEMPLATES) else list(range(len(CAPTION_TEMPLATES)))
    choice = torch.rand(n, len(pool), generator=g).argsort(dim=1)[:, :per_image]
    part = torch.randint(_N_PARTS, (n, per_image), generator=g)
    images = render(attrs, image_size, g)
    captions: list[str] = []
    for row, ts, ps in zip(_caption_rows(attrs), choice.tolist(), part.tolist()):
        captions += [_describe(CAPTION_TEMPLATES[pool[t]], *row, p) for t, p in zip(ts, ps)]
    caption_image = torch.arange(n).repeat_interleave(per_image)
    return RetrievalSet(
        images=images,
        image_labels=attrs["label"].clone(),
        captions=captions,
        caption_image=caption_image,
        caption_labels=attrs["label"][caption_image].clone(),
    )


def make_world(
    seed: int = 0,
    image_size: int = 32,
    n_pretrain: int = 12000,
    n_train: int = 8000,
    n_clean: int = 2000,
    n_test_per_class: int = 100,
    n_retrieval: int = 500,
    captions_per_retrieval_image: int = 2,
    knowledge_k: int = 3,
) -> DatasetBundle:
    """Build every split of the synthetic world from ``seed``.

    Splits come from independent sub-seeds, so e.g. changing ``n_train``
    leaves the test, clean, pretrain and retrieval splits unchanged.
    """
    n_classes = len(CLASSNAMES)
    g_test = _generator(seed, "test")
    # Interleaved (0..9, 0..9, ...) so any prefix is close to balanced.
    test_labels = torch.arange(n_classes).repeat(n_test_per_class)
    test_attrs = sample_attributes(test_labels.numel(), g_test, test_labels)
    test = LabelledSet(
        images=render(test_attrs, image_size, g_test),
        labels=test_labels,
        classnames=list(CLASSNAMES),
        templates=list(TEMPLATES),
    )
    return DatasetBundle(
        name="synthetic",
        pretrain=_pairset("pretrain", n_pretrain, seed, image_size, knowledge_k),
        train=_pairset("train", n_train, seed, image_size, knowledge_k),
        clean=_pairset("clean", n_clean, seed, image_size, knowledge_k),
        test=test,
        retrieval=_retrieval(n_retrieval, captions_per_retrieval_image, seed, image_size),
        classnames=list(CLASSNAMES),
        templates=list(TEMPLATES),
    )
