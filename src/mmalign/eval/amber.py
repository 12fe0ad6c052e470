"""AMBER (Wang et al., arXiv 2311.07397; spec §9.5, files §15.1): LLM-free generative and yes/no hallucination scores.

Released files (the AMBER repository's ``data/`` directory): ``annotations.json`` (index = id − 1),
``relation.json`` (object word → associated words), ``safe_words.txt``, ``query/query_*.json``; responses are a
JSON list of ``{"id", "response"}``.

Generative items (describe the image): the response's nouns that belong to the AMBER vocabulary (keys and values of
``relation.json``) are counted; a noun in ``safe_words.txt`` is skipped (but stays in the denominator); a noun equal
to a truth object or one of its associated words (or, with a similarity function, more similar than the threshold to
one) covers that object; otherwise it is hallucinated. Nouns are matched the same way against the annotated "hallu"
objects (Cog).

* CHAIR = hallucinated nouns / vocabulary nouns; Cover = covered truth objects / truth objects;
  Hal = % of responses with a hallucinated noun; Cog = matched "hallu" objects / "hallu" objects.

Discriminative items: the response must be exactly "Yes" or "No"; "No" is the positive class. Accuracy, precision,
recall and F1 overall and per dimension (existence, attribute with state / number / action, relation).
AMBER score = ½·[(100 − CHAIR) + F1].

Every figure is computed as the official script does: counters whose denominators start at 0.001 (``metrics.txt``),
percentages rounded to 0.1, F1 from the rounded precision and recall with 1e-4 (existence: 1e-3) in its denominator.
Noun extraction: the official NLTK pipeline (tokenise, POS-tag, keep NN*, WordNet-lemmatise) with ``nouns="nltk"``
(needs NLTK and its data installed locally); by default a rule-based stand-in without a tagger (see ``rule_nouns``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError, DataError
from mmalign.eval.chair_score import word_tokenize
from mmalign.eval.coco_vocab import singularize
from mmalign.eval.io import get_field, int_field, read_rows, read_text, require_file, show, str_field

GENERATIVE = "generative"
# Annotation type → dimension of the discriminative task.
DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
    "discriminative-relation": "relation",
    "relation": "relation",
}
ATTRIBUTE_PARTS = ("state", "number", "action")
# ``--evaluation_type`` → the query file it reads and the parts it scores.
EVALUATION_TYPES = {
    "a": ("query_all.json", ("g", "de", "da", "dr")),
    "g": ("query_generative.json", ("g",)),
    "d": ("query_discriminative.json", ("de", "da", "dr")),
    "de": ("query_discriminative-existence.json", ("de",)),
    "da": ("query_discriminative-attribute.json", ("da",)),
    "dr": ("query_discriminative-relation.json", ("dr",)),
}
_START = 0.001  # every denominator's start value in the official metrics.txt

Similarity = Callable[[str, str], float]


@dataclass(frozen=True)
class AmberAnnotation:
    """One row of ``annotations.json``: generative (``truth``/``hallu`` objects) or yes/no (``answer``)."""

    id: int
    type: str
    truth: tuple[str, ...] = ()
    hallu: tuple[str, ...] = ()
    answer: str = ""


@dataclass(frozen=True)
class AmberQuery:
    """One row of a ``query_*.json`` file."""

    id: int
    image: str
    query: str


@dataclass(frozen=True)
class AmberData:
    """The released files the scorer needs."""

    annotations: tuple[AmberAnnotation, ...]
    association: Mapping[str, tuple[str, ...]]
    safe_words: frozenset[str]
    path: Path

    @functools.cached_property
    def vocabulary(self) -> frozenset[str]:
        """The generative noun vocabulary: keys and values of ``relation.json``."""
        return frozenset(self.association) | {w for words in self.association.values() for w in words}


# --- readers -------------------------------------------------------------------------------------------------


def _file(directory: Path, name: str) -> Path:
    return require_file(directory, name, "give the AMBER repository's data/ directory")


def read_amber_data(directory: str | Path) -> AmberData:
    """``annotations.json``, ``relation.json`` and ``safe_words.txt`` of an AMBER ``data/`` directory.

    Raises:
        DataError: a missing file, or a row or field that does not follow the released schema.
    """
    root = Path(directory)
    relation = _read_relation(_file(root, "relation.json"))
    safe = frozenset(read_text(_file(root, "safe_words.txt")).splitlines())
    path = _file(root, "annotations.json")
    annotations = tuple(_annotation(path, row, rec, relation) for row, rec in read_rows(path))
    return AmberData(annotations, relation, safe, root)


def _read_relation(path: Path) -> dict[str, tuple[str, ...]]:
    rows = read_rows(path)
    if len(rows) != 1:
        raise DataError(path, None, None, "expected one JSON object {object word: [associated words]}")
    relation = {}
    for word, associated in rows[0][1].items():
        if not isinstance(associated, list) or not all(isinstance(w, str) for w in associated):
            raise DataError(path, None, word, f"expected a list of words, got {show(associated)}")
        relation[word] = tuple(associated)
    return relation


def _annotation(path: Path, row: int, rec: dict[str, Any], relation: Mapping[str, Any]) -> AmberAnnotation:
    ident = int_field(path, row, rec, "id")
    if ident != row:
        raise DataError(path, row, "id", f"expected {row}: the scorer reads the annotation of id i at index i - 1")
    kind = str_field(path, row, rec, "type")
    if kind == GENERATIVE:
        truth, hallu = (_objects(path, row, rec, key, relation) for key in ("truth", "hallu"))
        return AmberAnnotation(ident, kind, truth, hallu)
    if kind not in DIMENSIONS:
        raise DataError(path, row, "type", f"unknown type {show(kind)}")
    answer = get_field(path, row, rec, "truth")
    if answer not in ("yes", "no"):
        raise DataError(path, row, "truth", f'expected "yes" or "no", got {show(answer)}')
    return AmberAnnotation(ident, kind, answer=answer)


def _objects(path: Path, row: int, rec: dict[str, Any], key: str, relation: Mapping[str, Any]) -> tuple[str, ...]:
    value = get_field(path, row, rec, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, row, key, f"expected a list of object words, got {show(value)}")
    for word in value:
        if word not in relation:
            raise DataError(path, row, key, f"object {show(word)} is not a key of relation.json")
    return tuple(value)


def read_amber_queries(directory: str | Path, evaluation_type: str = "a") -> tuple[Path, list[AmberQuery]]:
    """The query file of an evaluation type (``query/query_all.json`` for ``a``) and its rows.

    Raises:
        DataError: a missing file or a bad row.
    """
    name = EVALUATION_TYPES[evaluation_type][0]
    path = _file(Path(directory) / "query", name)
    queries = [
        AmberQuery(
            int_field(path, row, rec, "id"), str_field(path, row, rec, "image"), str_field(path, row, rec, "query")
        )
        for row, rec in read_rows(path)
    ]
    if not queries:
        raise DataError(path, None, None, "no queries in file")
    return path, queries


def read_amber_responses(path: str | Path, n_annotations: int) -> list[tuple[int, str]]:
    """``(id, response)`` of a response file (JSON list of ``{"id", "response"}``), in file order.

    Raises:
        DataError: a bad row, or an id outside ``1..n_annotations``.
    """
    out = []
    for row, rec in read_rows(path):
        ident = int_field(path, row, rec, "id")
        if not 1 <= ident <= n_annotations:
            raise DataError(path, row, "id", f"id {ident} is outside the annotations (1..{n_annotations})")
        out.append((ident, str_field(path, row, rec, "response")))
    if not out:
        raise DataError(path, None, None, "no responses in file")
    return out


# --- nouns and similarity ------------------------------------------------------------------------------------


def rule_nouns(text: str, vocabulary: Collection[str]) -> list[str]:
    """Lemmas of the words of ``text`` (a stand-in for the official NLTK noun extraction, without a POS tagger).

    Every token counts as a candidate noun (a word of the vocabulary used as a verb or adjective therefore counts
    too: the official tagger would drop it); the lemma is the singular (``coco_vocab.singularize``), or the word as
    written when only that form is in the vocabulary. Case is kept, as in the official script (a capitalised word
    does not match the lowercase vocabulary).
    """
    out = []
    for token in word_tokenize(text):
        lemma = singularize(token)
        out.append(token if lemma not in vocabulary and token in vocabulary else lemma)
    return out


def nltk_nouns(text: str) -> list[str]:
    """The official extraction: NLTK ``word_tokenize``, ``pos_tag``, keep NN* tags, WordNet-lemmatise.

    Raises:
        ConfigError: NLTK or its data (punkt, averaged_perceptron_tagger, wordnet) is not installed locally.
    """
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise ConfigError("--nouns nltk needs the nltk package (pip install nltk)") from None
    try:
        tagged = nltk.pos_tag(nltk.word_tokenize(text))
        lemmatizer = WordNetLemmatizer()
        return [lemmatizer.lemmatize(word) for word, pos in tagged if pos.startswith("NN")]
    except LookupError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "missing data"
        raise ConfigError(f"--nouns nltk: NLTK data is not installed locally ({first})") from None


def noun_extractor(name: str, vocabulary: Collection[str]) -> Callable[[str], list[str]]:
    """``"rules"`` (default, no dependency) or ``"nltk"`` (the official pipeline)."""
    if name == "nltk":
        nltk_nouns("A probe.")  # fail now, before any generation, when NLTK or its data is missing
        return nltk_nouns
    if name == "rules":
        return functools.partial(rule_nouns, vocabulary=vocabulary)
    raise ConfigError(f"unknown noun extractor {name!r} (expected 'rules' or 'nltk')")


def exact_similarity(a: str, b: str) -> float:
    """1.0 for the same word, else 0.0: matching without word vectors."""
    return 1.0 if a == b else 0.0


def spacy_similarity(model: str) -> Similarity:
    """Word-vector similarity from an installed spaCy model (``en_core_web_lg`` as in the official script).

    ``model`` is an installed package name or a model directory; nothing is downloaded.

    Raises:
        ConfigError: spaCy or the model is not installed.
    """
    try:
        import spacy
    except ImportError:
        raise ConfigError("--spacy-model needs the spacy package") from None
    try:
        nlp = spacy.load(model)
    except OSError as err:
        raise ConfigError(f"--spacy-model {model}: cannot load it locally ({err})") from None
    doc = functools.lru_cache(maxsize=1 << 16)(nlp)
    return lambda a, b: float(doc(a).similarity(doc(b)))


# --- scoring -------------------------------------------------------------------------------------------------


def _first_match(noun: str, entries: Sequence[tuple[str, int]], same: Callable[[str, str], bool]) -> int | None:
    """The object index of the first entry ``noun`` matches (entries: associated words first, then the objects)."""
    return next((k for word, k in entries if same(noun, word)), None)


def _entries(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> list[tuple[str, int]]:
    """The official search order: every object's associated words, then the objects themselves."""
    associated = [(word, k) for k, obj in enumerate(objects) for word in association[obj]]
    return associated + [(obj, k) for k, obj in enumerate(objects)]


