import json

import pytest

from nightshift.prep.curator import DocumentCurator
from nightshift.prep.decontaminate import Decontaminate, EvalIndex, read_items
from nightshift.prep.recipe import PrepRecipe


def eval_set(tmp_path, name, items):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


def test_documents_sharing_a_13_word_run_with_an_evaluation_set_are_found(tmp_path):
    question = ("Which planet in our solar system has the longest day of all the planets when measured in hours "
                "on earth")
    config = Decontaminate(sets={"qa": eval_set(tmp_path, "qa", [{"question": question, "answer": "Venus"}]),
                                 "other": eval_set(tmp_path, "other", [{"text": "nothing in common with docs"}])})
    index = EvalIndex.build(config)
    words = question.split()
    docs = [
        "Notes. " + " ".join(words[3:16]).upper() + ", said the guide.",  # 13 words, other case and punctuation
        "Notes. " + " ".join(words[3:15]) + " and more.",  # only 12 shared words
        "Nothing to see here at all today, the dome is closed for repairs until the spring.",
    ]
    assert index.contaminated(docs) == [["qa"], [], []]
    assert index.items == {"other": 1, "qa": 2}


def test_short_items_are_matched_whole_when_long_enough(tmp_path):
    config = Decontaminate(sets={"qa": eval_set(tmp_path, "qa", [
        {"answer": "Members enter free on every evening of the year"},  # 10 words: matched whole
        {"answer": "Venus"},  # too short to mean anything
    ])}, min_item_words=8)
    index = EvalIndex.build(config)
    hits = index.contaminated(["Good news: members enter free on every evening of the year!", "Venus is bright."])
    assert hits == [["qa"], []]


def test_plain_text_lines_are_items_too(tmp_path):
    path = tmp_path / "set.txt"
    path.write_text("first item line\n\n{\"q\": \"a json item\", \"n\": 3}\n")
    assert read_items(path) == ["first item line", "a json item"]


CURLY = ("The guide’s answer was “don’t look at the Sun through the finder”, and the visitors’ children "
         "didn’t forget it on the terrace")
STRAIGHT = CURLY.replace("’", "'").replace("“", '"').replace("”", '"')


@pytest.mark.parametrize(("item", "copied"), [(CURLY, STRAIGHT), (CURLY, CURLY), (STRAIGHT, CURLY),
                                              (STRAIGHT, STRAIGHT)])
def test_an_item_is_found_whichever_quotes_and_apostrophes_either_side_uses(tmp_path, item, copied):
    index = EvalIndex.build(Decontaminate(sets={"qa": eval_set(tmp_path, "qa", [{"question": item}])}))
    docs = [f"From the night log. {copied} Then the dome closed.", "The dome closed early, as it doesn’t often do."]
    assert index.contaminated(docs) == [["qa"], []]


@pytest.mark.parametrize("copied", [STRAIGHT, CURLY])
def test_the_preparation_step_drops_a_document_copying_a_curly_quoted_item(tmp_path, copied):
    sets = {"qa": eval_set(tmp_path, "qa", [{"question": CURLY, "answer": "no"}])}
    recipe = PrepRecipe.from_dict({"limits": {"min_chars": 10}, "steps": [{"decontaminate": {"sets": sets}}]})
    curator = DocumentCurator(recipe)
    kept, copy = curator.process_batch([("kept", "text", "A clear night, and the dome opened at nine."),
                                        ("copy", "html", f"<html><body><p>Quoted: {copied}.</p></body></html>")])
    assert kept.text is not None and kept.contaminated == []
    assert (copy.step, copy.reason, copy.contaminated) == ("decontaminate", "contaminated:qa", ["qa"])


@pytest.mark.parametrize("hide", ["\u200b", "\u200d", "\u00ad", "\u2060", "\ufeff"])
def test_a_copy_sprinkled_with_invisible_characters_or_no_break_spaces_is_found(tmp_path, hide):
    item = "The refractor is pointed by the duty astronomer on every clear night of the winter season"
    index = EvalIndex.build(Decontaminate(sets={"qa": eval_set(tmp_path, "qa", [{"question": item}])}))
    hidden = " ".join(word[:2] + hide + word[2:] if len(word) > 3 else word for word in item.split())
    no_break = item.replace(" ", "\u00a0")
    full_width = item.replace("refractor", "ｒｅｆｒａｃｔｏｒ")
    docs = [f"Night log. {hidden}.", f"Night log. {no_break}.", f"Night log. {full_width}.", "The dome closed early."]
    assert index.contaminated(docs) == [["qa"], ["qa"], ["qa"], []]
