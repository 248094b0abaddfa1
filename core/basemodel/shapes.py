"""The procedural "shapes" data set: coloured shapes on a plain background, with compositional prompts.

Every example is a pure function of (index, seed): `render(scene)` draws a `Scene` (one or two
objects) with hard edges on a flat background, and `scene.prompt` says what was drawn, e.g.
"a red circle", "a red circle above a blue square", "a red circle to the left of a blue square".
Two-object scenes always use two different colours, so a judge can find each object by its colour.

The vocabulary is deliberately small (4 colours, 3 shapes, 2 relations: 12 single-object prompts and
216 two-object prompts) so that a tiny Stable Diffusion learns it on a CPU in minutes. No torch here:
the programmatic judges (`core.judges`) use the palette and the prompt grammar too.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Image side in pixels; the shipped model draws at this size.
IMAGE_SIZE = 64
BACKGROUND: tuple[int, int, int] = (240, 240, 235)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# relation word(s) in the prompt -> the unit vector from the first object towards the second (y down)
RELATIONS: dict[str, tuple[int, int]] = {"above": (0, 1), "to the left of": (1, 0)}
# Share of two-object scenes among generated examples.
TWO_OBJECT_SHARE = 0.75

_PROMPT = re.compile(
    rf"^an? (?P<c1>{'|'.join(COLOURS)}) (?P<s1>{'|'.join(SHAPES)})"
    rf"(?: (?P<rel>{'|'.join(RELATIONS)}) an? (?P<c2>{'|'.join(COLOURS)}) (?P<s2>{'|'.join(SHAPES)}))?$"
)


class PromptError(ValueError):
    """A prompt is outside the shapes grammar, so no rule can check an image against it."""


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float = 0.0  # centre, pixels from the left
    cy: float = 0.0  # centre, pixels from the top
    size: float = 0.0  # side of the bounding square, pixels

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, `relation` says where the first is relative to the second."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def prompt(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"


def parse_prompt(prompt: str) -> Scene:
    """The objects and relation a prompt asks for (positions left at zero)."""
    match = _PROMPT.match(prompt.strip().lower())
    if match is None:
        raise PromptError(
            f"{prompt!r} is not a shapes prompt: expected 'a COLOUR SHAPE' or 'a COLOUR SHAPE "
            f"{'|'.join(RELATIONS)} a COLOUR SHAPE' with colours {COLOURS} and shapes {SHAPES}"
        )
    first = Obj(match["c1"], match["s1"])
    if match["rel"] is None:
        return Scene((first,))
    if match["c1"] == match["c2"]:
        raise PromptError(f"{prompt!r} uses {match['c1']} twice; the two objects must differ in colour")
    return Scene((first, Obj(match["c2"], match["s2"])), match["rel"])


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order (12 single-object, then 216 two-object)."""
    singles = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    pairs = [
        f"a {c1} {s1} {rel} a {c2} {s2}"
        for rel in RELATIONS
        for c1 in COLOURS
        for s1 in SHAPES
        for c2 in COLOURS
        for s2 in SHAPES
        if c1 != c2
    ]
    return singles + pairs


def random_scene(rng: random.Random, prompt: str | None = None) -> Scene:
    """A random layout, for a random prompt or for the given one."""
    if prompt is None:
        c1, c2 = rng.sample(COLOURS, 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        spec = (
            Scene((Obj(c1, s1), Obj(c2, s2)), rng.choice(tuple(RELATIONS)))
            if rng.random() < TWO_OBJECT_SHARE
            else Scene((Obj(c1, s1),))
        )
    else:
        spec = parse_prompt(prompt)
    if spec.relation is None:
        size = rng.uniform(22, 34)
        lo, hi = size / 2 + 3, IMAGE_SIZE - size / 2 - 3
        (o,) = spec.objects
        return Scene((Obj(o.colour, o.shape, rng.uniform(lo, hi), rng.uniform(lo, hi), size),))
    # Two objects on a common axis, in order along the relation with a 3..10 px gap between their
    # bounding squares (centres >= 17 px apart), and at most 10 px apart across it.
    sizes = [rng.uniform(14, 22) for _ in range(2)]
    gap = rng.uniform(3, 10)
    start = rng.uniform(3, IMAGE_SIZE - 3 - (sizes[0] + gap + sizes[1]))
    along = [start + sizes[0] / 2, start + sizes[0] + gap + sizes[1] / 2]
    base = rng.uniform(20, 44)
    across = [base + rng.uniform(-5, 5) for _ in range(2)]
    dx, _ = RELATIONS[spec.relation]
    objs = []
    for i, o in enumerate(spec.objects):
        cx, cy = (along[i], across[i]) if dx else (across[i], along[i])
        objs.append(Obj(o.colour, o.shape, cx, cy, sizes[i]))
    return Scene(tuple(objs), spec.relation)


def example(index: int, seed: int = 0) -> Scene:
    """The index-th scene of the data set with this seed (deterministic, independent of other indices)."""
    return random_scene(random.Random(f"shapes:{seed}:{index}"))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene as an RGB image of side `size` (layouts are in IMAGE_SIZE pixels, then scaled)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    k = size / IMAGE_SIZE
    for o in scene.objects:
        h = o.size * k / 2
        x, y = o.cx * k, o.cy * k
        fill = PALETTE[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif o.shape == "triangle":  # pointing up, base at the bottom of the bounding square
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; expected one of {SHAPES}")
    return image


def render_batch(indices: range | list[int], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Images (batch, H, W, 3) uint8 and their prompts for a run of data-set indices."""
    scenes = [example(i, seed) for i in indices]
    images = np.stack([np.asarray(render(s)) for s in scenes])
    return images, [s.prompt for s in scenes]