def score_generative_response(
    nouns: Sequence[str],
    item: AmberAnnotation,
    data: AmberData,
    similarity: Similarity = exact_similarity,
    threshold: float = 0.8,
) -> dict[str, Any]:
    """Match one response's vocabulary nouns against its truth and "hallu" objects (the official order of tests).

    A safe word is skipped; an exact match with a truth entry covers that object; otherwise the noun may match a
    "hallu" entry exactly and then by similarity (Cog), and is hallucinated unless it is similar to a truth entry.

    Returns:
        ``nouns`` (the vocabulary nouns, all counted in CHAIR's denominator), ``hallucinated`` (nouns, with
        duplicates), ``covered`` and ``cog`` (flags per truth / "hallu" object).
    """
    safe, ha = _entries(item.truth, data.association), _entries(item.hallu, data.association)
    covered, cog = [False] * len(item.truth), [False] * len(item.hallu)
    hallucinated = []

    def similar(a: str, b: str) -> bool:
        return similarity(a, b) > threshold

    for noun in nouns:
        if noun in data.safe_words:
            continue
        k = _first_match(noun, safe, str.__eq__)
        if k is not None:
            covered[k] = True
            continue
        for same in (str.__eq__, similar):
            if (k := _first_match(noun, ha, same)) is not None:
                cog[k] = True
        if (k := _first_match(noun, safe, similar)) is not None:
            covered[k] = True
            continue
        hallucinated.append(noun)
    return {"nouns": list(nouns), "hallucinated": hallucinated, "covered": covered, "cog": cog}


