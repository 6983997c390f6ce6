"""A synthetic visual QA task whose answers live in a few image patches.

Each image is a coarse ``grid x grid`` board (336 px by default) with a few coloured shapes, one
per cell. Questions ask for a colour, a shape, a position or a count; answers are 1 to 3 words.
With 336 px and the 14 px patches of LLaVA-1.5's CLIP, one cell of a 3x3 grid covers 8x8 of the
24x24 visual tokens, so an answer depends on one or a few cells' tokens: exactly what token
compression can keep or lose.

Answerability: the first question of every sample is drawn from balanced decks (question types
rotate in shuffled blocks, and each type's answers are dealt from a reshuffled deck), and the
scene is built *around* that answer, independently of the words in the question. So no answer is
predictable from the question alone (see :func:`majority_baseline`), and the distractors make
binding necessary: a colour question's shape is unique on the board, a position question's
colour+shape pair is unique, but other objects may share the colour or the shape.

Records follow LLaVA's conversation JSON (``id``, ``image``, ``conversations``) plus ``scene`` (the
board, in cell units, from which :func:`render` draws the image at any size) and
``question_types``. Everything is a pure function of ``seed``: ``generate(n, seed)[:k] ==
generate(k, seed)``.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

COLOURS = {                       # saturated, far from each other and from the grey background
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
QUESTION_TYPES = ("colour", "shape", "position", "count")
MAX_COUNT = 3                     # count answers are 0..3 (capped by max_objects)

# Row and column words per grid size; "center" alone names the middle cell of an odd grid.
_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom"), 4: ("top", "upper", "lower", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "center", "right"), 4: ("far left", "left", "right", "far right")}

# Two phrasings per type, so the model has to read the question rather than memorise one string.
TEMPLATES = {
    "colour": ("What colour is the {shape}?", "Which colour is the {shape}?"),
    "shape": ("What shape is at the {position}?", "Which shape is in the {position}?"),
    "position": ("Where is the {colour} {shape}?", "In which cell is the {colour} {shape}?"),
    "count": ("How many {shapes} are there?", "How many {shapes} are in the image?"),
}

# Object geometry in cell units: side (or diameter) and the largest centre offset. The bound
# keeps every object strictly inside its cell: max |offset| + size / 2 < 1 / 2.
_SIZE = (0.5, 0.7)
_JITTER = 0.6


def grids() -> tuple[int, ...]:
    return tuple(sorted(_ROWS))


def position_name(row: int, col: int, grid: int = 3) -> str:
    _check_grid(grid)
    if grid % 2 and row == col == grid // 2:
        return "center"
    return f"{_ROWS[grid][row]} {_COLS[grid][col]}"


def positions(grid: int = 3) -> list[str]:
    """Position names in row-major cell order."""
    return [position_name(r, c, grid) for r in range(grid) for c in range(grid)]


def answer_sets(grid: int = 3, max_objects: int = 4) -> dict[str, list[str]]:
    """Every possible answer of each question type."""
    return {"colour": list(COLOURS), "shape": list(SHAPES), "position": positions(grid),
            "count": [str(k) for k in range(min(MAX_COUNT, max_objects) + 1)]}


def vocabulary() -> list[str]:
    """Every word and punctuation mark any question or answer can contain (all grid sizes),
    split like a whitespace/punctuation pre-tokenizer (``\\w+|[^\\w\\s]+``)."""
    texts = []
    for grid in grids():
        texts += positions(grid)
    texts += list(COLOURS) + list(SHAPES) + list(PLURALS.values()) + [str(k) for k in range(MAX_COUNT + 1)]
    texts += [t for ts in TEMPLATES.values() for t in ts]
    words = set()
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]+", re.sub(r"\{\w+\}", " ", t)))
    return sorted(words)


def _check_grid(grid: int) -> None:
    if grid not in _ROWS:
        raise ValueError(f"grid: {grid!r} is not supported; choose one of {grids()}")


# --------------------------------------------------------------------------- scenes

class _Deck:
    """Deals items in reshuffled rounds: each item appears once per round, so any prefix of the
    stream is balanced to within one round."""

    def __init__(self, items: Sequence, rng: random.Random):
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self):
        if not self.pile:
            self.pile = self.items[:]
            self.rng.shuffle(self.pile)
        return self.pile.pop()


def _obj(rng: random.Random, shape: str, colour: str, cell: int, grid: int) -> dict:
    size = round(rng.uniform(*_SIZE), 4)
    lim = (1 - size) / 2 * _JITTER
    return {"shape": shape, "colour": colour, "row": cell // grid, "col": cell % grid, "size": size,
            "dx": round(rng.uniform(-lim, lim), 4), "dy": round(rng.uniform(-lim, lim), 4)}


def _build_scene(rng: random.Random, qtype: str, answer: str, grid: int, min_objects: int,
                 max_objects: int) -> tuple[list[dict], dict]:
    """Objects whose board answers ``qtype`` with ``answer``, and the template fields."""
    cells = list(range(grid * grid))
    n = rng.randint(min_objects, max_objects)
    colours, shapes = list(COLOURS), list(SHAPES)
    if qtype == "colour":
        shape = rng.choice(shapes)
        others = [s for s in shapes if s != shape]          # the asked shape stays unique
        specs = [(shape, answer)] + [(rng.choice(others), rng.choice(colours)) for _ in range(n - 1)]
        fields = {"shape": shape}
        order = rng.sample(cells, n)
    elif qtype == "shape":
        specs = [(answer, rng.choice(colours))] + [(rng.choice(shapes), rng.choice(colours)) for _ in range(n - 1)]
        target = rng.choice(cells)
        order = [target] + rng.sample([c for c in cells if c != target], n - 1)
        fields = {"position": position_name(target // grid, target % grid, grid)}
    elif qtype == "position":
        target = positions(grid).index(answer)
        shape, colour = rng.choice(shapes), rng.choice(colours)
        specs = [(shape, colour)]
        while len(specs) < n:                               # the asked pair stays unique
            s, c = rng.choice(shapes), rng.choice(colours)
            if (s, c) != (shape, colour):
                specs.append((s, c))
        order = [target] + rng.sample([c for c in cells if c != target], n - 1)
        fields = {"shape": shape, "colour": colour}
    elif qtype == "count":
        k = int(answer)
        shape = rng.choice(shapes)
        others = [s for s in shapes if s != shape]
        n = max(n, k)
        specs = [(shape, rng.choice(colours)) for _ in range(k)]
        specs += [(rng.choice(others), rng.choice(colours)) for _ in range(n - k)]
        order = rng.sample(cells, n)
        fields = {"shape": shape, "shapes": PLURALS[shape]}
    else:
        raise ValueError(f"question_types: unknown type {qtype!r}; choose from {QUESTION_TYPES}")
    objects = [_obj(rng, s, c, cell, grid) for (s, c), cell in zip(specs, order)]
    objects.sort(key=lambda o: (o["row"], o["col"]))        # canonical order: no hint in the list
    return objects, fields


def answer_for(scene: dict, qtype: str, fields: dict) -> str | None:
    """The answer the board gives to a question, or None when it has no unique answer. The
    generator's own consistency check (and a usable oracle for tests)."""
    objs, grid = scene["objects"], scene["grid"]
    if qtype == "colour":
        hits = [o for o in objs if o["shape"] == fields["shape"]]
        return hits[0]["colour"] if len(hits) == 1 else None
    if qtype == "shape":
        hits = [o for o in objs if position_name(o["row"], o["col"], grid) == fields["position"]]
        return hits[0]["shape"] if len(hits) == 1 else None
    if qtype == "position":
        hits = [o for o in objs if o["shape"] == fields["shape"] and o["colour"] == fields["colour"]]
        return position_name(hits[0]["row"], hits[0]["col"], grid) if len(hits) == 1 else None
    if qtype == "count":
        return str(sum(o["shape"] == fields["shape"] for o in objs))
    raise ValueError(f"qtype: unknown type {qtype!r}")


