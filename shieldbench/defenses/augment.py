"""Augmentations used by the published baselines (CleanCLIP, RoCLIP).

Text: EDA (Wei & Zou, 2019) as CleanCLIP calls it: one of synonym
replacement, random insertion, random swap or random deletion, chosen
uniformly, with ``alpha = 0.1`` (``max(1, int(alpha * n_words))`` edits), one
augmented caption per call. Unlike the reference code the caption is
re-sampled on every call (CleanCLIP computes it once for the whole run), a
caption is never emptied, and ``must_change=True`` guarantees a different
caption whenever one is possible. Synonyms come from a built-in table that
covers the synthetic world's vocabulary (and common caption words), or from
WordNet when ``source="wordnet"``/``"auto"`` and nltk with its WordNet corpus is
installed (nltk is not a dependency).

Images: ``autoaugment`` (torchvision ``AutoAugment`` with the ImageNet policy,
applied to 8-bit images as CleanCLIP does on PIL images) and ``simclr``
(RoCLIP's ``utils/augment_image.py``: horizontal flip, RandomResizedCrop to the
image size, ColorJitter(0.5, 0.5, 0.5, 0.1) with p = 0.8, RandomGrayscale
p = 0.2, GaussianBlur with kernel 21 and sigma in (0.1, 2) at 224 px, always
applied; the blur is scaled with the image side). Both take and return a batch of float
images ``(N, C, H, W)`` in ``[0, 1]`` and loop over the images (torchvision
draws one set of parameters per call); randomness comes from a seed, under a
forked torch RNG, so a run is reproducible and the global RNG is untouched.
Cost on CPU (2 threads, 32x32): see ``docs/baselines.md``.
"""

from __future__ import annotations

import random
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------
# Text: EDA
# ---------------------------------------------------------------------------