def _percent(num: float, den: float) -> float:
    return round(num / den * 100, 1)


def generative_metrics(scored: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """CHAIR, Cover, Hal and Cog (percent, rounded to 0.1) of ``score_generative_response`` results."""
    hal = n_nouns = covered = n_truth = cog = n_hallu = clean = n = 0
    for s in scored:
        hal += len(s["hallucinated"])
        n_nouns += len(s["nouns"])
        covered += sum(s["covered"])
        n_truth += len(s["covered"])
        cog += sum(s["cog"])
        n_hallu += len(s["cog"])
        clean += not s["hallucinated"]
        n += 1
    return {
        "CHAIR": _percent(hal, _START + n_nouns),
        "Cover": _percent(covered, _START + n_truth),
        "Hal": round(100 - clean / (_START + n) * 100, 1),
        "Cog": _percent(cog, _START + n_hallu),
        "n": n,
        "n_nouns": n_nouns,
        "n_hallucinated": hal,
    }


@dataclass
class _Counts:
    """One dimension's counters, as the official script keeps them (denominators start at 0.001)."""

    correct: float = 0
    n: float = _START
    gold_no_hit: float = 0
    gold_no: float = _START
    said_no_hit: float = 0
    said_no: float = _START

    def add(self, gold: str, response: str) -> None:
        self.n += 1
        self.correct += (gold == "yes" and response == "Yes") or (gold == "no" and response == "No")
        if gold == "no":
            self.gold_no += 1
            self.gold_no_hit += response == "No"
        if response == "No":
            self.said_no += 1
            self.said_no_hit += gold == "no"

    def __add__(self, other: _Counts) -> _Counts:
        return _Counts(*(a + b for a, b in zip(astuple(self), astuple(other))))


def _prf(c: _Counts, eps: float = 1e-4) -> dict[str, float]:
    p, r = _percent(c.said_no_hit, c.said_no), _percent(c.gold_no_hit, c.gold_no)
    f1 = round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + eps) * 100, 1)
    return {"Accuracy": _percent(c.correct, c.n), "Precision": p, "Recall": r, "F1": f1, "n": round(c.n - _START)}


