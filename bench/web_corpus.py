"""Generated web-like text for the quality benches and tests: templated pages that pass FineWeb's filters, planted
near-copies of some of them (a share of the words replaced at random positions), and pages of the kinds the filters
remove.

A page is 12-20 sentences from 48 templates (each at most once per page, as a site's page template would use its
blocks) with their slots filled from large pools of made-up names, places and things, in paragraphs of 2-5
sentences, most ending with one of four fixed boilerplate paragraphs. Pages share their templates' fixed words and
the boilerplate, which is what makes them "templated"; what they say differs, so two unrelated pages share few
5-word sequences beyond the boilerplate. Seeded: the same arguments give the same text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

_ON, _OFF = "bdfgklmnprstvz", "aeiou"


def _words(rng: random.Random, n: int, syllables: tuple[int, int], title: bool = False) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(_ON) + rng.choice(_OFF) for _ in range(rng.randint(*syllables)))
        w += rng.choice(["", "n", "r", "s", "l"])
        out.add(w.capitalize() if title else w)
    return sorted(out)


_POOL = random.Random(1234)
NAMES = _words(_POOL, 400, (2, 3), title=True)
PLACES = _words(_POOL, 400, (2, 4), title=True)
THINGS = _words(_POOL, 1500, (2, 3))
ADJECTIVES = ["old", "new", "small", "large", "quiet", "busy", "bright", "dark", "warm", "cold", "green", "red",
              "narrow", "wide", "famous", "simple", "strange", "careful", "gentle", "heavy", "light", "rare", "cheap",
              "useful", "broken", "clean", "early", "late", "local", "modern"]
VERBS = ["repairs", "sells", "collects", "paints", "builds", "studies", "carries", "cleans", "measures", "counts",
         "orders", "stores", "tests", "designs", "borrows", "returns", "packs", "moves", "checks", "shares"]

TEMPLATES = [
    "{N} {V} {T} in {P} every {A} morning before the market opens.",
    "The {A} {T} that {N} found near {P} was later given to a museum.",
    "Most visitors to {P} come for the {T}, but {N} says the {A} {T} is better.",
    "In {P}, a {A} {T} costs about {n} coins, which {N} thinks is fair.",
    "{N} wrote a short guide to the {T} of {P} and printed {n} copies.",
    "When the {A} season starts, {N} {V} the {T} near the river in {P}.",
    "There is a {A} {T} on the road from {P} to {Q} that nobody uses.",
    "People in {P} say that {N} {V} more {T} than anyone else in town.",
    "The council of {P} voted {n} to {m} to keep the {A} {T} open.",
    "After a long trip from {Q}, {N} finally reached {P} with a {A} {T}.",
    "Each spring {N} {V} the {T} and writes down what changed since last year.",
    "A {A} {T} and a {A} {T} stand next to the gate of the school in {P}.",
    "{N} and {M} argued for an hour about whether the {T} belongs in {P}.",
    "The {T} in {P} was built by {N} with help from {n} neighbours.",
    "If you ask {N} about the {T}, you will hear a story about {Q}.",
    "Nobody in {P} remembers when the {A} {T} was first {D}.",
    "{N} keeps a {A} {T} by the window so the light falls on it.",
    "On the {n}th day of the fair, {N} showed the {T} to everyone in {P}.",
    "The shortest way to {P} passes a {A} {T} and a field of {T}.",
    "{N} learned to make {T} from {M}, who lived in {Q} for years.",
    "Every house on the main street of {P} has a {A} {T} by the door.",
    "The {A} {T} broke during the storm, so {N} {V} a new one.",
    "Children in {P} play with {T} until the bell of the {A} tower rings.",
    "According to {N}, the {T} of {Q} taste better than those of {P}.",
    "{N} spent {n} weeks in {P} and came back with a {A} {T}.",
    "The library of {P} holds {n} books about the {T} and its history.",
    "At night the {A} {T} of {P} can be seen from the hills near {Q}.",
    "{N} believes that a {T} should always be {D} by hand.",
    "The bridge between {P} and {Q} was closed while {N} {V} the {T}.",
    "Two {T} and a {A} {T} were all that {N} took to {P}.",
    "It took {N} {n} days to walk from {Q} to the {A} {T} of {P}.",
    "Some people think the {T} in {P} is too {A}, but {N} disagrees.",
    "The old map of {P} shows a {T} where the {A} {T} stands now.",
    "{M} told {N} that the best {T} are sold on the far side of {P}.",
    "The {A} {T} has been in the family of {N} for {n} years.",
    "From the top of the {T} you can count {n} roofs in {P}.",
    "{N} {V} the {T} with a {A} {T} that came from {Q}.",
    "The newspaper of {P} printed a photo of {N} holding a {A} {T}.",
    "A {T} was {D} in {P} last week, and {N} is looking for it.",
    "Before the {A} {T} arrived, {N} had never left {P}.",
    "The road to {Q} is lined with {T}, which {N} planted long ago.",
    "{N} sells {A} {T} at the market of {P} on the first day of each month.",
    "When {M} visited {P}, {N} showed the {A} {T} behind the mill.",
    "The {T} of {P} are famous for their {A} colour and their smell.",
    "It is said that {N} once traded a {T} for a {A} {T} in {Q}.",
    "The teacher in {P} asked {N} to bring the {T} to class.",
    "Rain in {P} makes the {T} {A}, so {N} covers them every night.",
    "By the end of the year {N} had {D} {n} {T} in {P}.",
]
# Site boilerplate: most pages of a site end with one of a few fixed paragraphs, which is what near-duplicate
# detection must not mistake for copied content.
FOOTERS = [
    "This page is part of a community guide written by volunteers. If you see a mistake, send a note to the "
    "editors and they will correct it within a week. All pictures were taken by readers of the guide.",
    "Our guide is updated every season by people who live in the region. Opening hours, prices and routes may have "
    "changed since this page was written, so please check with the local office before you travel.",
    "You are reading an archived page from the old version of the town guide. Some links on it no longer work, and "
    "the newest pages can be found from the start page of the guide.",
    "Thank you for reading this far. The guide is free and has no advertising, and it depends on the stories that "
    "readers send in, so tell us about the places you know best.",
]
DONE = ["painted", "repaired", "moved", "sold", "found", "lost", "built", "cleaned", "measured", "opened"]


def _sentence(rng: random.Random, template: str) -> str:
    fill = {"N": lambda: rng.choice(NAMES), "M": lambda: rng.choice(NAMES), "P": lambda: rng.choice(PLACES),
            "Q": lambda: rng.choice(PLACES), "T": lambda: rng.choice(THINGS), "A": lambda: rng.choice(ADJECTIVES),
            "V": lambda: rng.choice(VERBS), "D": lambda: rng.choice(DONE), "n": lambda: str(rng.randint(2, 999)),
            "m": lambda: str(rng.randint(2, 999))}
    parts = template.split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, rest = part.split("}", 1)
        out.append(fill[slot]() + rest)
    return "".join(out)


def page(rng: random.Random) -> str:
    """One templated page: paragraphs separated by blank lines."""
    sentences = [_sentence(rng, t) for t in rng.sample(TEMPLATES, rng.randint(12, 20))]
    paragraphs, i = [], 0
    while i < len(sentences):
        k = rng.randint(2, 5)
        paragraphs.append(" ".join(sentences[i : i + k]))
        i += k
    if rng.random() < 0.7:
        paragraphs.append(rng.choice(FOOTERS))
    return "\n\n".join(paragraphs)


def near_copy(rng: random.Random, text: str, share: float = 0.05) -> str:
    """`text` with `share` of its words (at random positions) replaced by other words; layout kept."""
    paragraphs = [p.split(" ") for p in text.split("\n\n")]
    positions = [(i, j) for i, p in enumerate(paragraphs) for j in range(len(p))]
    for i, j in rng.sample(positions, max(1, round(share * len(positions)))):
        word = paragraphs[i][j]
        tail = word[len(word.rstrip(".,")):]
        paragraphs[i][j] = rng.choice(THINGS) + tail
    return "\n\n".join(" ".join(p) for p in paragraphs)


def junk(rng: random.Random) -> str:
    """A page of a kind FineWeb's filters remove: a navigation menu, code, a table of numbers, a page that repeats
    its lines, or a stub."""
    kind = rng.randrange(5)
    if kind == 0:
        return "\n".join(rng.choice(["Home", "About us", "Contact", "Login", "Shop", "Blog", "Help", "Search"])
                         + f" {rng.choice(PLACES)}" for _ in range(rng.randint(10, 30)))
    if kind == 1:
        return "\n".join(f"function {rng.choice(THINGS)}(x) {{ return x * {rng.randint(2, 99)}; }}"
                         for _ in range(rng.randint(5, 20)))
    if kind == 2:
        return "\n".join(" ".join(str(rng.randint(0, 9999)) for _ in range(8)) for _ in range(rng.randint(10, 40)))
    if kind == 3:
        line = _sentence(rng, rng.choice(TEMPLATES))
        return "\n".join([line] * rng.randint(5, 15))
    return _sentence(rng, rng.choice(TEMPLATES))


@dataclass
class Doc:
    text: str
    kind: str  # "page" (unrelated), "copy" (a planted near-copy of an earlier page), "dup" (an exact copy), "junk"
    of: int = -1  # for a copy: the index of the page it copies


def web_stream(seed: int = 0, copy_share: float = 0.1, change: float = 0.05, dup_share: float = 0.0,
               junk_share: float = 0.0) -> Iterator[Doc]:
    """An endless seeded stream of pages; near-copies of `copy_share` of them (`change` of their words replaced)
    and exact copies of `dup_share` of them follow within the next 1000 documents; `junk_share` of the documents
    are junk pages."""
    rng = random.Random(seed)
    pending: list[tuple[int, int, str, str]] = []  # (due position, page index, text, kind)
    pos = i = 0
    while True:
        if rng.random() < junk_share:
            yield Doc(junk(rng), "junk")
        else:
            text = page(rng)
            yield Doc(text, "page")
            if rng.random() < copy_share:
                pending.append((pos + rng.randint(0, 1000), i, near_copy(rng, text, change), "copy"))
            if rng.random() < dup_share:
                pending.append((pos + rng.randint(0, 1000), i, text, "dup"))
            pending.sort()
            i += 1
        pos += 1
        while pending and pending[0][0] <= pos:
            _, src, copy, kind = pending.pop(0)
            yield Doc(copy, kind, src)
            pos += 1


def near_dup_corpus(n_pages: int, copy_share: float = 0.1, change: float = 0.05, seed: int = 0) -> Iterator[Doc]:
    """`n_pages` unrelated pages with near-copies of `copy_share` of them, each after its page (within the next 1000
    documents)."""
    stream = web_stream(seed, copy_share, change)
    pages = 0
    for doc in stream:
        if doc.kind == "page":
            if pages == n_pages:
                break
            pages += 1
        yield doc
    for _, doc in zip(range(1001), stream, strict=False):  # the copies still due: their pages are out
        if doc.kind == "copy" and doc.of < n_pages:
            yield doc
