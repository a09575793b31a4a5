"""Capo: knowledge capacity — synthetic biographies (bioS of Physics of LMs Parts 3.1/3.3; docs/tasks.md).

People (fixed by ``num_people`` and ``people_seed``): unique full names (first, middle, last drawn uniformly from the
packaged field lists), birth date (year 1900–2099, month 1–12, day 1–28), birth city, university, major and company
drawn uniformly from the lists; the company's city is its headquarters city from ``company.txt``.  Person ``p`` is
referred to as "He" if p is even, "She" if odd.

A biography has six sentences in a fixed attribute order — birth date (with the full name), birth city, university,
major, then company city and company name (these two swapped with probability ½) — each rendered from one of 50
templates per attribute picked uniformly (the templates are canon-jax's own wording, see ``docs/tasks.md``); the date
is written "Month D, YYYY" or "D of Month, YYYY" with probability ½ each.  Text is tokenised at word level with a
closed vocabulary built from the templates and field lists (:func:`word_vocabulary`).

Sequence: ``[BOS] + bio words + [EOS]``; every token after BOS is labelled (the whole biography is the text to learn).
Train sample i: exposure e = i // num_people shows person π_e(i mod num_people), π_e a seeded per-exposure
permutation, with a fresh rendering — so ``num_people * exposures`` consecutive samples show every person exactly
``exposures`` times.  Test sample i: person i mod num_people (the trained people), rendered with the test seed.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

import numpy as np

from canon_jax.data import task as task_lib
from canon_jax.data.rng import Rng, mix_key, numpy_rng
from canon_jax.data.task import BOS, EOS, NUM_SPECIAL

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
YEARS = tuple(range(1900, 2100))
DAYS = tuple(range(1, 29))
# attributes in the order stored per person; company1city is a function of company1name
ATTRIBUTES = ("birthyear", "birthmonth", "birthday", "birthcity", "university", "field", "company1name", "company1city")

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Word-level tokenisation: runs of word characters, and every other non-space character on its own."""
    return _TOKEN_RE.findall(text)


# Six attribute sentence families. Each = 10 predicates × 5 framings = 50 templates ("{X}" marks the value).
_FRAMES = (
    "{S} {P}.",
    "Notably, {s} {P}.",
    "It is recorded that {s} {P}.",
    "By all accounts, {s} {P}.",
    "As far as we know, {s} {P}.",
)
_PREDICATES = {
    "birthdate": (
        "was born on {X}",
        "came into this world on {X}",
        "entered the world on {X}",
        "arrived in this world on {X}",
        "has a birth date of {X}",
        "was welcomed into the world on {X}",
        "first saw the light of day on {X}",
        "drew a first breath on {X}",
        "has {X} as a date of birth",
        "was brought into the world on {X}",
    ),
    "birthcity": (
        "was born in {X}",
        "comes from {X}",
        "hails from {X}",
        "is a native of {X}",
        "has {X} as a birthplace",
        "took a first breath in {X}",
        "was brought into the world in {X}",
        "calls {X} a birthplace",
        "entered life in {X}",
        "has family roots in {X}",
    ),
    "university": (
        "studied at {X}",
        "attended {X}",
        "graduated from {X}",
        "received an education at {X}",
        "was educated at {X}",
        "completed a degree at {X}",
        "enrolled at {X}",
        "pursued higher education at {X}",
        "is a graduate of {X}",
        "spent college years at {X}",
    ),
    "field": (
        "majored in {X}",
        "studied {X}",
        "focused on {X}",
        "specialized in {X}",
        "concentrated on {X}",
        "earned a degree in {X}",
        "chose {X} as a field of study",
        "completed coursework in {X}",
        "was trained in {X}",
        "pursued a major in {X}",
    ),
    "company1city": (
        "worked in {X}",
        "was employed in {X}",
        "had a job in {X}",
        "built a career in {X}",
        "earned a living in {X}",
        "spent working years in {X}",
        "took a position in {X}",
        "worked for a company in {X}",
        "held a job based in {X}",
        "pursued a career in {X}",
    ),
    "company1name": (
        "worked for {X}",
        "was employed by {X}",
        "held a job at {X}",
        "was on the staff of {X}",
        "joined {X}",
        "was hired by {X}",
        "built a career at {X}",
        "had a position at {X}",
        "took a job at {X}",
        "earned a living at {X}",
    ),
}
SENTENCE_KINDS = tuple(_PREDICATES)
NUM_TEMPLATES = {k: len(_FRAMES) * len(v) for k, v in _PREDICATES.items()}


def templates(kind: str) -> list[str]:
    """All templates of a sentence kind, with {S}/{s} (subject, capitalised / sentence-internal) and {X} (value)."""
    return [f.replace("{P}", p) for f in _FRAMES for p in _PREDICATES[kind]]