def _follow_up(rng: random.Random, scene: dict, asked: set, types: Sequence[str]):
    """One more answerable question about an existing board (multi-turn samples)."""
    objs, grid = scene["objects"], scene["grid"]
    options = []
    for qtype in types:
        if qtype == "colour":
            cands = [{"shape": s} for s in SHAPES]
        elif qtype == "shape":
            cands = [{"position": position_name(o["row"], o["col"], grid)} for o in objs]
        elif qtype == "position":
            cands = [{"shape": o["shape"], "colour": o["colour"]} for o in objs]
        else:
            cands = [{"shape": s, "shapes": PLURALS[s]} for s in SHAPES]
        for f in cands:
            key = (qtype, tuple(sorted(f.items())))
            if key not in asked and answer_for(scene, qtype, f) is not None:
                options.append((qtype, f, key))
    if not options:
        return None
    return rng.choice(options)


def generate(n: int, seed: int = 0, *, grid: int = 3, min_objects: int = 2, max_objects: int = 4,
             turns: int = 1, question_types: Sequence[str] = QUESTION_TYPES) -> list[dict]:
    """``n`` samples in LLaVA's conversation format, deterministic in ``seed``.

    Each record: ``{"id", "image": "<id>.png", "conversations": [{"from": "human", "value":
    "<image>\\nQuestion"}, {"from": "gpt", "value": "answer"}, ...], "scene": {"grid",
    "background": [r, g, b], "objects": [{"shape", "colour", "row", "col", "size", "dx", "dy"}]},
    "question_types": [...]}``. ``turns > 1`` adds follow-up questions about the same board (only
    the first question is drawn from the balanced decks)."""
    _check_grid(grid)
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if not 1 <= min_objects <= max_objects <= grid * grid:
        raise ValueError(f"max_objects: need 1 <= min_objects <= max_objects <= {grid * grid} cells, "
                         f"got {min_objects}..{max_objects}")
    if turns < 1:
        raise ValueError(f"turns: must be >= 1, got {turns}")
    types = list(question_types)
    if not types or any(t not in QUESTION_TYPES for t in types):
        raise ValueError(f"question_types: choose a non-empty subset of {QUESTION_TYPES}, got {question_types!r}")
    rng = random.Random(seed)
    type_deck = _Deck(types, rng)
    answers = answer_sets(grid, max_objects)
    decks = {t: _Deck(answers[t], rng) for t in types}
    records = []
    for i in range(n):
        qtype = type_deck.draw()
        answer = decks[qtype].draw()
        objects, fields = _build_scene(rng, qtype, answer, grid, min_objects, max_objects)
        scene = {"grid": grid, "background": [rng.randint(215, 250)] * 3, "objects": objects}
        assert answer_for(scene, qtype, fields) == answer
        qa = [(qtype, rng.choice(TEMPLATES[qtype]).format(**fields), answer)]
        asked = {(qtype, tuple(sorted(fields.items())))}
        for _ in range(turns - 1):
            pick = _follow_up(rng, scene, asked, types)
            if pick is None:
                break
            t, f, key = pick
            asked.add(key)
            qa.append((t, rng.choice(TEMPLATES[t]).format(**f), answer_for(scene, t, f)))
        rid = f"synthetic-{seed}-{i:06d}"
        conv = []
        for j, (_, q, a) in enumerate(qa):
            conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
            conv.append({"from": "gpt", "value": a})
        records.append({"id": rid, "image": f"{rid}.png", "conversations": conv, "scene": scene,
                        "question_types": [t for t, _, _ in qa]})
    return records


