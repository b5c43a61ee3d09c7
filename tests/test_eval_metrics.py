"""Benchmark metrics against published values and rules worked out by hand."""

import pytest

from leo_jax.scoring import (
    METRICS,
    anls,
    exact_match,
    extract_choice,
    levenshtein,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    relaxed_accuracy,
    score,
    score_record,
    vqa_soft_accuracy,
    vqa_soft_accuracy_simple,
)

# ---- VQAv2 normalisation (cases follow the rules of the official vqaEval.py) ----


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"),            # number word -> digit, trailing period removed, lower-cased
    ("The cat", "cat"),                 # articles dropped
    ("an apple a day", "apple day"),
    ("ten", "10"), ("None", "0"),       # the script's number map includes "none" -> "0"
    ("it's", "it's"),                   # apostrophe is not punctuation; "it's" is not in the contractions table
    ("Its", "its"),
    ("isnt", "isn't"), ("dont", "don't"), ("whats", "what's"),   # apostrophe-less contractions are expanded
    ("1,000", "1000"),                  # digit-comma-digit: commas deleted, not turned into spaces
    ("1,000 dogs,cats", "1000 dogscats"),  # ... and then every listed mark in the answer is deleted
    ("red,white", "red white"),         # mark touching no space becomes a space
    ("red, white", "red white"),        # mark next to a space is deleted
    ("left-handed", "left handed"),
    ("well - known", "well known"),
    ("3.5", "3.5"), ("5.", "5"),        # a period survives only before a digit
    ("Yes?!", "yes"),
    ("  yes\n", "yes"), ("red\tball", "red ball"),
])
def test_vqa_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_normalisation_keeps_official_period_count_quirk():
    # The script passes re.UNICODE (32) as `count` to re.sub: only the first 32 periods go.
    assert normalize_vqa_answer("." * 40 + "x") == "." * 8 + "x"


# ---- VQAv2 soft accuracy ----

def _ten_answers(matching: int, answer="2", other="3"):
    return [answer] * matching + [other] * (10 - matching)


def test_vqa_three_of_ten():
    refs = _ten_answers(3)
    assert vqa_soft_accuracy_simple("2", refs) == 1.0
    # Averaged rule by hand: leaving out one of the 3 matching answers leaves 2 -> 2/3 (3 subsets); leaving out one
    # of the 7 others leaves 3 -> 1 (7 subsets): (3 * 2/3 + 7) / 10 = 0.9. (4 matches are needed for 1.0.)
    assert vqa_soft_accuracy("2", refs) == pytest.approx(0.9)
    assert vqa_soft_accuracy("2", _ten_answers(4)) == pytest.approx(1.0)


def test_vqa_one_of_ten():
    refs = _ten_answers(1)
    assert vqa_soft_accuracy_simple("2", refs) == pytest.approx(1 / 3)
    # Leaving out the match: 0 left -> 0 (1 subset); leaving out any other: 1 left -> 1/3 (9 subsets): 9/30 = 0.3.
    assert vqa_soft_accuracy("2", refs) == pytest.approx(0.3)


def test_vqa_leave_one_out_average_by_enumeration():
    # Explicit enumeration of the 10 subsets for 2 matches, independent of the module's counting.
    refs = _ten_answers(2)
    subsets = [refs[:i] + refs[i + 1:] for i in range(10)]
    by_hand = sum(min(1.0, subset.count("2") / 3) for subset in subsets) / 10
    assert by_hand == pytest.approx(0.6)
    assert vqa_soft_accuracy("2", refs) == pytest.approx(by_hand)
    assert vqa_soft_accuracy_simple("2", refs) == pytest.approx(2 / 3)
    assert vqa_soft_accuracy("4", refs) == 0.0 and vqa_soft_accuracy_simple("4", refs) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_soft_accuracy("Two.", _ten_answers(10, answer="two")) == 1.0
    assert vqa_soft_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_soft_accuracy("the Red Car", ["red car"] * 4 + ["blue"] * 6) == 1.0


