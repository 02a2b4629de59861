"""The quality filters of the ingest stage: the rules FineWeb's pipeline applies, in its order, through the
library it was built with (datatrove), driven a batch at a time from the stage's own streamed batches instead of a
datatrove executor.

1. `language`: lingua (its models ship inside the wheel, so it works offline) keeps documents whose most likely
   language is one of `languages` with at least `min_confidence`. FineWeb used fastText's 176-language model, which
   datatrove downloads at run time; lingua needs no network.
2. `gopher_repetition`: duplicate lines and paragraphs, the most frequent 2-4-grams, repeated 5-10-grams (Gopher).
3. `gopher_quality`: word count, mean word length, hashes and ellipses, bullet and ellipsis lines, words without a
   letter, stop words (Gopher).
4. `c4`: C4's line rules (lines with too few words, a word over 1000 characters, "javascript", cookie and terms-of-use
   notices are removed, citation marks cut) and its document rules ("lorem ipsum", a curly bracket, too few
   sentences). As in FineWeb, lines without terminal punctuation are kept. This filter rewrites the documents it
   keeps: removed lines are gone and the kept ones are stripped and joined by single newlines.
5. `fineweb`: FineWeb's own line statistics: share of lines ending in punctuation, share of short lines, characters
   in duplicated lines, newlines per word.

Each setting of a filter is the datatrove parameter of the same name (FineWeb's values are the defaults), so a rule's
behaviour is the library's documented one. A removed document is attributed to the first rule that fires, named
`<filter>.<reason>` (e.g. `gopher_repetition.top_2_gram`, `c4.curly_bracket`).

Words and sentences: datatrove splits English words with spaCy, a large extra dependency; `WordSplitter` gives its
filters the same kind of split (punctuation runs apart from words) with one regular expression.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# C4's line-level counters in datatrove's stats, and the rule names they are reported under.
C4_LINE_RULES = {"line-filter-too_long_word": "too_long_word", "line-filter-no_terminal_punc": "no_terminal_punct",
                 "line-filter-too_few_words": "too_few_words", "line-filter-javascript": "javascript",
                 "line-filter-policy": "policy"}
# datatrove's reason names, where they would read wrong as a metric (the stop-word rule fires on too few of them)
RENAMED = {"gopher_enough_stop_words": "not_enough_stop_words"}


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Apply this filter (when ingest.quality.enabled).")


class LanguageFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Keep only documents in `languages` (lingua, offline). Off by default: "
                          "it is the slowest filter (1-2 ms per document).")
    languages: list[str] = Field(["en"], min_length=1, description="ISO 639-1 codes of the languages to keep.")
    min_confidence: float = Field(0.65, ge=0.0, le=1.0, description="Keep a document when one of `languages` has at "
                                  "least this confidence (FineWeb's fastText threshold for English was 0.65).")
    sample_chars: int = Field(500, ge=100, description="Detect the language on the first this many characters: "
                              "the cost grows with the length (about 1 ms per 500 characters of web text), and a "
                              "page's language is clear from its first sentences.")
    low_accuracy: bool = Field(True, description="lingua's low-accuracy mode: trigram models only, a fraction of the "
                               "memory; as accurate as the full models on texts of a few sentences or more.")


class GopherRepetition(_Filter):
    dup_line_frac: float | None = Field(0.3, description="Drop when more than this share of lines are repeats.")
    dup_para_frac: float | None = Field(0.3, description="Drop when more than this share of paragraphs are repeats.")
    dup_line_char_frac: float | None = Field(0.2, description="Drop when repeated lines hold more than this share of "
                                             "the characters.")
    dup_para_char_frac: float | None = Field(0.2, description="The same for repeated paragraphs.")
    top_n_grams: list[tuple[int, float]] = Field([(2, 0.2), (3, 0.18), (4, 0.16)], description="(n, share): drop when "
                                                 "the most frequent word n-gram covers more than this share of the "
                                                 "characters.")
    dup_n_grams: list[tuple[int, float]] = Field(
        [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="(n, share): drop when repeated word n-grams cover more than this share of the characters.")


class GopherQuality(_Filter):
    min_doc_words: int | None = Field(50, description="Drop documents with fewer words (punctuation not counted).")
    max_doc_words: int | None = Field(100_000, description="Drop documents with more words.")
    min_avg_word_length: int | None = Field(3, description="Drop when the mean word length is below this.")
    max_avg_word_length: int | None = Field(10, description="Drop when the mean word length is above this.")
    max_symbol_word_ratio: float | None = Field(0.1, description="Drop when '#' or ellipses per word exceed this.")
    max_bullet_lines_ratio: float | None = Field(0.9, description="Drop when more lines than this start with a bullet.")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="Drop when more lines than this end in an "
                                                   "ellipsis.")
    max_non_alpha_words_ratio: float | None = Field(0.8, description="Drop when fewer than this share of the words "
                                                    "contain a letter (datatrove's name for a minimum).")
    min_stop_words: int | None = Field(2, description="Drop documents with fewer distinct stop words.")
    stop_words: list[str] | None = Field(None, description="Stop words (None: Gopher's: the, be, to, of, and, that, "
                                         "have, with).")


class C4Lines(_Filter):
    filter_no_terminal_punct: bool = Field(False, description="Remove lines that do not end in . ? ! \" or ' (C4 "
                                           "did; FineWeb found it removed too much and did not).")
    min_num_sentences: int = Field(5, description="Drop documents with fewer sentences after line removal (-1: off).")
    min_words_per_line: int = Field(3, description="Remove lines with fewer words (-1: off).")
    max_word_length: int = Field(1000, description="Remove lines holding a longer word (-1: off).")
    remove_citations: bool = Field(True, description="Cut Wikipedia-style citation marks ([1], [edit]).")
    filter_lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Remove lines mentioning javascript.")
    filter_curly_bracket: bool = Field(True, description="Drop documents containing a curly bracket (code).")
    filter_policy: bool = Field(True, description="Remove lines with cookie / terms-of-use / privacy-policy notices.")


class FineWebLines(_Filter):
    line_punct_thr: float = Field(0.12, description="Drop when fewer than this share of lines end in punctuation.")
    line_punct_exclude_zero: bool = Field(False, description="Keep documents where no line ends in punctuation.")
    short_line_thr: float = Field(0.67, description="Drop when more than this share of lines are short.")
    short_line_length: int = Field(30, description="A line of at most this many characters is short.")
    char_duplicates_ratio: float = Field(0.01, description="Drop when duplicated lines hold more than this share of "
                                         "the characters.")
    new_line_ratio: float = Field(0.3, description="Drop when there are more newlines per word than this (lists).")


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Apply the filters below to the files and hf sources (a source's "
                          "`filters` setting overrides this; the builtin source is filtered only with filters: true).")
    language: LanguageFilter = Field(default_factory=LanguageFilter, description="Language identification.")
    gopher_repetition: GopherRepetition = Field(default_factory=GopherRepetition, description="Gopher's repetition "
                                                "rules.")
    gopher_quality: GopherQuality = Field(default_factory=GopherQuality, description="Gopher's quality rules.")
    c4: C4Lines = Field(default_factory=C4Lines, description="C4's line and document rules.")
    fineweb: FineWebLines = Field(default_factory=FineWebLines, description="FineWeb's line-statistics rules.")


def _word_splitter() -> Any:
    from datatrove.utils.word_tokenizers import WordTokenizer

    words = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
    sentences = re.compile(r"\S.*?(?:[.!?…]+['\"”’)\]]*(?=\s|$)|$)", re.S)

    class WordSplitter(WordTokenizer):
        """Words (with inner apostrophes) and runs of punctuation as separate tokens; sentences end at . ! ? or
        an ellipsis followed by a space."""

        def word_tokenize(self, text: str) -> list[str]:
            return words.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [m.group() for m in sentences.finditer(text)]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in sentences.finditer(text)]

    return WordSplitter("en")


@functools.cache
def word_splitter() -> Any:
    """One instance per process: datatrove caches word splits by (text, splitter), so the filters share them."""
    return _word_splitter()


@functools.cache
def _filters(cfg_json: str) -> list[tuple[str, Any]]:
    """The enabled datatrove filters, built once per process (and per configuration)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    cfg = QualityConfig.model_validate_json(cfg_json)
    lang = word_splitter()
    built = []
    for name, cls in (("gopher_repetition", GopherRepetitionFilter), ("gopher_quality", GopherQualityFilter),
                      ("c4", C4QualityFilter), ("fineweb", FineWebQualityFilter)):
        sub = getattr(cfg, name)
        if sub.enabled:
            built.append((name, cls(language=lang, **sub.model_dump(exclude={"enabled"}))))
    return built