def discriminative_metrics(pairs: Iterable[tuple[AmberAnnotation, str]], parts: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 ("No" positive) of ``(annotation, response)`` pairs, per dimension.

    ``parts`` ⊆ {"de", "da", "dr"} picks the dimensions reported (the overall row needs all three, as officially).
    """
    counts = {d: _Counts() for d in ("existence", *ATTRIBUTE_PARTS, "relation")}
    overall = _Counts()
    for item, response in pairs:
        counts[DIMENSIONS[item.type]].add(item.answer, response)
        overall.add(item.answer, response)
    out: dict[str, Any] = {}
    if {"de", "da", "dr"} <= set(parts):
        out["overall"] = _prf(overall)
    if "de" in parts:
        out["existence"] = _prf(counts["existence"], eps=1e-3)
    if "da" in parts:
        out["attribute"] = _prf(counts["state"] + counts["number"] + counts["action"])
        out.update({d: _prf(counts[d]) for d in ATTRIBUTE_PARTS})
    if "dr" in parts:
        out["relation"] = _prf(counts["relation"])
    return out


def score_amber(
    responses: Sequence[tuple[int, str]],
    data: AmberData,
    *,
    evaluation_type: str = "a",
    nouns: Callable[[str], list[str]] | None = None,
    similarity: Similarity = exact_similarity,
    threshold: float = 0.8,
) -> dict[str, Any]:
    """Score AMBER responses (``(id, response)`` pairs) for an evaluation type (``a``, ``g``, ``d``, ``de``, ...).

    Returns:
        ``generative`` (CHAIR, Cover, Hal, Cog, counts), ``discriminative`` (per dimension), ``amber_score``
        (``None`` unless both tasks are scored), ``evaluation_type`` and ``items`` (per generative response: its
        vocabulary nouns and hallucinated ones).
    """
    parts = EVALUATION_TYPES[evaluation_type][1]
    extract = nouns or noun_extractor("rules", data.vocabulary)
    scored, items, pairs = [], [], []
    for ident, response in responses:
        item = data.annotations[ident - 1]
        if item.type == GENERATIVE:
            found = [n for n in extract(response) if n in data.vocabulary]
            scored.append(score_generative_response(found, item, data, similarity, threshold))
            items.append({"id": ident, "nouns": found, "hallucinated": scored[-1]["hallucinated"]})
        else:
            pairs.append((item, response))
    result: dict[str, Any] = {"evaluation_type": evaluation_type}
    if "g" in parts:
        result["generative"] = generative_metrics(scored)
    if any(p in parts for p in ("de", "da", "dr")):
        result["discriminative"] = discriminative_metrics(pairs, parts)
    overall = result.get("discriminative", {}).get("overall")
    generative = result.get("generative")
    result["amber_score"] = amber_score(generative["CHAIR"], overall["F1"]) if generative and overall else None
    result["items"] = items
    return result


def amber_score(chair: float, f1: float) -> float:
    """AMBER score = ½·[(100 − CHAIR) + F1] (both in percent)."""
    return round(((100 - chair) + f1) / 2, 1)


def normalize_yes_no(text: str) -> str:
    """ "Yes" or "No" when a reply starts with that word (any case, punctuation after it), else the reply as is."""
    words = text.strip().split()
    first = words[0].strip(".,!:;\"'").lower() if words else ""
    return {"yes": "Yes", "no": "No"}.get(first, text)


def amber_markdown(result: Mapping[str, Any]) -> str:
    """The paper's layout: generative CHAIR / Cover / Hal / Cog, discriminative rows, AMBER score."""
    lines = []
    if (g := result.get("generative")) is not None:
        lines += [
            "| CHAIR ↓ | Cover ↑ | Hal ↓ | Cog ↓ | responses |",
            "|---:|---:|---:|---:|---:|",
            f"| {g['CHAIR']:.1f} | {g['Cover']:.1f} | {g['Hal']:.1f} | {g['Cog']:.1f} | {g['n']} |",
        ]
    if (d := result.get("discriminative")) is not None:
        lines += ["", "| dimension | Accuracy | Precision | Recall | F1 | questions |"]
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, m in d.items():
            row = f"| {name} | {m['Accuracy']:.1f} | {m['Precision']:.1f} | {m['Recall']:.1f} | {m['F1']:.1f}"
            lines.append(f"{row} | {m['n']} |")
    if result.get("amber_score") is not None:
        lines += ["", f"AMBER score: {result['amber_score']:.1f}"]
    return "\n".join(lines).strip("\n")
