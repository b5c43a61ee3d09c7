"""Answer scoring, the one home of answer normalisation and metrics: VQAv2 soft accuracy with its answer
normalisation, exact match, ANLS, ChartQA's relaxed accuracy and multiple-choice accuracy; `score`, which averages
them over records overall and per question type; and `per_type_accuracy`, the built-in synthetic set's exact match
per question type next to its chance level.

Every metric maps (prediction, references) to a score in [0, 1]; pure Python (no JAX). The trainer's validation
and `python -m leo_jax.eval` both score with this module.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from leo_jax.data import synthetic

# ---------------------------------------------------------------------------------------------------------------
# VQAv2 answer normalisation (the official evaluation script, vqaEval.py: processPunctuation + processDigitArticle)
# ---------------------------------------------------------------------------------------------------------------

# The official contractions table, verbatim (including its quirks: the capitalised keys never match because words
# are lower-cased first, and "somebody'd" maps to "somebodyd").
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophes, periods and colons are not in the official list: "it's" and "3.5" survive punctuation handling.
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) look-ahead that always holds, so in
# effect a period is removed unless a digit follows it ("3.5" stays, "dogs." and "5." lose it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE), which passes re.UNICODE (= 32) as the `count`
# argument: at most 32 periods are removed. Kept so scores match the official script on any text.
_OFFICIAL_PERIOD_STRIP_COUNT = 32


def vqa_process_punctuation(text: str) -> str:
    """The official processPunctuation: each listed mark is deleted when it touches a space in the input, or when
    the input contains a digit-comma-digit ("1,000" -> "1000"); otherwise it becomes a space ("red/white" ->
    "red white"). Then periods not followed by a digit are deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        touches_space = (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_STRIP_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, split on whitespace, number words -> digits ("two" -> "2",
    "none" -> "0"), drop articles, expand apostrophe-less contractions ("dont" -> "don't"), join with single spaces."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The official VQAv2 answer normalisation: newlines/tabs -> spaces, strip, punctuation, digits/articles/
    contractions. "Two dogs." -> "2 dogs", "1,000" -> "1000", "The cat's toy!" -> "cat's toy"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


# ---------------------------------------------------------------------------------------------------------------
# Metrics on one prediction
# ---------------------------------------------------------------------------------------------------------------

def _check_references(references: Sequence[str], metric: str) -> None:
    if isinstance(references, str) or not references:
        raise ValueError(f"{metric}: references must be a non-empty list of strings, got {references!r}")


def _vqa_matches(prediction: str, references: Sequence[str]) -> list[bool]:
    target = normalize_vqa_answer(prediction)
    return [normalize_vqa_answer(reference) == target for reference in references]


def vqa_soft_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy, the exact averaged rule of the official script: the mean, over the n leave-one-out subsets of
    the n (normally 10) annotator answers, of min(1, #matches in the subset / 3).

    With 10 answers: 1 match -> 9/10 * 1/3 = 0.3, 2 -> 0.6, 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9, 4 or more -> 1.0.
    Prediction and answers are compared after `normalize_vqa_answer`. Difference from the script: it normalises
    only when the annotators disagree (its answer files are already normalised, so an unnormalised prediction such
    as "Yes." scores 0 against ten "yes"); here both sides are always normalised, which gives the same score for
    normalised predictions and does not punish formatting. Needs at least 2 answers (with one, every leave-one-out
    subset is empty).
    """
    _check_references(references, "vqa_soft_accuracy")
    if len(references) < 2:
        raise ValueError("vqa_soft_accuracy: the averaged rule needs the annotator answers (normally 10), got 1; "
                         "use vqa_soft_accuracy_simple or exact_match for single-reference data")
    matches = _vqa_matches(prediction, references)
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def vqa_soft_accuracy_simple(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy, the simplified rule of the VQA paper: min(1, #answers matching the prediction / 3), after
    `normalize_vqa_answer`. With 10 answers: 1 match -> 1/3, 2 -> 2/3, 3 or more -> 1.0."""
    _check_references(references, "vqa_soft_accuracy_simple")
    return min(1.0, sum(_vqa_matches(prediction, references)) / 3)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when `normalize_vqa_answer(prediction)` equals `normalize_vqa_answer(reference)` for any reference, else
    0.0. So the comparison ignores case, surrounding whitespace, articles, the VQA punctuation marks and trailing
    periods, and treats number words as digits ("The two." matches "2")."""
    _check_references(references, "exact_match")
    return float(any(_vqa_matches(prediction, references)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    """DocVQA's answer preparation: lower-case, strip, collapse runs of whitespace."""
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity term of DocVQA / ST-VQA for one question: the max over references
    of 1 - NL, where NL = levenshtein(p, r) / max(len(p), len(r)) on lower-cased, stripped, whitespace-collapsed
    text, and 0 when NL >= threshold (the paper's s = 1 - NL if NL < tau else 0). Two empty strings score 1.0.
    A one-character typo in a 10-character answer scores 0.9."""
    _check_references(references, "anls")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"anls: threshold must be in (0, 1], got {threshold}")
    predicted = _anls_text(prediction)
    best = 0.0
    for reference in map(_anls_text, references):
        length = max(len(predicted), len(reference))
        distance = levenshtein(predicted, reference) / length if length else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")


def _parse_number(text: str) -> tuple[float, bool] | None:
    """(value, had a percent sign) when the whole answer is one number, e.g. "1,234.5", "12%", "-3"; else None."""
    text = _THOUSANDS_COMMA.sub("", text.strip())
    percent = text.endswith("%")
    text = text[:-1].strip() if percent else text
    return (float(text), percent) if _NUMBER.fullmatch(text) else None


def _relaxed_match(prediction: str, reference: str, tolerance: float) -> bool:
    predicted, target = _parse_number(prediction), _parse_number(reference)
    if predicted is None or target is None:
        return prediction.strip().lower() == reference.strip().lower()
    (p_value, p_percent), (t_value, t_percent) = predicted, target
    # A percentage written on one side only may mean the bare number ("12%" for label 12) or the fraction
    # ("12%" for label 0.12); either reading counts.
    candidates = [p_value]
    if p_percent and not t_percent:
        candidates.append(p_value / 100)
    elif t_percent and not p_percent:
        candidates.append(p_value * 100)
    if t_value == 0:
        return 0.0 in candidates
    return any(abs(value - t_value) / abs(t_value) <= tolerance for value in candidates)


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: when prediction and reference are both numbers, correct if the relative error
    |p - r| / |r| <= tolerance (5%); otherwise a case-insensitive exact string match. Max over references.

    Numbers may carry thousands separators ("1,000") and a trailing "%". Where only one side has "%", both readings
    of the percentage are tried (12% as 12 or as 0.12); ChartQA's reference code reads it only as the fraction, so
    it scores "12%" against the label "12" as wrong. A zero reference needs a prediction of exactly zero (relative
    error is undefined there; the reference code falls back to string equality).
    """
    _check_references(references, "relaxed_accuracy")
    if tolerance < 0:
        raise ValueError(f"relaxed_accuracy: tolerance must be >= 0, got {tolerance}")
    return float(any(_relaxed_match(prediction, reference, tolerance) for reference in references))


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------

def option_map(options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{"A": text, "B": text, ...} from a list of option texts (in letter order) or a letter -> text mapping."""
    if isinstance(options, Mapping):
        letters = {str(letter).strip().upper(): str(text) for letter, text in options.items()}
        bad = [letter for letter in letters if len(letter) != 1 or letter not in string.ascii_uppercase]
        if bad:
            raise ValueError(f"options: keys must be single letters A-Z, got {bad}")
        return letters
    if isinstance(options, str) or not options or len(options) > 26:
        raise ValueError(f"options must be a list of 1 to 26 option texts or a letter -> text mapping, "
                         f"got {options!r}")
    return {string.ascii_uppercase[i]: str(text) for i, text in enumerate(options)}


def _letter_patterns(letters: str) -> list[re.Pattern]:
    """Explicit ways of naming an option letter, most specific first. In running text only an upper-case letter
    counts (a lower-case "a" is usually the article) unless brackets or a leading delimiter make it unambiguous."""
    upper = f"[{letters}]"
    any_case = f"[{letters}{letters.lower()}]"
    return [
        re.compile(rf"^\s*\(?({any_case})\)?[.:)]?\s*$"),                     # "B", "(b)", "B.", "b)"
        re.compile(rf"^\s*\(?({any_case})[).:]\s"),                           # "b) cat", "(B) cat", "B. cat"
        re.compile(rf"(?i:\banswer)(?:\s+(?i:is))?\s*:?\s*\(?({upper})\b"),    # "The answer is (B)."
        re.compile(rf"(?i:\b(?:option|choice))(?:\s+(?i:is))?\s*:?\s*\(?({upper})\b"),  # "Option C"
        re.compile(rf"\(({any_case})\)"),                                      # "... (c) ..."
    ]


def extract_choice(prediction: str, options: Sequence[str] | Mapping[str, str]) -> str | None:
    """The option letter a free-text answer chooses, or None when it names none (or several).

    In order: a bare letter ("B", "b)", "(B)."); a leading letter with a delimiter ("b) a cat"); a phrase like
    "the answer is (B)" / "Answer: C", then "option C"; a bracketed letter anywhere; the text of one option (equal
    after `normalize_vqa_answer`, else contained as whole words, the longest when one contains another); exactly
    one distinct stand-alone capital option letter (which can misread a sentence-initial article "A").
    """
    choices = option_map(options)
    letters = "".join(sorted(choices))
    for pattern in _letter_patterns(letters):
        match = pattern.search(prediction)
        if match:
            return match.group(1).upper()

    normalized = normalize_vqa_answer(prediction)
    option_texts = {letter: normalize_vqa_answer(text) for letter, text in choices.items()}
    equal = [letter for letter, text in option_texts.items() if text and text == normalized]
    if len(equal) == 1:
        return equal[0]
    contained = {letter: text for letter, text in option_texts.items()
                 if text and re.search(rf"(?<!\S){re.escape(text)}(?!\S)", normalized)}
    longest = [letter for letter, text in contained.items()
               if not any(text != other and text in other for other in contained.values())]
    if len(longest) == 1:
        return longest[0]

    standalone = set(re.findall(rf"(?<![A-Za-z'])([{letters}])(?![A-Za-z'])", prediction))
    return standalone.pop() if len(standalone) == 1 else None


def multiple_choice_accuracy(prediction: str, answer_letter: str,
                             options: Sequence[str] | Mapping[str, str]) -> float:
    """1.0 when the option letter extracted from the prediction (`extract_choice`) is `answer_letter`, else 0.0."""
    choices = option_map(options)
    letter = answer_letter.strip().strip("().").upper()
    if letter not in choices:
        raise ValueError(f"multiple_choice_accuracy: answer letter {answer_letter!r} is not one of the options "
                         f"{sorted(choices)}")
    return float(extract_choice(prediction, choices) == letter)


# ---------------------------------------------------------------------------------------------------------------
# Registry and aggregation over records
# ---------------------------------------------------------------------------------------------------------------

Record = Mapping[str, object]


def _references(record: Record, index: int) -> list[str]:
    """The record's reference answers: 'answers' (list of strings) or 'answer' (one string)."""
    if "answers" in record:
        answers = record["answers"]
        if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers \
                or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"record {index}: 'answers' must be a non-empty list of strings, got {answers!r}")
        return list(answers)
    if isinstance(record.get("answer"), str):
        return [record["answer"]]
    raise ValueError(f"record {index}: needs 'answers' (list of strings) or 'answer' (string); "
                     f"has fields {sorted(record)}")


def _on_references(metric: Callable[[str, Sequence[str]], float]) -> Callable[[Record, int], float]:
    def score_record(record: Record, index: int) -> float:
        return metric(_prediction(record, index), _references(record, index))
    return score_record


def _multiple_choice_on_record(record: Record, index: int) -> float:
    references = _references(record, index)
    if "options" not in record:
        raise ValueError(f"record {index}: multiple_choice needs 'options' (list of option texts or "
                         f"letter -> text mapping)")
    if len(references) != 1:
        raise ValueError(f"record {index}: multiple_choice needs one answer letter, got {references!r}")
    return multiple_choice_accuracy(_prediction(record, index), references[0], record["options"])


def _prediction(record: Record, index: int) -> str:
    prediction = record.get("prediction")
    if not isinstance(prediction, str):
        raise ValueError(f"record {index}: 'prediction' must be a string, got {prediction!r}")
    return prediction


# name -> function(record, record index) -> score in [0, 1].
METRICS: dict[str, Callable[[Record, int], float]] = {
    "vqa_accuracy": _on_references(vqa_soft_accuracy),
    "vqa_accuracy_simple": _on_references(vqa_soft_accuracy_simple),
    "exact_match": _on_references(exact_match),
    "anls": _on_references(anls),
    "relaxed_accuracy": _on_references(relaxed_accuracy),
    "multiple_choice": _multiple_choice_on_record,
}


def score_record(record: Record, metric_names: Sequence[str], index: int = 0) -> dict[str, float]:
    """{metric name: score} for one record (`index` only labels error messages)."""
    unknown = [name for name in metric_names if name not in METRICS]
    if unknown or not metric_names:
        raise ValueError(f"unknown or no metric names {list(unknown)}; choose from {sorted(METRICS)}")
    return {name: METRICS[name](record, index) for name in metric_names}


def score(records: Sequence[Record], metric_names: Sequence[str]) -> dict:
    """Mean of each metric over the records, overall and per 'question_type' (records without one count only
    overall): {"num_samples": n, "metrics": {name: mean}, "per_question_type": {type: {"num_samples": k,
    "metrics": {name: mean}}}}."""
    if not records:
        raise ValueError("score: no records")
    totals: dict[str, float] = defaultdict(float)
    type_totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    type_counts: dict[str, int] = defaultdict(int)
    for index, record in enumerate(records):
        scores = score_record(record, metric_names, index)
        question_type = record.get("question_type")
        if question_type is not None:
            type_counts[str(question_type)] += 1
        for name, value in scores.items():
            totals[name] += value
            if question_type is not None:
                type_totals[str(question_type)][name] += value
    return {
        "num_samples": len(records),
        "metrics": {name: totals[name] / len(records) for name in metric_names},
        "per_question_type": {
            question_type: {"num_samples": count,
                            "metrics": {name: type_totals[question_type][name] / count for name in metric_names}}
            for question_type, count in sorted(type_counts.items())},
    }


def per_type_accuracy(records: Sequence[Mapping], predictions: Sequence[str]) -> dict[str, dict]:
    """Exact match (`exact_match`) per evaluated question type of synthetic-set records next to its chance level.

    predictions[i] is the model's answer to records[i]'s first question. Returns {type: {num, accuracy,
    majority_accuracy, uniform_accuracy}} for the evaluated types present (`synthetic.chance_levels`).
    """
    if len(predictions) != len(records):
        raise ValueError(f"got {len(predictions)} predictions for {len(records)} records")
    levels = synthetic.chance_levels(records)
    scored = [{"prediction": prediction, "answer": record["conversations"][1]["value"],
               "question_type": record["question_type"]}
              for record, prediction in zip(records, predictions) if record["question_type"] in levels]
    per_type = score(scored, ["exact_match"])["per_question_type"] if scored else {}
    return {t: {"num": level["num"], "accuracy": per_type[t]["metrics"]["exact_match"],
                "majority_accuracy": level["majority_accuracy"], "uniform_accuracy": level["uniform_accuracy"]}
            for t, level in levels.items()}
