"""Language distribution with langdetect: known sentences, determinism, counting and Tables 10-12."""

from __future__ import annotations

import pytest

from smoltulu_utils import languages as lang
from smoltulu_utils import tables
from smoltulu_utils.data import load_rows
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.results import ResultsStore

SENTENCES = {
    "English": "The weather was cold this morning, so we stayed inside and read books by the fire.",
    "French": "Le temps était froid ce matin, alors nous sommes restés à la maison pour lire des livres.",
    "Spanish": "El tiempo estaba frío esta mañana, así que nos quedamos en casa leyendo libros junto al fuego.",
    "German": "Das Wetter war heute Morgen kalt, also sind wir drinnen geblieben und haben Bücher gelesen.",
    "Russian": "Сегодня утром было холодно, поэтому мы остались дома и читали книги у камина весь день.",
    "Chinese": "今天早上天气很冷，所以我们待在家里，在壁炉旁边读书，一直读到中午才出门散步。",
    "Hindi": "आज सुबह मौसम ठंडा था, इसलिए हम घर के अंदर रहे और आग के पास बैठकर किताबें पढ़ीं।",
    "Swahili": "Hali ya hewa ilikuwa baridi asubuhi hii, kwa hivyo tulikaa ndani na kusoma vitabu karibu na moto.",
}


def _chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Ok."}]}


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_detects_the_language_of_a_full_sentence(language):
    assert lang.language_name(lang.detect_language(SENTENCES[language])) == language


def test_detection_is_deterministic_and_needs_letters():
    short = "Bonjour, ça va ? Oui."  # short texts are where an unseeded langdetect flips
    assert len({lang.detect_language(short) for _ in range(20)}) == 1
    assert lang.detect_language("2 + 2 = 4, 17 * 3 = ?") is None
    assert lang.language_name(None) == "Undetected"
    assert lang.language_name("zh-tw") == lang.language_name("zh-cn") == "Chinese"


def test_prompt_text_drops_code_and_responses():
    row = {
        "messages": [
            {"role": "user", "content": "Fix this:\n```python\nprint('hello world')\n```\nplease"},
            {"role": "assistant", "content": "Voici la réponse."},
        ]
    }
    text = lang.prompt_text("sft", row)
    assert "print" not in text and "Voici" not in text and "please" in text
    assert len(lang.prompt_text("sft", _chat("word " * 1000))) == lang.MAX_CHARS


def test_counting_shares_bad_rows_and_stride():
    rows = [_chat(SENTENCES["English"])] * 6 + [_chat(SENTENCES["French"])] * 2
    rows += [_chat("12 + 30 = ?"), {"id": "no messages"}, None]
    result = lang.count_languages(rows, kind="sft", mixture="tulu3_sft")
    assert (result.n_rows, result.n_checked, result.n_undetected, result.n_skipped) == (11, 9, 1, 2)
    assert [p.index for p in result.problems] == [9]
    frame = result.frame()
    assert list(frame["language"]) == ["English", "French"]
    assert list(frame["percent"]) == [75.0, 25.0]  # of the 8 rows with a detected language
    every_other = lang.count_languages(rows[:8], kind="sft", stride=2)
    assert every_other.n_checked == 4 and every_other.n_rows == 8
    with pytest.raises(ValueError, match="stride"):
        lang.count_languages(rows, kind="sft", stride=0)


def test_fixture_mixtures_are_mostly_english_and_feed_tables_10_to_12(tmp_path):
    results = [
        lang.language_distribution(name, mirror=FIXTURES_DIR, progress=False)
        for name in ("tulu3_sft", "tulu3_preference", "rlvr_mixed")
    ]
    for result in results:
        assert result.n_skipped == 0 and result.n_rows == lang.mixture_rows(result.mixture, FIXTURES_DIR)
        assert result.frame()["language"].iloc[0] == "English"
        assert result.frame()["percent"].sum() == pytest.approx(100.0)
    sft_languages = set(results[0].frame()["language"])
    assert {"Spanish", "French"} <= sft_languages  # the fixture holds a few Spanish, French, German chats
    assert len(load_rows("tulu3_sft", mirror=FIXTURES_DIR)) == results[0].n_rows
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(lang.results_rows(results, run_id="languages_test"))
    table10 = tables.build_table(10, store)
    assert list(table10.index[:20]) == list(tables.build_table(10).index)  # the paper's order first
    assert table10.loc["English", "Presence % (paper)"] == 83.13
    share = results[0].frame().set_index("language")["percent"]
    assert table10.loc["English", "Presence % (kit)"] == pytest.approx(share["English"])
    assert table10.loc["Hindi", "Presence % (kit)"] == 0.0  # read, not found
    assert "langdetect" in table10.attrs["notes"][0]
    table12 = tables.build_table(12, store)
    assert table12.loc["English", "Presence % (kit)"] == 100.0
    assert table12.loc["English", "Presence % Δ"] == pytest.approx(5.2)