def test_vqa_accuracy_rejects_bad_references():
    with pytest.raises(ValueError, match="needs the annotator answers"):
        vqa_soft_accuracy("yes", ["yes"])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_soft_accuracy_simple("yes", "yes")
    with pytest.raises(ValueError, match="non-empty list"):
        exact_match("yes", [])


# ---- exact match ----

def test_exact_match():
    assert exact_match("The two.", ["2"]) == 1.0
    assert exact_match("DOG", ["cat", "dog"]) == 1.0
    assert exact_match("dog", ["dogs"]) == 0.0
    assert exact_match("red car", ["car red"]) == 0.0


# ---- ANLS ----

@pytest.mark.parametrize("a, b, distance", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3),
                                            ("abc", "abc", 0), ("abc", "", 3)])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


def test_anls_published_values():
    assert anls("abcdefghiX", ["abcdefghij"]) == pytest.approx(0.9)   # one typo in 10 characters
    assert anls("abcdefXXXX", ["abcdefghij"]) == pytest.approx(0.6)   # NL = 0.4 < 0.5
    assert anls("abcdeXXXXX", ["abcdefghij"]) == 0.0                  # NL = 0.5: not below the threshold
    assert anls("zzzz", ["abcd"]) == 0.0
    assert anls("  Hello   World ", ["hello world"]) == 1.0           # case and whitespace do not count
    assert anls("", [""]) == 1.0
    # Max over references: "invoices" is 1 edit from "invoice" -> 1 - 1/8.
    assert anls("invoice", ["receipt", "invoices"]) == pytest.approx(0.875)
    assert anls("abcdefXXXX", ["abcdefghij"], threshold=0.3) == 0.0


# ---- ChartQA relaxed accuracy ----

@pytest.mark.parametrize("prediction, reference, correct", [
    ("104", "100", True), ("106", "100", False), ("96", "100", True), ("94", "100", False),
    ("105", "100", True),                          # exactly 5% is within tolerance
    ("12%", "12.3", True),                         # percentage read as the bare number
    ("12%", "0.12", True), ("0.12", "12%", True),  # ... or as the fraction
    ("12%", "12%", True), ("50%", "12%", False),
    ("1,000", "1020", True),                       # thousands separator
    ("Yes", "yes", True), ("yes", "no", False),    # non-numeric: case-insensitive exact match
    ("100 apples", "100", False),                  # not a bare number -> string comparison
    ("0.0", "0", True), ("0.01", "0", False),      # zero reference needs exactly zero
])
def test_relaxed_accuracy(prediction, reference, correct):
    assert relaxed_accuracy(prediction, [reference]) == float(correct)


def test_relaxed_accuracy_max_over_references_and_tolerance():
    assert relaxed_accuracy("210", ["100", "200"]) == 1.0
    assert relaxed_accuracy("104", ["100"], tolerance=0.01) == 0.0


# ---- multiple choice ----

OPTIONS = ["cat", "dog", "black cat", "bird"]


@pytest.mark.parametrize("prediction, letter", [
    ("The answer is (B).", "B"), ("B", "B"), ("b", "B"), ("(c)", "C"), ("D.", "D"),
    ("b) dog", "B"), ("(C) black cat", "C"),
    ("Answer: D", "D"), ("the answer is A, a cat", "A"), ("I pick option C because", "C"),
    ("It is clearly (d), a bird", "D"),
    ("dog", "B"), ("It's a Black Cat.", "C"),      # option text; the longer option wins when one contains another
    ("B is correct", "B"),                          # lone capital option letter
    ("I cannot tell", None), ("cat or dog", None),  # nothing / ambiguous
])
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


