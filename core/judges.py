"""Programmatic preference judges that stand in for people: for demos, tests and benchmarks.

Each judge maps (prompt, image) to a score in [0, 1], higher = preferred, and picks the better of two
images the way an annotator would (`prefer`), optionally flipping its choice with a noise rate to
mimic people who disagree. numpy + PIL only (no torch): the `densealign label` client runs anywhere.

- `faithfulness`: an exact rule for the shipped shapes model. It parses the prompt
  (`core.basemodel.shapes`), segments the image by nearest palette colour, takes the largest blob of
  each colour and checks, for each object the prompt names: the colour is there (area), the shape is
  right (fill of the bounding box and top/bottom balance), the relation holds (centre offsets), and
  no other colour is there. `verdict` gives the soft score (mean of the checks' margins) and the hard
  accept/reject (every check passes).
- `compressibility`: model-free; 1 - JPEG bytes / raw bytes at quality 95 (DDPO's "compressibility"
  reward): flatter, simpler images score higher. `incompressibility` is 1 minus that.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from core.basemodel.shapes import BACKGROUND, IMAGE_SIZE, PALETTE, RELATIONS, Obj, parse_prompt

Choice = Literal["a", "b", "tie"]

# Faithfulness thresholds, in pixels of a 64 px image (images of other sizes are resized first).
# Smallest blob that counts as an object drawn (the smallest square drawn is 14 x 14 = 196 px).
MIN_OBJECT_AREA = 60
# Largest blob of a colour the prompt does not name that is still tolerated (stray pixels at edges).
MAX_STRAY_AREA = 25
# A pixel belongs to a palette colour only if it is this close to it (RGB Euclidean), else background.
MAX_COLOUR_DISTANCE = 110.0
# Shape test: triangles have a top half much lighter than the bottom (ideal 1/3); squares fill their
# bounding box (1.0), circles fill pi/4 = 0.785 of it.
TRIANGLE_BALANCE = 0.6
SQUARE_FILL = 0.89


class Judge(Protocol):
    name: str

    def score(self, prompt: str, image: Image.Image) -> float: ...

    def prefer(
        self,
        prompt: str,
        image_a: Image.Image,
        image_b: Image.Image,
        rng: random.Random,
        noise_rate: float = 0.0,
    ) -> Choice: ...


def prefer_by_score(
    score_a: float, score_b: float, rng: random.Random, noise_rate: float = 0.0, tie_margin: float = 1e-3
) -> Choice:
    """'a' or 'b' for the higher score ('tie' within tie_margin); with probability noise_rate a and b swap."""
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    choice: Choice = "tie" if abs(score_a - score_b) <= tie_margin else ("a" if score_a > score_b else "b")
    # One draw per call whatever the outcome, so a seeded rng gives the same stream of decisions.
    flip = rng.random() < noise_rate
    if flip and choice != "tie":
        return "b" if choice == "a" else "a"
    return choice


class _ScoreJudge:
    name = "base"
    tie_margin = 1e-3

    def score(self, prompt: str, image: Image.Image) -> float:
        raise NotImplementedError

    def prefer(
        self,
        prompt: str,
        image_a: Image.Image,
        image_b: Image.Image,
        rng: random.Random,
        noise_rate: float = 0.0,
    ) -> Choice:
        return prefer_by_score(
            self.score(prompt, image_a), self.score(prompt, image_b), rng, noise_rate, self.tie_margin
        )


@dataclass
class Blob:
    """The largest 4-connected region of one palette colour."""

    area: int
    cx: float
    cy: float
    fill: float  # area / bounding-box area
    balance: float  # area in the top half of the bounding box / area in the bottom half


@dataclass
class Verdict:
    """A faithfulness judgement: soft score, hard decision, and why (one entry per failed check)."""

    score: float
    accepted: bool
    failures: list[str] = field(default_factory=list)


def segment(image: Image.Image) -> np.ndarray:
    """(64, 64) int labels: index into the palette's colours, or -1 for background."""
    rgb = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    centres = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # (1 + colours, 3)
    dist = np.linalg.norm(rgb[:, :, None, :].astype(np.float32) - centres, axis=-1)  # (64, 64, 1 + colours)
    nearest = dist.argmin(axis=-1)
    labels = nearest - 1
    labels[dist.min(axis=-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


def largest_blob(mask: np.ndarray) -> Blob | None:
    """The largest 4-connected component of a boolean mask, or None if the mask is empty."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(pixels) > len(best):
            best = pixels
    if not best:
        return None
    ys, xs = np.array(best).T
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    middle = (top + bottom) / 2
    upper, lower = int((ys < middle).sum()), int((ys > middle).sum())
    return Blob(
        area=len(best),
        cx=float(xs.mean()),
        cy=float(ys.mean()),
        fill=len(best) / float((bottom - top + 1) * (right - left + 1)),
        balance=upper / max(lower, 1),
    )


def shape_margin(blob: Blob, shape: str) -> float:
    """Signed evidence that the blob is `shape`, in [-1, 1]: > 0 passes."""
    is_triangle = TRIANGLE_BALANCE - blob.balance  # > 0 for a triangle
    is_square = blob.fill - SQUARE_FILL  # > 0 for a square, < 0 for a circle
    if shape == "triangle":
        margin = is_triangle / 0.3
    elif shape == "square":
        margin = min(-is_triangle / 0.3, is_square / 0.1)
    else:
        margin = min(-is_triangle / 0.3, -is_square / 0.1)
    return float(np.clip(margin, -1.0, 1.0))


def relation_margin(first: Blob, second: Blob, relation: str) -> float:
    """Signed evidence in [-1, 1] that `first` is `relation` `second`: the offset along the relation must
    exceed the offset across it (so "above" means mostly above, not beside)."""
    ux, uy = RELATIONS[relation]
    dx, dy = second.cx - first.cx, second.cy - first.cy
    along, across = ux * dx + uy * dy, abs(uy * dx + ux * dy)
    return float(np.clip((along - max(across, 4.0)) / 8.0, -1.0, 1.0))


class FaithfulnessJudge(_ScoreJudge):
    """Exact-rule judge of a shapes image against its prompt (see the module docstring)."""

    name = "faithfulness"

    def verdict(self, prompt: str, image: Image.Image) -> Verdict:
        scene = parse_prompt(prompt)
        labels = segment(image)
        margins: list[float] = []
        failures: list[str] = []

        def check(margin: float, what: str) -> None:
            margins.append(margin)
            if margin <= 0:
                failures.append(what)

        named = {o.colour for o in scene.objects}
        blobs: list[Blob | None] = []
        for o in scene.objects:
            blob = largest_blob(labels == list(PALETTE).index(o.colour))
            blobs.append(blob if blob is not None and blob.area >= MIN_OBJECT_AREA else None)
            area = 0 if blob is None else blob.area
            check(float(np.clip((area - MIN_OBJECT_AREA) / MIN_OBJECT_AREA, -1, 1)), f"no {o.colour} object")
            found = blobs[-1]
            check(shape_margin(found, o.shape) if found else -1.0, f"{_phrase(o)} has the wrong shape")
        first, second = (blobs + [None])[:2]
        if scene.relation is not None:
            rel = relation_margin(first, second, scene.relation) if first and second else -1.0
            check(rel, f"not {scene.relation}")
        for colour in PALETTE:
            if colour not in named:
                stray = largest_blob(labels == list(PALETTE).index(colour))
                area = 0 if stray is None else stray.area
                check(
                    float(np.clip((MAX_STRAY_AREA - area) / MAX_STRAY_AREA, -1, 1)), f"unasked-for {colour}"
                )
        score = float(np.mean([(m + 1) / 2 for m in margins]))
        return Verdict(score=score, accepted=not failures, failures=failures)

    def score(self, prompt: str, image: Image.Image) -> float:
        return self.verdict(prompt, image).score

    def accepts(self, prompt: str, image: Image.Image) -> bool:
        return self.verdict(prompt, image).accepted


def _phrase(o: Obj) -> str:
    return f"the {o.colour} {o.shape}"


def jpeg_size(image: Image.Image, quality: int = 95) -> int:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell()


class CompressibilityJudge(_ScoreJudge):
    """Prefers the image whose JPEG (quality 95) is smaller: score = 1 - JPEG bytes / raw RGB bytes."""

    name = "compressibility"

    def score(self, prompt: str, image: Image.Image) -> float:
        raw = image.width * image.height * 3
        return float(np.clip(1.0 - jpeg_size(image) / raw, 0.0, 1.0))


class IncompressibilityJudge(CompressibilityJudge):
    """The negation: prefers the image whose JPEG is larger (more detail); score = JPEG bytes / raw bytes."""

    name = "incompressibility"

    def score(self, prompt: str, image: Image.Image) -> float:
        return 1.0 - super().score(prompt, image)


JUDGES: dict[str, Callable[[], Judge]] = {
    "faithfulness": FaithfulnessJudge,
    "compressibility": CompressibilityJudge,
    "incompressibility": IncompressibilityJudge,
}


def make_judge(kind: str) -> Judge:
    """The judge named `kind` (one of JUDGES)."""
    try:
        return JUDGES[kind]()
    except KeyError:
        raise ValueError(f"unknown preference {kind!r}; choose one of {sorted(JUDGES)}") from None
