"""Procedural scenes for shapes_vqa: sampling (pure numpy), text (captions, questions) and rendering (PIL).

A scene is 1-4 shapes on a plain or lightly noisy background. Position rule: the image is cut into a 3x3
grid of equal cells and shapes sit only in the five cells of the middle row and middle column, each shape
fully inside its own cell, so its position word is unambiguous: the cell holding it is `left`, `right`,
`top`, `bottom` or `center`. Shapes never overlap and never touch the border.

Every answer is one word from a small closed set, so exact match scores it. Answers are balanced by
construction (counts uniform over 1-4, positions uniform over the five cells, yes/no drawn 50/50, the
comparison outcome drawn before the scenes), so a blind model that always says the majority answer of a
question type stays near 1 / (number of answers).
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (220, 45, 45), "green": (40, 170, 70), "blue": (45, 90, 230), "yellow": (240, 205, 35),
           "purple": (150, 70, 200), "orange": (245, 135, 30)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
# (column, row) of each position's cell in the 3x3 grid.
CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
# Caption order: reading order of the cells.
READING_ORDER = ("top", "left", "center", "right", "bottom")
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
IMAGE_SIZES = ((48, 48), (64, 48), (96, 48), (48, 64), (64, 64))  # (width, height)
NUMBERS = ("zero", "one", "two", "three", "four")
ORDINALS = ("first", "second")
QUESTION_TYPES = ("colour", "shape", "count", "presence", "position", "comparison")
SINGLE_IMAGE_TYPES = QUESTION_TYPES[:5]

TWO_IMAGE_FRACTION = 0.25
QUESTIONS_PER_EXAMPLE = 3
RADIUS = {"small": 0.3, "large": 0.45}  # fraction of the cell's shorter side
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  size: str
  position: str
  jitter: tuple[float, float] = (0.0, 0.0)  # centre offset, as a fraction of the free room in the cell


@dataclasses.dataclass(frozen=True)
class Scene:
  width: int
  height: int
  background: tuple[int, int, int]
  noise: float  # std of the Gaussian pixel noise, 0 for a solid background
  shapes: tuple[Shape, ...]


@dataclasses.dataclass(frozen=True)
class Example:
  scenes: tuple[Scene, ...]
  caption: str
  turns: tuple[tuple[str, str], ...]  # (role, content); the first user turn starts with the <image> marks
  question_types: tuple[str, ...]
  negative_captions: tuple[str, ...] = ()  # hard negatives of a one-image caption (`negative_captions`)


# ---------------------------------------------------------------------------------------------------
# Sampling


def sample_scene(rng: np.random.Generator, num_shapes: int) -> Scene:
  """A scene with `num_shapes` shapes in distinct cells, every (colour, kind) pair distinct."""
  width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
  level = int(rng.integers(20, 71) if rng.random() < 0.5 else rng.integers(170, 236))
  background = tuple(int(np.clip(level + t, 0, 255)) for t in rng.integers(-12, 13, size=3))
  noise = float(rng.choice([0.0, 6.0]))
  positions = rng.permutation(len(POSITIONS))[:num_shapes]
  shapes, pairs = [], set()
  for p in positions:
    while True:
      kind, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
      if (colour, kind) not in pairs:
        break
    pairs.add((colour, kind))
    jitter = tuple(float(j) for j in rng.uniform(-1.0, 1.0, size=2))
    shapes.append(Shape(kind, colour, SIZES[rng.integers(2)], POSITIONS[p], jitter))
  return Scene(int(width), int(height), background, noise, tuple(shapes))


def sample_example(rng: np.random.Generator) -> Example:
  """One example: one scene (3 questions of distinct types) or two scenes (a comparison + 2 questions)."""
  if rng.random() < TWO_IMAGE_FRACTION:
    outcome = ("first", "second", "same")[rng.integers(3)]
    pairs = [(a, b) for a in range(1, 5) for b in range(1, 5)
             if (a > b) == (outcome == "first") and (a < b) == (outcome == "second")]
    n1, n2 = pairs[rng.integers(len(pairs))]
    scenes = (sample_scene(rng, n1), sample_scene(rng, n2))
  else:
    scenes = (sample_scene(rng, int(rng.integers(1, 5))),)
  qa = []
  if len(scenes) == 2:
    qa.append(comparison_question(rng, scenes))
  types = rng.permutation(len(SINGLE_IMAGE_TYPES))[:QUESTIONS_PER_EXAMPLE - len(qa)]
  for t in types:
    which = int(rng.integers(len(scenes)))
    question, answer = QUESTION_MAKERS[SINGLE_IMAGE_TYPES[t]](rng, scenes[which])
    if len(scenes) == 2:
      question = f"In the {ORDINALS[which]} image, {question[0].lower()}{question[1:]}"
    qa.append((SINGLE_IMAGE_TYPES[t], question, answer))
  turns = []
  for i, (_, question, answer) in enumerate(qa):
    prefix = "<image>\n" * len(scenes) if i == 0 else ""
    turns += [("user", prefix + question), ("assistant", answer)]
  # Drawn last, so the questions of an index do not depend on them.
  negatives = negative_captions(rng, scenes[0]) if len(scenes) == 1 else ()
  return Example(scenes, caption(scenes), tuple(turns), tuple(t for t, _, _ in qa), negatives)


# ---------------------------------------------------------------------------------------------------
# Text


def describe(shape: Shape) -> str:
  return f"a {shape.size} {shape.colour} {shape.kind} {PHRASES[shape.position]}"


def scene_caption(scene: Scene) -> str:
  """'a large red circle on the left and a small blue square at the bottom' (cells in reading order)."""
  parts = [describe(s) for s in sorted(scene.shapes, key=lambda s: READING_ORDER.index(s.position))]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scenes: tuple[Scene, ...]) -> str:
  if len(scenes) == 1:
    return scene_caption(scenes[0])
  return "; ".join(f"in the {o} image, {scene_caption(s)}" for o, s in zip(ORDINALS, scenes))


def negative_captions(rng: np.random.Generator, scene: Scene) -> tuple[str, ...]:
  """Hard negatives (as in NegCLIP) for contrastive pretraining: the caption with one fact made false, one
  each of kind, position, colour and size, in that order (the questions ask about the first three; colour
  alone already tells most captions of a batch apart, so kind and position come first for small K). A global image embedding can tell them from
  the true caption only if it knows which shape of which colour sits where, so training against them pushes
  kind, colour and location into the patch features that the VLM later reads."""
  shapes = list(scene.shapes)
  empty = [p for p in POSITIONS if p not in {s.position for s in shapes}]

  def changed(field: str, choices) -> str:
    i = int(rng.integers(len(shapes)))
    options = [c for c in choices if c != getattr(shapes[i], field)]
    other = dataclasses.replace(shapes[i], **{field: options[rng.integers(len(options))]})
    return scene_caption(dataclasses.replace(scene, shapes=tuple(shapes[:i] + [other] + shapes[i + 1:])))
  return (changed("kind", SHAPES), changed("position", empty), changed("colour", list(COLOURS)),
          changed("size", SIZES))


def _pick(rng: np.random.Generator, scene: Scene) -> Shape:
  return scene.shapes[rng.integers(len(scene.shapes))]


def _name_by_kind(shape: Shape, scene: Scene) -> str:
  """'the circle', or 'the circle on the left' when the scene has another circle."""
  unique = sum(s.kind == shape.kind for s in scene.shapes) == 1
  return f"the {shape.kind}" + ("" if unique else f" {PHRASES[shape.position]}")


def _name_by_colour(shape: Shape, scene: Scene) -> str:
  unique = sum(s.colour == shape.colour for s in scene.shapes) == 1
  return f"the {shape.colour} shape" + ("" if unique else f" {PHRASES[shape.position]}")


def colour_question(rng, scene):
  shape = _pick(rng, scene)
  return f"What colour is {_name_by_kind(shape, scene)}?", shape.colour


def shape_question(rng, scene):
  shape = _pick(rng, scene)
  return f"What shape is {_name_by_colour(shape, scene)}?", shape.kind


def count_question(rng, scene):
  return "How many shapes are there?", NUMBERS[len(scene.shapes)]


def presence_question(rng, scene):
  present = {(s.colour, s.kind) for s in scene.shapes}
  if rng.random() < 0.5:
    shape = _pick(rng, scene)
    colour, kind, answer = shape.colour, shape.kind, "yes"
  else:
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    (colour, kind), answer = absent[rng.integers(len(absent))], "no"
  return f"Is there a {colour} {kind}?", answer


def position_question(rng, scene):
  shape = _pick(rng, scene)
  return f"Where is the {shape.colour} {shape.kind}?", shape.position


def comparison_question(rng, scenes):
  """('comparison', question, 'first' | 'second' | 'same') about a pair of scenes."""
  n1, n2 = len(scenes[0].shapes), len(scenes[1].shapes)
  if rng.random() < 0.5:
    which = int(rng.integers(2))
    other = {(s.colour, s.kind) for s in scenes[1 - which].shapes}
    only = [s for s in scenes[which].shapes if (s.colour, s.kind) not in other]
    if only:
      shape = only[rng.integers(len(only))]
      return "comparison", f"Which image has a {shape.colour} {shape.kind}?", ORDINALS[which]
  answer = "same" if n1 == n2 else ORDINALS[int(n2 > n1)]
  return "comparison", "Which image has more shapes?", answer


QUESTION_MAKERS = {"colour": colour_question, "shape": shape_question, "count": count_question,
                   "presence": presence_question, "position": position_question}


# ---------------------------------------------------------------------------------------------------
# Rendering


def shape_box(shape: Shape, width: int, height: int) -> tuple[float, float, float]:
  """(centre x, centre y, radius) in pixels; the shape stays inside its cell."""
  cw, ch = width / 3, height / 3
  radius = RADIUS[shape.size] * min(cw, ch)
  col, row = CELLS[shape.position]
  cx = (col + 0.5) * cw + shape.jitter[0] * (cw / 2 - radius)
  cy = (row + 0.5) * ch + shape.jitter[1] * (ch / 2 - radius)
  return cx, cy, radius


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
  """Polygon vertices of a shape (None for the circle, drawn as an ellipse)."""
  if kind == "circle":
    return None
  if kind == "square":
    h = 0.85 * r
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if kind == "triangle":  # centroid at the centre, apex up
    return [(cx + r * np.cos(a), cy + 0.15 * r + r * np.sin(a)) for a in np.radians([-90, 30, 150])]
  if kind == "star":
    angles = np.radians(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
  if kind == "cross":
    a, w = r, 0.35 * r
    return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
            (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
            (cx - a, cy - w), (cx - w, cy - w)]
  raise ValueError(f"Unknown shape kind {kind!r}; known: {SHAPES}.")


def render(scene: Scene, noise_seed: int = 0) -> np.ndarray:
  """uint8 [height, width, 3] image of `scene`; the noise is a pure function of `noise_seed`."""
  s = SUPERSAMPLE
  canvas = PIL.Image.new("RGB", (scene.width * s, scene.height * s), scene.background)
  draw = PIL.ImageDraw.Draw(canvas)
  for shape in scene.shapes:
    cx, cy, r = (v * s for v in shape_box(shape, scene.width, scene.height))
    points = _outline(shape.kind, cx, cy, r)
    if points is None:
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[shape.colour])
    else:
      draw.polygon(points, fill=COLOURS[shape.colour])
  image = np.asarray(canvas.resize((scene.width, scene.height), PIL.Image.BOX))
  if scene.noise:
    noise = np.random.default_rng(noise_seed).normal(0.0, scene.noise, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
  return image


def png_bytes(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(image).save(out, format="PNG", compress_level=1)
  return out.getvalue()