# --------------------------------------------------------------------------- images

def render(record_or_scene: dict, image_size: int = 336):
    """The board as an RGB PIL image. Drawn without anti-aliasing, so every object's centre pixel
    has exactly its colour and empty cells are exactly the background."""
    from PIL import Image, ImageDraw
    scene = record_or_scene.get("scene", record_or_scene)
    grid = scene["grid"]
    _check_grid(grid)
    img = Image.new("RGB", (image_size, image_size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    cell = image_size / grid
    for o in scene["objects"]:
        cx, cy = object_centre(o, image_size, grid)
        h = o["size"] * cell / 2
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
        elif o["shape"] == "cross":
            t = h / 3                                        # arm half-width
            draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
        else:
            raise ValueError(f"record_or_scene: unknown shape {o['shape']!r}")
    return img


def object_centre(obj: dict, image_size: int = 336, grid: int = 3) -> tuple[int, int]:
    """Pixel (x, y) of an object's centre: inside the drawn shape for every shape."""
    cell = image_size / grid
    return (round((obj["col"] + 0.5 + obj["dx"]) * cell), round((obj["row"] + 0.5 + obj["dy"]) * cell))


def render_images(records: Iterable[dict], image_size: int = 336) -> list:
    """In-memory variant: the PIL images of ``records``, in order, without touching the disk."""
    return [render(r, image_size) for r in records]


def save_dataset(records: Sequence[dict], folder, json_name: str = "data.json", image_size: int = 336) -> Path:
    """Write every record's image (PNG, lossless) under ``folder`` and the records as JSON
    (``folder / json_name``). Returns the JSON path; images go next to it, named by ``image``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        render(r, image_size).save(folder / r["image"])
    path = folder / json_name
    with open(path, "w") as f:
        json.dump(list(records), f)
    return path


# --------------------------------------------------------------------------- scoring

def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or trailing full stop."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Exact-match accuracy after :func:`normalize_answer` (whitespace and case)."""
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers):
        raise ValueError(f"predictions: {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("answers: empty")
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
    return hits / len(answers)


def first_qa(record: dict) -> tuple[str, str]:
    """(question without the image tag, answer) of a record's first turn."""
    conv = record["conversations"]
    return conv[0]["value"].replace("<image>", "").strip(), conv[1]["value"].strip()


def majority_baseline(records: Sequence[dict]) -> float:
    """Accuracy of a blind model that answers each question string with its most frequent answer
    in ``records`` itself (an optimistic, question-only upper bound: near chance when the task
    really needs the image)."""
    from collections import Counter, defaultdict
    by_question = defaultdict(Counter)
    for r in records:
        q, a = first_qa(r)
        by_question[q][a] += 1
    if not records:
        raise ValueError("records: empty")
    return sum(c.most_common(1)[0][1] for c in by_question.values()) / len(records)