@functools.cache
def _detector(low_accuracy: bool) -> Any:
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    return (builder.with_low_accuracy_mode() if low_accuracy else builder).build()


def check_languages(codes: list[str]) -> None:
    """Raise ValueError naming the code lingua does not know (at config load, not mid-ingest)."""
    from lingua import IsoCode639_1

    for code in codes:
        try:
            IsoCode639_1.from_str(code)
        except ValueError as e:
            raise ValueError(f"ingest.quality.language.languages: {code!r} is not an ISO 639-1 code lingua knows; "
                             f"use two-letter codes such as en, de, fr") from e


@dataclass
class Verdicts:
    """What the filters decided for one batch: the rule that removed each document (None: kept), the kept
    documents' texts (rewritten by the line rules), and lines removed per line rule."""

    rules: list[str | None]
    texts: list[str]
    details: dict[int, str] = field(default_factory=dict)  # per removed document, what the rule measured
    lines_removed: Counter[str] = field(default_factory=Counter)


def _languages(texts: list[str], cfg: LanguageFilter) -> tuple[list[str | None], dict[int, str]]:
    detector = _detector(cfg.low_accuracy)
    wanted = {code.lower() for code in cfg.languages}
    samples = [t[: cfg.sample_chars] for t in texts]
    unique = list(dict.fromkeys(samples))  # a start shared by several documents (copies) is detected once
    found = dict(zip(unique, detector.compute_language_confidence_values_in_parallel(unique), strict=True))
    rules: list[str | None] = []
    details = {}
    for i, sample in enumerate(samples):
        values = found[sample]
        best = max((v.value for v in values if v.language.iso_code_639_1.name.lower() in wanted), default=0.0)
        if best >= cfg.min_confidence:
            rules.append(None)
            continue
        rules.append("language")
        top = values[0] if values and values[0].value > 0 else None
        details[i] = (f"detected {top.language.iso_code_639_1.name.lower()} ({top.value:.2f})" if top
                      else "no language detected")
    return rules, details


