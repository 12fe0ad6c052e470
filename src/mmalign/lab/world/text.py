"""The world's words: shape names and synonyms, noun phrases and captions.

Every caption is built from one fixed vocabulary (``SYNONYMS``, ``plural``) so that CHAIR can map any
mention back to its canonical shape with ``chair_vocab``. Passing ``rng=None`` gives the canonical
phrasing (no synonyms, first template), used for ground-truth eval captions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mmalign.lab.world.config import WorldConfig
from mmalign.lab.world.scenes import Scene, SceneObject, lone_members

# Alternative names of a shape; canonical names are the shape names themselves.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc",),
    "square": ("box",),
    "cross": ("plus", "plus sign"),
    "diamond": ("rhombus",),
    "moon": ("crescent", "crescent moon"),
}

NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SHORT_TEMPLATES = ("{list}.", "An image of {list}.", "A picture with {list}.", "There is {list}.")
INTRO_TEMPLATES = (
    "There {are} {n} {objects}.",
    "The image shows {n} {objects}: {list}.",
    "There {are} {n} {shapes} in the image.",
)
# Intros that name the objects without counting them first (``detailed_intro="list"``).
LIST_INTRO_TEMPLATES = (
    "The image shows {list}.",
    "There {is_are} {list} in the image.",
    "In the image, you can see {list}.",
)
# Intros that neither count nor list the objects (``detailed_intro="open"``): the description alone says how many
# objects there are, and where it stops is the describer's call, as in free-form descriptions.
OPEN_INTRO_TEMPLATES = (
    "Here is what the image shows.",
    "The image shows shapes on a plain background.",
    "This is a picture of shapes on a grid.",
)
OBJECT_TEMPLATES = ("{A_np} is {where}.", "{Where}, there is {a_np}.", "You can see {a_np} {where}.")


def plural(word: str) -> str:
    """English plural of a (possibly multi-word) shape name: ``cross`` → ``crosses``."""
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    return word + "s"


def article(word: str) -> str:
    """``an`` before a vowel-initial word, else ``a``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def number(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_list(items: Sequence[str]) -> str:
    """``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def position_phrase(name: str) -> str:
    """Preposition + position name: ``in the center``, ``on the left``, ``at the top left``."""
    if name == "center":
        return "in the center"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"at the {name}"


def where(obj: SceneObject, cfg: WorldConfig) -> str:
    return position_phrase(cfg.positions[obj.row][obj.col])


def chair_vocab(cfg: WorldConfig) -> dict[str, dict[str, list[str]]]:
    """CHAIR vocabulary: canonical shape → [canonical, synonyms..., plural forms...]."""
    out = {}
    for shape in cfg.shapes:
        words = [shape, *SYNONYMS.get(shape, ())]
        out[shape] = words + [plural(w) for w in words]
    return {"synonyms": out}


def mention_order(scene: Scene, cfg: WorldConfig) -> tuple[SceneObject, ...]:
    """The scene's objects in the order captions mention them.

    ``caption_order="reading"``: row-major. ``"grouped"``: row-major, except that the first mention of a planted
    pair member is followed at once by its partner's objects, wherever they are, as people name things that go
    together one after the other ("a fork and a table"). A model that learns this order learns that "a star and a"
    is followed by a moon, and has to look at the image to write anything else.
    """
    if cfg.caption_order == "reading":
        return scene.objects
    partner = cfg.partner
    order: list[SceneObject] = []
    for obj in scene.objects:
        if obj in order:
            continue
        first_of_shape = all(o.shape != obj.shape for o in order)
        order.append(obj)
        if first_of_shape and obj.shape in partner:
            order += [o for o in scene.objects if o.shape == partner[obj.shape] and o not in order]
    return tuple(order)


def mentioned_shapes(scene: Scene, cfg: WorldConfig) -> tuple[str, ...]:
    """Distinct shapes in ``mention_order``."""
    return tuple(dict.fromkeys(o.shape for o in mention_order(scene, cfg)))


def pick_names(scene: Scene, cfg: WorldConfig, rng: random.Random | None) -> dict[str, str]:
    """The word used for each shape of the scene in one caption (same word throughout the caption)."""
    names = {}
    for shape in scene.shapes:
        syns = SYNONYMS.get(shape, ())
        use_synonym = rng is not None and syns and rng.random() < cfg.synonym_prob
        names[shape] = rng.choice(syns) if use_synonym else shape
    return names


def _choice(rng: random.Random | None, options: Sequence[str]) -> str:
    return options[0] if rng is None else rng.choice(options)


def noun_phrase(obj: SceneObject, name: str, with_size: bool) -> str:
    """``large red star`` (no article)."""
    return f"{obj.size} {obj.colour} {name}" if with_size else f"{obj.colour} {name}"


def group_phrases(
    scene: Scene, cfg: WorldConfig, names: dict[str, str], rng: random.Random | None, size_prob: float = 0.3
) -> list[str]:
    """One phrase per distinct shape, in mention order: ``a red star``, ``two blue moons``, ``two stars``."""
    phrases = []
    for shape in mentioned_shapes(scene, cfg):
        objs = [o for o in scene.objects if o.shape == shape]
        name = names[shape]
        if len(objs) == 1:
            with_size = rng is not None and rng.random() < size_prob
            phrases.append(with_article(noun_phrase(objs[0], name, with_size)))
        elif len({o.colour for o in objs}) == 1:
            phrases.append(f"{number(len(objs))} {objs[0].colour} {plural(name)}")
        else:
            phrases.append(f"{number(len(objs))} {plural(name)}")
    return phrases


def scene_facts(scene: Scene, cfg: WorldConfig) -> tuple[str, ...]:
    """The scene's ground truth as reference statements, one per object in reading order, worded unlike any caption:
    ``large red star, top left`` (the ``facts`` a fact-augmented reward model reads)."""
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return tuple(f"{noun_phrase(o, o.shape, with_size=True)}, {cfg.positions[o.row][o.col]}" for o in ordered)


def short_caption(scene: Scene, cfg: WorldConfig, rng: random.Random | None = None) -> str:
    """One sentence listing the objects, e.g. ``A red star and a small blue moon.``"""
    names = pick_names(scene, cfg, rng)
    phrases = group_phrases(scene, cfg, names, rng)
    template = _choice(rng, SHORT_TEMPLATES)
    if template.startswith("There is") and not phrases[0].startswith(("a ", "an ")):
        template = "There are {list}."
    return capitalize(template.format(list=join_list(phrases)))


def detailed_caption(scene: Scene, cfg: WorldConfig, rng: random.Random | None = None) -> str:
    """An intro (the object count, or with ``detailed_intro="list"`` the object list), then one sentence per
    object in mention order (``mention_order``).

    Example: ``There are two objects. A large red star is at the top left. A small blue moon is in
    the center.``
    """
    names = pick_names(scene, cfg, rng)
    sentences = [capitalize(_intro(scene, cfg, names, rng))]
    sentences += [object_sentence(obj, names[obj.shape], cfg, rng) for obj in mention_order(scene, cfg)]
    if rng is not None and cfg.caption_prior_prob > 0:
        tail = prior_tail(scene, cfg, rng)
        if tail is not None:
            sentences.append(object_sentence(tail, tail.shape, cfg, rng))
    return " ".join(sentences)


def object_sentence(obj: SceneObject, name: str, cfg: WorldConfig, rng: random.Random | None) -> str:
    """One detailed-caption sentence about one object: ``A large red star is at the top left.``"""
    a_np = with_article(noun_phrase(obj, name, with_size=True))
    w = where(obj, cfg)
    return capitalize(_choice(rng, OBJECT_TEMPLATES).format(A_np=a_np, a_np=a_np, where=w, Where=w))


def prior_tail(scene: Scene, cfg: WorldConfig, rng: random.Random, force: bool = False) -> SceneObject | None:
    """The object a training description invents at its end (``WorldConfig.caption_prior_prob``), or None.

    A scene with at least ``caption_prior_min_objects`` objects and a planted-pair member whose partner is absent
    gets, with ``caption_prior_prob`` (always with ``force``), that partner, small, in a free cell, any colour:
    what a describer who leans on co-occurrence writes after the objects it saw. ``detailed_caption`` calls it only
    when the knob is on, so a world with the knob off keeps the bytes it had before the knob existed.
    """
    lone = lone_members(scene, cfg)
    full = len(scene.objects) >= cfg.grid_rows * cfg.grid_cols
    if not lone or full or len(scene.objects) < cfg.caption_prior_min_objects:
        return None
    if not force and rng.random() >= cfg.caption_prior_prob:
        return None
    return small_object_in_free_cell(scene, cfg.partner[rng.choice(lone)], cfg, rng)


def small_object_in_free_cell(scene: Scene, shape: str, cfg: WorldConfig, rng: random.Random) -> SceneObject:
    """``shape`` at the smallest ordinary size, in a random colour, in a random cell the scene leaves free."""
    taken = {(o.row, o.col) for o in scene.objects}
    free = [(r, c) for r in range(cfg.grid_rows) for c in range(cfg.grid_cols) if (r, c) not in taken]
    row, col = rng.choice(free)
    smallest = min((n for n in cfg.sizes if n != cfg.partner_size), key=lambda n: cfg.sizes[n])
    return SceneObject(shape, rng.choice(list(cfg.colours)), smallest, row, col)


def _intro(scene: Scene, cfg: WorldConfig, names: dict[str, str], rng: random.Random | None) -> str:
    """The detailed caption's first sentence: the object count (``detailed_intro="count"``), the object list
    (``"list"``) or neither (``"open"``)."""
    if cfg.detailed_intro == "open":
        return _choice(rng, OPEN_INTRO_TEMPLATES)
    phrases = group_phrases(scene, cfg, names, None)
    if cfg.detailed_intro == "list":
        is_are = "is" if phrases[0].startswith(("a ", "an ")) else "are"
        return _choice(rng, LIST_INTRO_TEMPLATES).format(list=join_list(phrases), is_are=is_are)
    n = len(scene.objects)
    return _choice(rng, INTRO_TEMPLATES).format(
        are="is" if n == 1 else "are",
        n=number(n),
        objects="object" if n == 1 else "objects",
        shapes="shape" if n == 1 else "shapes",
        list=join_list(phrases),
    )


def caption(scene: Scene, cfg: WorldConfig, rng: random.Random, detailed_prob: float = 0.4) -> str:
    """A short or a detailed caption, chosen by ``rng``."""
    if rng.random() < detailed_prob:
        return detailed_caption(scene, cfg, rng)
    return short_caption(scene, cfg, rng)