def _read_list(name: str) -> list[str]:
    text = importlib.resources.files("canon_jax.data").joinpath("assets", "capo_fields", name).read_text("utf-8")
    out, seen = [], set()
    for line in text.splitlines():
        line = line.strip()
        if line and line not in seen:  # unique values, so every attribute has a well-defined value set
            seen.add(line)
            out.append(line)
    return out


@functools.cache
def field_lists() -> dict[str, list[str]]:
    """Packaged value lists: first/middle/last names, cities, universities, fields, companies (+ their HQ city)."""
    companies = [line.split(";", 1) for line in _read_list("company.txt")]
    return {
        "first_name": _read_list("first_name.txt"),
        "middle_name": _read_list("middle_name.txt"),
        "last_name": _read_list("last_name.txt"),
        "city": _read_list("city.txt"),
        "university": _read_list("university.txt"),
        "field": _read_list("field.txt"),
        "company": [c[0].strip() for c in companies],
        "company_city": [c[1].strip() for c in companies],
    }


@functools.cache
def word_vocabulary() -> tuple[str, ...]:
    """The closed word vocabulary (sorted): every token of every template, pronoun, field value, month, day, year."""
    words: set[str] = set()
    for kind in SENTENCE_KINDS:
        for t in templates(kind):
            words.update(tokenize(t.replace("{S}", " ").replace("{s}", " ").replace("{X}", " ")))
    words.update(["He", "She", "he", "she", "of", ",", "."])
    for values in field_lists().values():
        for v in values:
            words.update(tokenize(v))
    words.update(MONTHS)
    words.update(str(d) for d in DAYS)
    words.update(str(y) for y in YEARS)
    return tuple(sorted(words))


@functools.cache
def _word_index() -> dict[str, int]:
    return {w: j for j, w in enumerate(word_vocabulary())}


