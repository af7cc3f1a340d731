"""Format detection in edit.readers.formats: every format named from its rows, one-line errors."""

from __future__ import annotations

import pytest

from edit.errors import EditError
from edit.readers.formats import FORMATS, detect_format, example_form, is_tofu_qa

ROWS = {
    "counterfact": {"requested_rewrite": {"prompt": "{} is in"}},
    "mquake": {"requested_rewrite": [{"prompt": "{} is in"}]},
    "counterfact_flat": {"target_new": "x", "ground_truth": "y", "rephrase_prompt": "z"},
    "zsre": {"src": "q", "alt": "a", "loc": "l"},
    "facts": {"statement": "Paris is capital of Italy"},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_record_format_is_named_from_the_first_row(fmt):
    assert detect_format("data.json", [ROWS[fmt], {"anything": 1}]) == fmt


def test_an_unknown_file_gets_one_line_naming_the_formats_and_the_fix():
    with pytest.raises(EditError) as e:
        detect_format("data.json", [{"foo": 1}])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("data.json is in none of the known formats (counterfact,")
    assert str(e.value).endswith("or pass --format")


def test_corpus_forms_and_their_errors():
    assert example_form("f:1", {"text": "t", "id": 3}) == (None, "text")
    assert example_form("f:1", {"question": "q", "answer": "a"}) == ("question", "answer")
    assert example_form("f:1", {"prompt": "p", "completion": "c"}) == ("prompt", "completion")
    with pytest.raises(EditError, match='f:2: "question" without "answer"'):
        example_form("f:2", {"question": "q"})
    with pytest.raises(EditError, match="f:3: ambiguous example"):
        example_form("f:3", {"text": "t", "prompt": "p", "completion": "c"})
    with pytest.raises(EditError, match="f:4: expected a JSON object, got null"):
        example_form("f:4", None)


def test_tofu_qa_rows_are_those_with_perturbed_answers():
    assert is_tofu_qa([{"question": "q", "answer": "a", "perturbed_answer": ["b"]}])
    assert not is_tofu_qa([{"question": "q", "answer": "a"}])
    assert not is_tofu_qa([{"question": "q", "answer": "a", "perturbed_answer": ["b"]}, 3])


def test_a_corpus_keeps_its_records_for_the_qa_reader(tmp_path):
    """``edit audit --forget`` reads the file once: the TOFU QA records come from the
    corpus's own parsed records, equal to reading them from the file."""
    import json

    from edit.readers.corpus import read_corpus
    from edit.readers.tofu import qa_records, read_qa

    rows = [{"question": f"Q{i}?", "answer": f"A{i}.", "paraphrased_answer": f"P{i}.",
             "perturbed_answer": [f"X{i}.", f"Y{i}."]} for i in range(3)]  # fmt: skip
    for text in (json.dumps(rows), "".join(json.dumps(r) + "\n" for r in rows)):
        path = tmp_path / "forget.json"
        path.write_text(text)
        corpus = read_corpus(path)
        assert corpus.source == str(path) and [ex.answer for ex in corpus] == ["A0.", "A1.", "A2."]
        assert is_tofu_qa([row for _, row in corpus.records])
        assert qa_records(path, corpus.records) == read_qa(path)
