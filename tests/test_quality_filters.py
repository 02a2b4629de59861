"""The ingest stage's quality filters (`ingest.quality`, stages/data/quality.py on datatrove's FineWeb filters): one
planted document for each rule is removed by that rule, counted as `dropped/<rule>` with its bytes and per source,
and shown in the samples table; C4's line rules cut lines from the documents they keep; the built-in source is
left alone unless asked. Run: .venv/bin/pytest tests/test_quality_filters.py"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench.web_corpus import page
from stages import ingest
from stages.data.corpus_reader import iter_texts

_rng = random.Random(7)


def word(n: int) -> str:
    return "".join(_rng.choice("bcdfghjklmnprstvwz") + _rng.choice("aeiou") for _ in range((n + 1) // 2))[:n]


def words(k: int, n: int = 6) -> list[str]:
    return [word(n) for _ in range(k)]


def sentence(k: int = 10, n: int = 6) -> str:
    w = words(k, n)
    return " ".join(["The", *w[: k // 3], "of the", *w[k // 3 : 2 * k // 3], "and", *w[2 * k // 3 :]]) + "."


def prose(sentences: int) -> str:
    return " ".join(sentence() for _ in range(sentences))


def repeated_phrase(n_words: int, share: float) -> str:
    """Unique filler with one `n_words`-word phrase inserted until it covers more than `share` of the characters."""
    phrase, filler = " ".join(words(n_words, 5)), words(300, 5)
    k = 1
    while True:
        step = len(filler) // k
        text = " ".join(" ".join(filler[j * step : (j + 1) * step] + [phrase]) for j in range(k)) + "."
        if k * len(phrase) / len(text) > share:
            return text
        k += 1


def _repetition() -> dict[str, str]:
    paras, long_p, lines, long_l, rep = [prose(3) for _ in range(4)], prose(10), [sentence() for _ in range(4)], \
        prose(8), " ".join(words(40))
    pair = " ".join(words(2, 5))
    return {
        "gopher_repetition.dup_para_frac": "\n\n".join(paras + paras[:2]),
        "gopher_repetition.dup_para_char_frac": "\n\n".join([long_p, *(sentence() for _ in range(7)), long_p, long_p]),
        "gopher_repetition.dup_line_frac": "\n".join([lines[0], lines[1], lines[0], lines[2], lines[0], lines[3],
                                                      lines[0]]),
        "gopher_repetition.dup_line_char_frac": "\n".join([long_l, *(sentence() for _ in range(8)), long_l]),
        "gopher_repetition.top_2_gram": " ".join(f"{pair} {w}." for w in words(40, 4)),
        "gopher_repetition.top_3_gram": repeated_phrase(3, 0.185),
        "gopher_repetition.top_4_gram": repeated_phrase(4, 0.165),
        "gopher_repetition.duplicated_5_n_grams": f"{' '.join(words(60))}. {rep}. {' '.join(words(60))}. {rep}.",
    }


def _gopher_quality() -> dict[str, str]:
    digits = [[str(_rng.randint(1000, 99999)) for _ in range(6)] for _ in range(12)]
    return {
        "gopher_quality.short_doc": prose(2),
        "gopher_quality.long_doc": "\n\n".join(page(_rng) for _ in range(3)),  # max_doc_words is 400 below
        "gopher_quality.below_avg_threshold": ". ".join(" ".join(words(8, 2)) for _ in range(8)) + " to be.",
        "gopher_quality.above_avg_threshold": " ".join(f"The {' '.join(words(9, 14))}." for _ in range(6)),
        "gopher_quality.too_many_hashes": " ".join(f"{a} #{b} {c}." for a, b, c in zip(*[iter(words(60))] * 3,
                                                                                        strict=True)),
        "gopher_quality.too_many_ellipsis": " ".join(f"{a} {b}… {c}" for a, b, c in zip(*[iter(words(60))] * 3,
                                                                                       strict=True)),
        "gopher_quality.too_many_bullets": "\n".join(f"- The {' '.join(words(5))} and {word(6)}." for _ in range(12)),
        "gopher_quality.too_many_end_ellipsis": "\n".join(sentence(12)[:-1] + ("..." if i % 2 else ".")
                                                          for i in range(10)),
        "gopher_quality.below_alpha_threshold": " ".join(f"The {a} and {b} of {c} {d} {e} {f}." for a, b, c, d, e, f
                                                         in digits),
        "gopher_quality.not_enough_stop_words": " ".join(" ".join(words(10)) + "." for _ in range(8)),
    }


def _lines() -> dict[str, str]:
    lines = [sentence(12) for _ in range(20)]
    listing = [" ".join(words(3, 10)) for _ in range(25)]
    for i in (0, 8, 16):
        listing[i] += "."
    listing[1] = "with the " + " ".join(words(2, 10))
    return {
        "c4.lorem_ipsum": page(_rng) + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "c4.curly_bracket": page(_rng) + "\n\nThe function returns {value} when the town has a market.",
        "c4.too_few_sentences": " ".join(sentence(25) for _ in range(3)),
        "fineweb.line_punct_ratio": "\n".join(sentence(8)[:-1] for _ in range(12)),
        "fineweb.short_line_ratio": "\n".join([f"The {word(5)} and {word(4)}." for _ in range(16)]
                                              + [prose(2), prose(2)]),
        "fineweb.char_dup_ratio": "\n".join([*lines, lines[3]]),
        "fineweb.list_ratio": "\n".join(listing),
    }


GERMAN = ("Der Hund läuft jeden Morgen durch den Park, und die Kinder spielen mit ihm auf der Wiese. Am Nachmittag "
          "gehen wir gemeinsam zum Markt, wo es frisches Brot und Käse gibt. Danach fahren wir mit dem Zug in die "
          "Stadt, weil meine Schwester dort seit einem Jahr wohnt.")
# Lines C4 removes from a document it keeps, by rule.
CUT_LINES = {"c4.javascript": "Please enable JavaScript to see the map of the old town.",
             "c4.policy": "This site uses cookies to remember your settings.",
             "c4.too_few_words": "Menu",
             "c4.too_long_word": "The code was " + "x" * 1001 + "."}


def planted() -> dict[str, str]:
    return {**_repetition(), **_gopher_quality(), **_lines()}


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quality")
    cases = planted()
    good = [page(_rng) for _ in range(30)]
    cut = page(_rng) + "\n\n" + "\n\n".join(CUT_LINES.values())
    src = write_jsonl(root / "web.jsonl", [*good[:15], *cases.values(), cut, *good[15:]])
    cfg = ingest.Config(sources=[ingest.FilesSource(paths=[src])], quality={"enabled": True,
                        "gopher_quality": {"max_doc_words": 400}}, max_chars=50_000, val_fraction=0.0)
    return cases, good, cut, ingest.run(cfg, None, root / "out")


def test_each_planted_document_is_removed_by_its_rule(filtered):
    cases, good, _, res = filtered
    m = res.metrics
    for rule, text in cases.items():
        assert m.get(f"dropped/{rule}") == 1, (rule, {k: v for k, v in m.items() if k.startswith("dropped/")})
        assert m[f"dropped_bytes/{rule}"] == len(text.encode())
    assert m["rows"] == len(good) + 1
    removed = {row["rule"]: row for row in res.samples if "rule" in row}
    assert set(removed) == set(cases)
    assert all(row["source"].endswith("web.jsonl") and row["text"] for row in removed.values())
    families = {r.split(".")[0] for r in cases}
    for fam in families:  # per source and per filter, documents and bytes
        n = sum(1 for r in cases if r.startswith(fam + "."))
        assert m[f"by_source/0/dropped/{fam}"] == n
        assert m[f"by_source/0/dropped_bytes/{fam}"] == sum(len(t.encode()) for r, t in cases.items()
                                                           if r.startswith(fam + "."))


def test_the_report_card_lists_what_each_rule_removed(filtered):
    from flows.report import _corpus_counts
    from flows.report_render import render_markdown

    cases, good, _, res = filtered
    card = {"pipeline_run_id": "r", "stages": [], "corpus": _corpus_counts(res.metrics)}
    line = next(x for x in render_markdown(card).splitlines() if x.startswith("Corpus:"))
    assert f"{res.metrics['records_read']:.0f} records read, {len(good) + 1} documents kept" in line, line
    for rule, text in cases.items():
        assert f"{rule} 1 ({len(text.encode()) / 1e6:.3g} MB)" in line, (rule, line)


def test_c4_line_rules_cut_lines_from_kept_documents(filtered):
    _, good, cut, res = filtered
    m = res.metrics
    assert {k: v for k, v in m.items() if k.startswith("lines_removed/")} == {f"lines_removed/{r}": 1
                                                                               for r in CUT_LINES}
    texts = [t for batch in iter_texts(res.outputs["corpus"]) for t in batch]
    kept = next(t for t in texts if t.startswith(cut[:100]))
    assert not any(line in kept for line in CUT_LINES.values())
    # C4 joins the kept lines with single newlines, so paragraphs lose their blank lines
    assert "\n\n" not in kept and kept.count("\n") == cut.count("\n\n") - len(CUT_LINES)


def test_the_language_filter_keeps_the_languages_asked_for(tmp_path):
    english = ("The dog runs through the park every morning, and the children play with him on the meadow. In the "
               "afternoon we walk to the market together, where there is fresh bread and cheese.")
    src = write_jsonl(tmp_path / "mixed.jsonl", [english, GERMAN])
    only_language = {"enabled": True, "language": {"enabled": True}, **{f: {"enabled": False} for f in (
        "gopher_repetition", "gopher_quality", "c4", "fineweb")}}
    res = ingest.run(ingest.Config(sources=[ingest.FilesSource(paths=[src])], quality=only_language), None,
                     tmp_path / "out")
    assert res.metrics["rows"] == 1 and res.metrics["dropped/language"] == 1
    assert [r["detail"] for r in res.samples if r.get("rule") == "language"] == ["detected de (1.00)"]
    with pytest.raises(ValueError, match="languages: 'xx'"):
        ingest.Config(quality={"enabled": True, "language": {"enabled": True, "languages": ["xx"]}})


def test_the_builtin_source_is_filtered_only_when_asked(tmp_path):
    base = {"sources": [{"type": "builtin", "n_documents": 300, "tasks": False}], "quality": {"enabled": True}}
    plain = ingest.run(ingest.Config(sources=[ingest.BuiltinSource(n_documents=300, tasks=False)]), None,
                       tmp_path / "plain")
    default = ingest.run(ingest.Config.model_validate(base), None, tmp_path / "default")
    assert default.metrics == plain.metrics and default.samples == plain.samples
    base["sources"][0]["filters"] = True
    asked = ingest.run(ingest.Config.model_validate(base), None, tmp_path / "asked")
    assert asked.metrics["rows"] < plain.metrics["rows"] / 2  # its stories are short and full of digits
    assert any(k.startswith("dropped/gopher_") for k in asked.metrics)