#: EDA's stop words (a short list; they are never replaced or used for insertion).
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves what which who whom this that these those am
    is are was were be been being have has had having do does did doing a an the and but if or because as
    until while of at by for with about against between into through during before after above below to from
    up down in out on off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very s t can will just don should now""".split()
)

#: Built-in synonyms. Groups are symmetric: every word maps to the others in
#: its group. Class names are deliberately absent (replacing "banana" by a
#: synonym would change what the caption says); WordNet has no such guard.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    # image / depiction words
    ("photo", "picture", "image", "photograph", "snapshot", "shot"),
    ("drawing", "sketch", "illustration", "rendering"),
    ("view", "look", "glimpse"),
    ("shown", "depicted", "pictured", "displayed"),
    ("close", "near", "tight"),
    ("background", "backdrop", "setting"),
    # sizes
    ("small", "tiny", "little", "miniature"),
    ("large", "big", "huge", "sizable"),
    ("tall", "high", "lofty"),
    ("wide", "broad"),
    ("narrow", "thin", "slim"),
    # colours
    ("red", "crimson", "scarlet"),
    ("green", "emerald", "lime"),
    ("blue", "azure", "navy"),
    ("yellow", "golden", "lemon"),
    ("purple", "violet", "lilac"),
    ("orange", "amber", "tangerine"),
    ("white", "snowy", "ivory"),
    ("cyan", "aqua", "turquoise"),
    # backgrounds
    ("dark", "dim", "shadowy"),
    ("light", "pale", "bright"),
    ("striped", "stripy", "banded", "lined"),
    ("dotted", "spotted", "speckled"),
    ("noisy", "grainy", "speckly"),
    # positions
    ("center", "centre", "middle"),
    ("left", "leftmost"),
    ("right", "rightmost"),
    ("top", "upper"),
    ("bottom", "lower", "base"),
    # parts and shapes
    ("round", "circular", "rounded"),
    ("outline", "contour", "silhouette"),
    ("smooth", "even", "sleek"),
    ("edge", "border", "rim"),
    ("edges", "borders", "sides"),
    ("solid", "filled", "full"),
    ("fill", "filling"),
    ("straight", "direct", "unbent"),
    ("square", "quadrate"),
    ("corners", "angles"),
    ("block", "slab", "chunk"),
    ("pointed", "sharp", "peaked"),
    ("flat", "level"),
    ("slanted", "sloped", "tilted", "angled"),
    ("hole", "gap", "opening"),
    ("ring", "loop", "circle"),
    ("shape", "form", "figure"),
    ("curved", "bent", "arched"),
    ("body", "frame", "trunk"),
    ("tips", "ends", "points"),
    ("vertical", "upright", "erect"),
    ("horizontal", "level", "flat"),
    ("bar", "rod", "beam"),
    ("arms", "limbs", "branches"),
    ("pinched", "squeezed", "narrowed"),
    ("crossing", "intersecting", "overlapping"),
    ("object", "thing", "item"),
    ("crescent", "sickle"),
    ("diamond", "rhombus", "lozenge"),
    ("four", "4"),
    ("against", "versus"),
)


def _build_table() -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for group in SYNONYM_GROUPS:
        for w in group:
            table.setdefault(w, [])
            table[w].extend(o for o in group if o != w and o not in table[w])
    return {w: tuple(v) for w, v in table.items()}


SYNONYMS: dict[str, tuple[str, ...]] = _build_table()


@lru_cache(maxsize=1)
def _wordnet() -> Any | None:
    try:  # optional: nltk is not a dependency
        from nltk.corpus import wordnet  # type: ignore[import-not-found]

        wordnet.synsets("test")  # raises LookupError when the corpus is missing
        return wordnet
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


def wordnet_available() -> bool:
    return _wordnet() is not None


@lru_cache(maxsize=65536)
def _wordnet_synonyms(word: str) -> tuple[str, ...]:
    wn = _wordnet()
    if wn is None:
        return ()
    out: list[str] = []
    for syn in wn.synsets(word):
        for lemma in syn.lemmas():
            s = "".join(c for c in lemma.name().replace("_", " ").replace("-", " ").lower() if c in " abcdefghijklmnopqrstuvwxyz")
            s = " ".join(s.split())
            if s and s != word and s not in out:
                out.append(s)
    return tuple(out)


def synonyms(word: str, source: str = "table") -> tuple[str, ...]:
    """Synonyms of a lower-case word: ``table``, ``wordnet`` (empty if absent) or ``auto``."""
    if source == "table":
        return SYNONYMS.get(word, ())
    if source == "wordnet":
        return _wordnet_synonyms(word)
    if source == "auto":
        return _wordnet_synonyms(word) if wordnet_available() else SYNONYMS.get(word, ())
    raise ValueError(f"unknown synonym source {source!r}; choose table, wordnet or auto")


class _Rng:
    """One interface over ``random.Random`` and ``numpy.random.Generator``."""

    def __init__(self, rng: random.Random | np.random.Generator | int | None) -> None:
        if rng is None or isinstance(rng, (int, np.integer)):
            rng = random.Random(rng)
        self.rng = rng
        self.is_np = isinstance(rng, np.random.Generator)

    def random(self) -> float:
        return float(self.rng.random())

    def randrange(self, n: int) -> int:
        return int(self.rng.integers(n)) if self.is_np else self.rng.randrange(n)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.randrange(len(seq))]

    def shuffle(self, seq: list[Any]) -> None:
        for i in range(len(seq) - 1, 0, -1):  # Fisher-Yates: same code path for both RNGs
            j = self.randrange(i + 1)
            seq[i], seq[j] = seq[j], seq[i]


_WORD_RE = re.compile(r"^([^a-z0-9]*)([a-z0-9']+)([^a-z0-9]*)$")


def _split(word: str) -> tuple[str, str, str]:
    """``"background,"`` -> (``""``, ``"background"``, ``","``); punctuation is kept around the core."""
    m = _WORD_RE.match(word.lower())
    if m is None:
        return "", word.lower(), ""
    return m.group(1), m.group(2), m.group(3)


def synonym_replacement(words: list[str], n: int, rng: _Rng, source: str = "table") -> list[str]:
    """Replace up to ``n`` distinct non-stop words that have synonyms (EDA's SR)."""
    out = list(words)
    candidates = [i for i, w in enumerate(out) if _split(w)[1] not in STOP_WORDS and synonyms(_split(w)[1], source)]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        pre, core, post = _split(out[i])
        out[i] = pre + rng.choice(synonyms(core, source)) + post
    return out


def random_insertion(words: list[str], n: int, rng: _Rng, source: str = "table") -> list[str]:
    """Insert a synonym of a random word at a random position, ``n`` times (EDA's RI)."""
    out = list(words)
    for _ in range(n):
        for _attempt in range(10):  # EDA gives up after 10 words without synonyms
            core = _split(out[rng.randrange(len(out))])[1]
            syns = synonyms(core, source) if core not in STOP_WORDS else ()
            if syns:
                out.insert(rng.randrange(len(out) + 1), rng.choice(syns))
                break
    return out


def random_swap(words: list[str], n: int, rng: _Rng) -> list[str]:
    """Swap two random positions, ``n`` times (EDA's RS)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i = rng.randrange(len(out))
        j = rng.randrange(len(out) - 1)
        j = j + 1 if j >= i else j  # a different position
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: _Rng) -> list[str]:
    """Delete each word with probability ``p``; never returns an empty list (EDA's RD)."""
    if len(words) <= 1:
        return list(words)
    out = [w for w in words if rng.random() > p]
    return out if out else [rng.choice(words)]


OPERATIONS = ("sr", "ri", "rs", "rd")


def eda(caption: str, rng: random.Random | np.random.Generator | int | None = None, alpha: float = 0.1,
        must_change: bool = True, source: str = "table", operations: Sequence[str] = OPERATIONS) -> str:
    """One EDA edit of ``caption`` (one operation, ``max(1, int(alpha * n_words))`` changes).

    Deterministic for a given ``rng`` state. Never returns an empty caption;
    with ``must_change`` the result differs from ``caption`` whenever some
    operation can change it (otherwise the caption comes back unchanged).
    """
    r = rng if isinstance(rng, _Rng) else _Rng(rng)
    words = caption.split()
    if not words:
        return caption
    n = max(1, int(alpha * len(words)))
    ops = list(operations)
    order = [ops[r.randrange(len(ops))]]
    if must_change:  # fall back to the other operations, in random order, until one changes it
        rest = [o for o in ops if o != order[0]]
        r.shuffle(rest)
        order += rest
    for op in order:
        for _attempt in range(4 if must_change else 1):
            if op == "sr":
                new = synonym_replacement(words, n, r, source)
            elif op == "ri":
                new = random_insertion(words, n, r, source)
            elif op == "rs":
                new = random_swap(words, n, r)
            elif op == "rd":
                new = random_deletion(words, alpha, r)
                if must_change and new == words and len(words) > 1:
                    new = list(words)
                    del new[r.randrange(len(new))]  # RD with a fixed count of one
            else:
                raise ValueError(f"unknown EDA operation {op!r}; choose from {OPERATIONS}")
            out = " ".join(new)
            if out and (out != caption or not must_change):
                return out
    return caption


def eda_batch(captions: Sequence[str], rng: random.Random | np.random.Generator | int | None, alpha: float = 0.1,
              must_change: bool = True, source: str = "table") -> list[str]:
    r = _Rng(rng) if not isinstance(rng, _Rng) else rng
    return [eda(c, r, alpha, must_change, source) for c in captions]


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def autoaugment_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision AutoAugment (ImageNet policy) for one uint8 (C, H, W) image."""
    from torchvision.transforms import v2

    return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)


ROCLIP_JITTER = (0.5, 0.5, 0.5, 0.1)  # brightness, contrast, saturation, hue (RoCLIP's augment_image.py)
ROCLIP_BLUR = (21, (0.1, 2.0), 224)    # kernel, sigma range, at this image side (torchvision's default sigma)


def blur_at(size: int, kernel: int = ROCLIP_BLUR[0], sigma: tuple[float, float] = ROCLIP_BLUR[1],
            ref_size: int = ROCLIP_BLUR[2]) -> tuple[int, tuple[float, float]]:
    """The blur's kernel (odd, >= 3) and sigma range at ``size`` px, scaled from ``ref_size``.

    A blur is defined in pixels: RoCLIP's kernel 21 with sigma up to 2 px at
    224 px would wipe out a 32 px image, so both scale with the image side (as
    the BadNets patch does); at 32 px this gives kernel 3, sigma 0.014-0.29 px.
    """
    scale = size / ref_size
    k = max(3, int(round(kernel * scale)))
    k += 1 - k % 2
    return k, (sigma[0] * scale, sigma[1] * scale)


def simclr_transform(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0),
                     jitter: tuple[float, float, float, float] = ROCLIP_JITTER, flip_p: float = 0.5,
                     grayscale_p: float = 0.2, blur: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """RoCLIP's image view for one image (torchvision v2), as in its ``augment_image.py``.

    The reference of :class:`SimCLRAugmenter` (which is the batched, faster
    version used in training); the blur is scaled to ``image_size`` (:func:`blur_at`).
    """
    from torchvision.transforms import v2

    steps = [
        v2.RandomHorizontalFlip(flip_p),
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
        v2.RandomGrayscale(grayscale_p),
    ]
    if blur:
        k, sigma = blur_at(image_size)
        steps.append(v2.GaussianBlur(k, sigma))
    return v2.Compose(steps)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-image Gaussian blur of (N, C, H, W) with sigma (N,), reflect padding (torchvision's semantics).

    Separable: one grouped convolution along each axis for the whole batch.
    """
    n, c, h, w = x.shape
    r = kernel // 2
    t = torch.linspace(-r, r, kernel, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, k1.view(n * c, 1, 1, kernel), groups=n * c)
    y = torch.nn.functional.conv2d(y, k1.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Per-image loops of tiny ops are ~10x faster on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class ImageAugmenter:
    """Batched application of a per-image torchvision transform to float [0,1] images.

    ``uint8=True`` quantises to 8 bits before the transform (AutoAugment's
    posterize/solarize/equalize are defined on 8-bit images). The result is on
    the input's device, float32 in [0, 1]. The transform runs on CPU, one
    thread, under a forked RNG seeded with ``seed``.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], uint8: bool) -> None:
        self.transform = transform
        self.uint8 = uint8

    def __call__(self, images: torch.Tensor, seed: int, offset: int = 0, total: int | None = None) -> torch.Tensor:
        """The views of ``images``, which are rows ``offset..`` of a batch whose views share ``seed``.

        The rows before ``offset`` (another rank's share) are stood in for by
        a 2x2 placeholder: the transform's random draws do not depend on the
        image (true of AutoAugment), so the RNG reaches row ``offset`` in the
        state one process would have there, at almost no cost.
        """
        device = images.device
        x = images.detach().to("cpu")
        x = _to_uint8(x) if self.uint8 else x.float().clamp(0, 1)
        with torch.random.fork_rng(devices=[]), _single_thread():
            torch.manual_seed(seed)
            if offset:
                stand_in = x.new_zeros((x.shape[1], 2, 2))
                for _ in range(offset):
                    self.transform(stand_in)
            out = torch.stack([self.transform(img) for img in x])
        out = out.float().div_(255.0) if out.dtype == torch.uint8 else out.float().clamp_(0, 1)
        return out.to(device, non_blocking=True)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: (N, 1, H, W)."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.long) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    sel = torch.stack([
        torch.stack(c, 0) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    ], 0)  # (3 channels, 6 sectors, N, H, W)
    return sel.gather(1, i.unsqueeze(0).unsqueeze(0).expand(3, 1, *i.shape)).squeeze(1).permute(1, 0, 2, 3)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


class SimCLRAugmenter:
    """RoCLIP's image view, batched: per-image parameters, vectorised ops.

    Horizontal flip (``flip_p``), RandomResizedCrop back to the input's size
    (area ``crop_scale``, aspect 3/4..4/3, torchvision's 10-try rule then the
    whole image), ColorJitter(``jitter`` = brightness, contrast, saturation,
    hue) with p = ``jitter_p`` in a random order per image (torchvision's
    semantics: brightness scales, contrast and saturation blend with the grey
    mean / grey image, hue shifts in HSV), RandomGrayscale(``grayscale_p``),
    then, always, a Gaussian blur with sigma drawn per image (``blur``, scaled
    to the image side by :func:`blur_at`). Only the crop loops over images.
    """

    def __init__(self, image_size: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
                 jitter: tuple[float, float, float, float] = ROCLIP_JITTER, flip_p: float = 0.5,
                 grayscale_p: float = 0.2, jitter_p: float = 0.8, blur: bool = True) -> None:
        self.size = int(image_size)  # 0: the input's own size
        self.crop_scale = crop_scale
        self.jitter = tuple(float(v) for v in jitter)
        self.flip_p = flip_p
        self.grayscale_p = grayscale_p
        self.jitter_p = jitter_p
        self.blur = blur

    def _crop_boxes(self, n: int, h: int, w: int, g: torch.Generator) -> list[tuple[int, int, int, int]]:
        area = h * w
        log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
        boxes = []
        for _ in range(n):
            for _attempt in range(10):
                target = area * float(torch.empty(1).uniform_(self.crop_scale[0], self.crop_scale[1], generator=g))
                ar = float(torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g)))
                cw = int(round((target * ar) ** 0.5))
                ch = int(round((target / ar) ** 0.5))
                if 0 < cw <= w and 0 < ch <= h:
                    i = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                    j = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                    boxes.append((i, j, ch, cw))
                    break
            else:
                boxes.append((0, 0, h, w))
        return boxes

    def __call__(self, images: torch.Tensor, seed: int, offset: int = 0, total: int | None = None) -> torch.Tensor:
        """The views of ``images``, rows ``offset..`` of a batch of ``total`` whose views share ``seed``.

        Every per-image parameter is drawn for the whole batch and this share
        is taken, so a rank's views equal one process's views of the same rows.
        """
        device = images.device
        x = images.detach().to("cpu").float().clamp(0, 1)
        total = x.shape[0] + offset if total is None else total
        with _single_thread():  # small elementwise ops: threads cost more than they save
            x = self._augment(x, torch.Generator().manual_seed(int(seed)), offset, total)
        return x.to(device, non_blocking=True)

    def _augment(self, x: torch.Tensor, g: torch.Generator, offset: int = 0, total: int | None = None) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        n_local, _, h, w = x.shape
        n = n_local if total is None else total
        share = slice(offset, offset + n_local)

        def draw(values: torch.Tensor) -> torch.Tensor:  # drawn for the whole batch, kept for this share
            return values[share]

        boxes = self._crop_boxes(n, h, w, g)[share]
        out_size = [self.size, self.size] if self.size else [h, w]
        x = torch.stack([TF.resized_crop(img, i, j, ch, cw, out_size, antialias=True)
                         for img, (i, j, ch, cw) in zip(x, boxes)]).clamp_(0, 1)
        flip = draw(torch.rand(n, generator=g)) < self.flip_p
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        jit = draw(torch.rand(n, generator=g)) < self.jitter_p
        factors = [draw(torch.empty(n).uniform_(max(0.0, 1 - v), 1 + v, generator=g)) for v in self.jitter[:3]]
        hue = draw(torch.empty(n).uniform_(-self.jitter[3], self.jitter[3], generator=g))
        order = draw(torch.rand(n, 4, generator=g)).argsort(dim=1)
        for pos in range(4):
            for op in range(4):
                m = (jit & (order[:, pos] == op)).view(-1, 1, 1, 1)
                if not bool(m.any()):
                    continue
                if op == 0:
                    y = x * factors[0].view(-1, 1, 1, 1)
                elif op == 1:
                    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
                    c = factors[1].view(-1, 1, 1, 1)
                    y = c * x + (1 - c) * mean
                elif op == 2:
                    c = factors[2].view(-1, 1, 1, 1)
                    y = c * x + (1 - c) * _grayscale(x)
                else:
                    y = _adjust_hue(x, hue)
                x = torch.where(m, y.clamp(0, 1), x)
        gray = (draw(torch.rand(n, generator=g)) < self.grayscale_p).view(-1, 1, 1, 1)
        x = torch.where(gray, _grayscale(x).expand_as(x), x)
        if not self.blur:
            return x
        k, (lo, hi) = blur_at(x.shape[-1])
        sigma = draw(torch.empty(n).uniform_(lo, hi, generator=g))
        return gaussian_blur(x, sigma, k).clamp_(0, 1)


def make_image_augmenter(kind: str, image_size: int = 0, **kwargs: Any) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """``autoaugment`` (CleanCLIP), ``simclr`` (RoCLIP) or ``none``; called as ``aug(images, seed)``.

    ``image_size`` 0 keeps each batch's own size.
    """
    if kind == "none":
        return None
    if kind == "autoaugment":
        return ImageAugmenter(autoaugment_transform(), uint8=True)
    if kind == "simclr":
        return SimCLRAugmenter(image_size, **kwargs)
    raise ValueError(f"unknown image augmentation {kind!r}; choose autoaugment, simclr or none")


__all__ = [
    "ImageAugmenter", "OPERATIONS", "ROCLIP_BLUR", "ROCLIP_JITTER", "SimCLRAugmenter", "blur_at", "gaussian_blur", "STOP_WORDS", "SYNONYMS", "autoaugment_transform", "eda", "eda_batch",
    "make_image_augmenter", "random_deletion", "random_insertion", "random_swap", "simclr_transform",
    "synonym_replacement", "synonyms", "wordnet_available",
]
