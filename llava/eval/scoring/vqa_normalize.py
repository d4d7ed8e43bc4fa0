"""The EvalAI/VQA answer normaliser and the 10-annotator VQA accuracy, as LLaVA scores them.

LLaVA's `llava/eval/m4c_evaluator.py` (`EvalAIAnswerProcessor`, `TextVQAAccuracyEvaluator`) is a
copy of MMF's processor, itself reproduced from the official VQA evaluation code; the tables
below (contractions, number words, articles, punctuation) are reproduced from that official code.
Every quirk is kept on purpose, because changing one changes benchmark numbers:

- commas and `?` are deleted first and `'s` becomes ` 's` (so `dog's` -> `dog 's`);
- the punctuation rule tests the text *before* any replacement: a mark is deleted when some
  occurrence of it touches a space, or when the text has a digit,digit comma, else replaced by a
  space. Commas are already gone by then, so the digit,digit branch can never fire; kept anyway;
- periods go through `(?!<=\\d)(\\.)(?!\\d)`: the "lookbehind" is malformed (it is a lookahead for
  the literal `<=`+digit, always true before a `.`), so every `.` not followed by a digit is deleted
  (`3.5` stays, `five.` loses its period, `.5` stays);
- `re.UNICODE` (= 32) is passed as `count` to `sub`, so at most 32 periods are deleted;
- number words none/zero..ten become digits *before* articles a/an/the are dropped;
- contraction keys with capitals (`Im`, `Ive`, `Id've`, `I'dve`) can never match lowercased text,
  and `somebody'd` maps to the odd `somebodyd`; `'s` forms never match since `'s` was split off.
- Not reproduced (no effect on output): the original's `NUMBER_MAP.setdefault` grows the table
  with every word it sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from llava.errors import DataError

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # malformed lookbehind, kept (see module doc)
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _tokenize(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation; the tests look at `text` as given, not as it is edited."""
    has_digit_comma = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATIONS:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # re.UNICODE (32) lands in `count`, as upstream


def process_digit_article(text: str) -> str:
    """Number words to digits, then articles dropped, then contractions fixed; words re-joined."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """`EvalAIAnswerProcessor()(answer)`: the normal form both predictions and answers are compared in."""
    text = _tokenize(answer)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Each distinct normalised human answer's VQA accuracy.

    For each of the n leave-one-out subsets (n-1 annotators), a candidate scores
    `min(1, matches/3)`; its accuracy is the mean over the n subsets (TextVQA's evaluator).
    """
    answers = [normalize_answer(a) for a in gt_answers]
    scores: dict[str, float] = {}
    for candidate in set(answers):
        total = sum(candidate == a for a in answers)
        # leaving out an annotator who gave `candidate` removes one match, any other removes none
        accs = [min(1.0, (total - (a == candidate)) / 3) for a in answers]
        scores[candidate] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """The prediction's score against the human answers (0 when no human gave its normal form)."""
    return answer_scores(gt_answers).get(normalize_answer(prediction), 0.0)


def answer_strings(raw: Any, where: str) -> list[str]:
    """Human answers as strings: a list of strings, or of `{"answer": ...}` dicts (VQAv2, VizWiz)."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'answers' must be a non-empty list")
    out = []
    for item in raw:
        value = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(value, str):
            raise DataError(f"{where}: each answer must be a string or an object with an 'answer' string")
        out.append(value)
    return out


def mean(values: Iterable[float]) -> float:
    """The average, 0.0 for nothing (as the GQA script's `avg`)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0