def test_extract_choice_ignores_lowercase_article_and_letters_outside_options():
    assert extract_choice("the answer is a bird", OPTIONS) == "D"   # "a" is the article, "bird" is option D
    assert extract_choice("The answer is (E).", OPTIONS) is None     # only 4 options


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy("The answer is (B).", "B", OPTIONS) == 1.0
    assert multiple_choice_accuracy("The answer is (B).", "(c)", OPTIONS) == 0.0
    assert multiple_choice_accuracy("I cannot tell", "A", OPTIONS) == 0.0
    assert multiple_choice_accuracy("banana", "b", {"a": "apple", "b": "banana"}) == 1.0
    with pytest.raises(ValueError, match="not one of the options"):
        multiple_choice_accuracy("A", "E", OPTIONS)


# ---- registry and aggregation ----

def test_score_per_metric_and_question_type():
    records = [
        {"prediction": "2", "answers": _ten_answers(1), "question_type": "count"},     # vqa 0.3, simple 1/3
        {"prediction": "two", "answers": _ten_answers(4), "question_type": "count"},   # 1.0, 1.0
        {"prediction": "red", "answers": ["blue"] * 10, "question_type": "color"},     # 0, 0
        {"prediction": "yes", "answers": ["yes"] * 5 + ["no"] * 5},                    # 1.0, 1.0; no type
    ]
    summary = score(records, ["vqa_accuracy", "vqa_accuracy_simple", "exact_match"])
    assert summary["num_samples"] == 4
    assert summary["metrics"]["vqa_accuracy"] == pytest.approx((0.3 + 1 + 0 + 1) / 4)
    assert summary["metrics"]["vqa_accuracy_simple"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    assert summary["metrics"]["exact_match"] == pytest.approx(3 / 4)
    assert set(summary["per_question_type"]) == {"count", "color"}
    count = summary["per_question_type"]["count"]
    assert count["num_samples"] == 2
    assert count["metrics"]["vqa_accuracy"] == pytest.approx(0.65)
    assert count["metrics"]["exact_match"] == 1.0
    assert summary["per_question_type"]["color"]["metrics"] == {"vqa_accuracy": 0.0, "vqa_accuracy_simple": 0.0,
                                                                "exact_match": 0.0}


def test_score_single_answer_metrics_and_multiple_choice():
    records = [
        {"prediction": "104", "answer": "100", "question_type": "chart"},
        {"prediction": "abcdefghiX", "answer": "abcdefghij", "question_type": "doc"},
        {"prediction": "The answer is (B).", "answer": "B", "options": OPTIONS, "question_type": "mc"},
    ]
    assert score_record(records[0], ["relaxed_accuracy", "anls"]) == {"relaxed_accuracy": 1.0,
                                                                            "anls": pytest.approx(2 / 3)}
    summary = score(records, ["anls", "relaxed_accuracy"])
    assert summary["metrics"]["anls"] == pytest.approx((2 / 3 + 0.9 + 0) / 3)
    assert summary["per_question_type"]["doc"]["metrics"]["anls"] == pytest.approx(0.9)
    assert score(records[2:], ["multiple_choice"])["metrics"] == {"multiple_choice": 1.0}
    assert set(METRICS) == {"vqa_accuracy", "vqa_accuracy_simple", "exact_match", "anls", "relaxed_accuracy",
                            "multiple_choice"}


@pytest.mark.parametrize("records, metrics, message", [
    ([], ["exact_match"], "no records"),
    ([{"prediction": "a", "answer": "a"}], ["bleu"], "unknown or no metric names"),
    ([{"answer": "a"}], ["exact_match"], "record 0: 'prediction' must be a string"),
    ([{"prediction": "a", "answer": "a"}, {"prediction": "a"}], ["exact_match"], "record 1: needs 'answers'"),
    ([{"prediction": "a", "answers": []}], ["exact_match"], "record 0: 'answers' must be a non-empty list"),
    ([{"prediction": "A", "answer": "A"}], ["multiple_choice"], "record 0: multiple_choice needs 'options'"),
    ([{"prediction": "yes", "answer": "yes"}], ["vqa_accuracy"], "needs the annotator answers"),
])
def test_score_rejects_bad_records(records, metrics, message):
    with pytest.raises(ValueError, match=message):
        score(records, metrics)