def _feistel_permute(x: int, n: int, key: int) -> int:
    """A keyed bijection of range(n) (4-round Feistel network on the next even power of two + cycle walking)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half, mask = bits // 2, (1 << (bits // 2)) - 1
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (mix_key(key, r, right) & mask)
        x = (left << half) | right
        if x < n:
            return x


@functools.lru_cache(maxsize=8)
def people_table(num_people: int, people_seed: int) -> dict[str, np.ndarray]:
    """Attribute index arrays (``[num_people]`` each) of the people; names are unique full names."""
    f = field_lists()
    g = numpy_rng(mix_key(0xCA90, people_seed))
    n_first, n_mid, n_last = len(f["first_name"]), len(f["middle_name"]), len(f["last_name"])
    if num_people > n_first * n_mid * n_last // 2:
        raise ValueError(
            f"capo: num_people={num_people} is too large for unique full names "
            f"(at most {n_first * n_mid * n_last // 2})"
        )
    names: list[tuple[int, int, int]] = []
    full: set[str] = set()
    while len(names) < num_people:
        m = num_people - len(names)
        cand = np.stack([g.integers(0, n_first, m), g.integers(0, n_mid, m), g.integers(0, n_last, m)], axis=1)
        for a, b, c in cand.tolist():
            s = f"{f['first_name'][a]} {f['middle_name'][b]} {f['last_name'][c]}"
            if s not in full:
                full.add(s)
                names.append((a, b, c))
    names_arr = np.asarray(names, dtype=np.int32)
    company = g.integers(0, len(f["company"]), num_people)
    return {
        "first_name": names_arr[:, 0],
        "middle_name": names_arr[:, 1],
        "last_name": names_arr[:, 2],
        "birthyear": g.integers(0, len(YEARS), num_people),
        "birthmonth": g.integers(0, 12, num_people),
        "birthday": g.integers(0, len(DAYS), num_people),
        "birthcity": g.integers(0, len(f["city"]), num_people),
        "university": g.integers(0, len(f["university"]), num_people),
        "field": g.integers(0, len(f["field"]), num_people),
        "company1name": company,
    }


def attribute_values(name: str) -> list[str]:
    """The value set of an attribute (as strings)."""
    f = field_lists()
    return {
        "birthyear": [str(y) for y in YEARS],
        "birthmonth": list(MONTHS),
        "birthday": [str(d) for d in DAYS],
        "birthcity": f["city"],
        "university": f["university"],
        "field": f["field"],
        "company1name": f["company"],
        "company1city": sorted(set(f["company_city"])),
    }[name]


class Capo(task_lib.Task):
    name = "capo"
    DEFAULTS = {"num_people": 10000, "exposures": 100, "people_seed": 0}

    def _validate(self):
        p = self.params
        if p["num_people"] < 1:
            raise ValueError(f"capo: num_people must be >= 1, got {p['num_people']}")
        if p["exposures"] < 1:
            raise ValueError(f"capo: exposures must be >= 1, got {p['exposures']}")
        self._words = word_vocabulary()
        self._index = _word_index()
        self._templates = {k: [self._split_template(t) for t in templates(k)] for k in SENTENCE_KINDS}

    @staticmethod
    def _split_template(t: str):
        lead, tail = t.split("{X}")
        return lead, tail

    def num_task_tokens(self):
        return len(self._words)

    def official_map(self):
        # bioS has no official token ids (it is plain text); the export keeps canon-jax's word ids.
        m = np.arange(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        return m

    def code_name(self, code):
        return task_lib.SPECIAL_NAMES[code] if code < NUM_SPECIAL else self._words[code - NUM_SPECIAL]

    @property
    def num_train_samples(self) -> int:
        """Samples of one full pass of ``exposures`` exposures per person."""
        return self.params["num_people"] * self.params["exposures"]

    def person_of(self, i: int, split: str, seed: int) -> int:
        n = self.params["num_people"]
        if split == "test":
            return i % n
        return _feistel_permute(i % n, n, mix_key(seed, self.params["people_seed"], i // n))

    def person(self, pid: int) -> dict[str, str]:
        """Attribute strings of person ``pid`` (plus ``full_name`` and ``pronoun``)."""
        t = people_table(self.params["num_people"], self.params["people_seed"])
        f = field_lists()
        c = int(t["company1name"][pid])
        return {
            "full_name": " ".join(
                [
                    f["first_name"][t["first_name"][pid]],
                    f["middle_name"][t["middle_name"][pid]],
                    f["last_name"][t["last_name"][pid]],
                ]
            ),
            "pronoun": "He" if pid % 2 == 0 else "She",
            "birthyear": str(YEARS[t["birthyear"][pid]]),
            "birthmonth": MONTHS[t["birthmonth"][pid]],
            "birthday": str(DAYS[t["birthday"][pid]]),
            "birthcity": f["city"][t["birthcity"][pid]],
            "university": f["university"][t["university"][pid]],
            "field": f["field"][t["field"][pid]],
            "company1name": f["company"][c],
            "company1city": f["company_city"][c],
        }

    def _words_to_codes(self, words: list[str]) -> list[int]:
        try:
            return [NUM_SPECIAL + self._index[w] for w in words]
        except KeyError as e:  # cannot happen for packaged data; guards edits of the templates/lists
            raise ValueError(f"capo: word {e.args[0]!r} is not in the closed vocabulary") from None

    def render(self, pid: int, rng: Rng) -> tuple[list[str], dict[str, tuple[int, int]], str]:
        """Biography words, value spans (word positions, end exclusive) and text of person ``pid``."""
        a = self.person(pid)
        words: list[str] = []
        spans: dict[str, tuple[int, int]] = {}
        sentences: list[str] = []
        kinds = ["birthdate", "birthcity", "university", "field", "company1city", "company1name"]
        if rng.random() < 0.5:
            kinds[4], kinds[5] = kinds[5], kinds[4]
        for j, kind in enumerate(kinds):
            lead, tail = rng.choice(self._templates[kind])
            subj = a["full_name"] if j == 0 else a["pronoun"]
            lead = lead.replace("{S}", subj).replace("{s}", subj if j == 0 else subj.lower())
            words += tokenize(lead)
            if kind == "birthdate":
                parts = (
                    [
                        ("birthmonth", a["birthmonth"]),
                        (None, " "),
                        ("birthday", a["birthday"]),
                        (None, ", "),
                        ("birthyear", a["birthyear"]),
                    ]
                    if rng.random() < 0.5
                    else [
                        ("birthday", a["birthday"]),
                        (None, " of "),
                        ("birthmonth", a["birthmonth"]),
                        (None, ", "),
                        ("birthyear", a["birthyear"]),
                    ]
                )
            else:
                parts = [(kind, a[kind])]
            value_text = ""
            for attr, s in parts:
                w = tokenize(s)
                if attr is not None:
                    spans[attr] = (1 + len(words), 1 + len(words) + len(w))  # +1: BOS comes first
                words += w
                value_text += s
            words += tokenize(tail)
            sentences.append(lead + value_text + tail)
        return words, spans, " ".join(sentences)

    def _generate(self, i, split, rng, seed=0):
        pid = self.person_of(i, split, seed)
        words, spans, text = self.render(pid, rng)
        codes = [BOS] + self._words_to_codes(words) + [EOS]
        labels = [0] + [1] * (len(codes) - 1)
        attrs = {k: v for k, v in self.person(pid).items() if k in ATTRIBUTES or k == "full_name"}
        return (
            codes,
            labels,
            {"person": pid, "attributes": attrs, "spans": {k: list(v) for k, v in spans.items()}, "text": text},
        )

    def show(self, sample):
        m = sample.meta
        return f"person {m['person']}: {m['attributes']}\n{m['text']}"