def _c4_lines(f: Any) -> Counter[str]:
    """datatrove's running counts of the lines C4's line rules removed, by rule."""
    return Counter({rule: int(f.stats[key].total) for key, rule in C4_LINE_RULES.items() if key in f.stats.stats})


def _lines_removed(f: Any, text: str, before: Counter[str]) -> Counter[str]:
    """The lines C4 removed from one document it kept, by rule. datatrove counts the blank lines between paragraphs
    as removed too (under the first rule an empty line fails); they are layout, not content, so they are taken
    back out."""
    lines = _c4_lines(f)
    lines.subtract(before)
    blank = sum(1 for line in text.splitlines() if not line.strip())
    first = ("no_terminal_punct" if f.filter_no_terminal_punct else "too_few_words" if f.min_words_per_line > 0
             else None)
    if first:
        lines[first] -= blank
    return Counter({f"c4.{k}": v for k, v in lines.items() if v > 0})


def apply(texts: list[str], cfg: QualityConfig) -> Verdicts:
    """Run the enabled filters over `texts`, in FineWeb's order; each document stops at the first rule that fires."""
    from datatrove.data import Document

    filters = _filters(cfg.model_dump_json())
    if cfg.language.enabled:
        rules, details = _languages(texts, cfg.language)
    else:
        rules, details = [None] * len(texts), {}
    out = list(texts)
    lines: Counter[str] = Counter()
    for i, text in enumerate(texts):
        if rules[i] is not None:
            continue
        doc = Document(text=text, id=str(i))
        for name, f in filters:
            before = _c4_lines(f) if name == "c4" else None
            try:
                verdict = f.filter(doc)
            except (ZeroDivisionError, ValueError):  # a text without a single word: nothing to score
                verdict = (False, "unscorable")
            if verdict is not True:
                reason = verdict[1] if isinstance(verdict, tuple) else "rejected"
                reason = RENAMED.get(reason, reason).removeprefix("gopher_")
                rules[i] = f"{name}.{reason}"
                break
            if before is not None:
                lines.update(_lines_removed(f, text, before))
        else:
            out[i] = doc.text
    return Verdicts(rules, out, details, lines)
