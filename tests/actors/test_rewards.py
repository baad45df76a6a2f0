"""The built-in rule-based rewards against hand-checked tables of (response, label, expected reward).

Each table row was decided by hand from the rule the rm type documents (DAPO's, DeepScaleR's, SQuAD's
scorer), not by running the code; the F1 rows spell out the precision/recall arithmetic.
"""
from __future__ import annotations

import pytest

from actors.rewards import BUILTIN, RM_TYPES, get_reward_fn
from actors.rm_hub.math_utils import last_boxed, math_equal, normalize_answer
from async_rl.config import RolloutConfig, field_choices

B = "\\boxed"


def test_every_declared_rm_type_is_implemented():
    # the choices live on the config field; actors.rewards refuses to import if they drift apart
    assert RM_TYPES == field_choices(RolloutConfig, "rm_type")
    assert set(BUILTIN) | {"remote_rm"} == set(RM_TYPES)


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),                         # the last box counts
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                   # nested braces stay whole
    ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
    ("$\\boxed 5$", "5"),                                        # \boxed 5 without braces
    ("\\fbox{7}", "7"),
    ("\\boxed {3}", "3"),
    ("\\boxed{\\frac{1}{2}", None),                              # truncated: unclosed
    ("no box here: 42", None),
    ("\\boxed{}", ""),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("raw,normalized", [
    ("  42 ", "42"), ("42.", "42"), ("$42$", "42"), ("\\$42", "42"), ("1,000,000", "1000000"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("\\text{(A)}", "(A)"), ("90^\\circ", "90"), ("90^{\\circ}", "90"),
    ("30 degrees", "30"), ("5 \\text{ cm}", "5"), ("5cm", "5"), ("12 square units", "12"), ("5xcm", "5xcm"), ("x = 7", "7"), ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\frac12", "\\frac{1}{2}"), ("\\sqrt2", "\\sqrt{2}"), ("50\\%", "50"), ("{5}", "5"),
    ("\u22125", "-5"), ("\\tfrac{1}{3}", "\\frac{1}{3}"),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


MATH_EQUAL = [
    ("42", "42", True), ("042", "42", True), ("42.0", "42", True), ("41", "42", False),
    ("0.5", "\\frac{1}{2}", True), ("1/2", "\\dfrac{1}{2}", True), ("\\frac{2}{4}", "0.5", True),
    ("0.3333", "\\frac{1}{3}", False), ("-0.75", "-\\frac{3}{4}", True), ("\\frac{-3}{4}", "-0.75", True),
    ("1,234", "1234", True), ("1234", "1,234", True), ("12,34", "1234", False),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\pi", "2 \\cdot \\pi", True), ("\\pi", "3.14", False), ("\\sqrt[3]{8}", "2", True),
    ("x^2+2x+1", "(x+1)^2", True), ("x^2+1", "(x+1)^2", False), ("2x", "x+x", True),
    ("(1, \\frac{1}{2})", "(1,0.5)", True), ("(1,2)", "(2,1)", False), ("[1,2)", "(1,2)", False),
    ("(1,2,3)", "(1,2)", False), ("\\text{Monday}", "monday", True), ("Tuesday", "monday", False),
    ("90^\\circ", "90", True), ("10\\%", "10", True), ("x = 3", "3", True), ("5 \\text{ cm}", "5", True),
    ("", "5", False), (None, "5", False), ("\\frac{1}{0}", "1", False), ("2^{1000}", "3", False),
    ("__import__('os')", "0", False), ("1e3", "1000", True), ("+5", "5", True),
    ("a+b+c", "c+b+a", False),  # more than two unknowns: treated as text, not algebra
    ("x+y", "y+x", True),
]


@pytest.mark.parametrize("given,truth,expected", MATH_EQUAL)
def test_math_equal(given, truth, expected):
    assert math_equal(given, truth) is expected


MATH = [  # rm_type=math: last boxed answer equivalent to the label -> 1.0, else 0.0
    ("So 2+2 = \\boxed{4}.", "4", 1.0),
    ("So 2+2 = \\boxed{5}.", "4", 0.0),
    ("The answer is 4.", "4", 0.0),                               # nothing boxed
    ("first \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),
    ("first \\boxed{4}, corrected: \\boxed{3}", "4", 0.0),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", 1.0),               # a boxed label is unboxed too
    ("\\boxed{1,000}", 1000, 1.0),                                # numeric labels from JSON
    ("\\boxed{007}", "7", 1.0),
    ("\\boxed{\\text{(B)}}", "(B)", 1.0),
    ("\\boxed{45^\\circ}", "45", 1.0),
    ("\\boxed{x=2}", "2", 1.0),
    ("\\boxed{4}", "", 0.0),                                       # no label: never rewarded
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),                # truncated box
]


@pytest.mark.parametrize("response,label,expected", MATH)
def test_math_reward(response, label, expected):
    assert get_reward_fn("math")("", response, label) == expected


DAPO = [  # DAPO: last "Answer:" in the last 300 chars, Minerva-normalized; +1 / -1
    ("reasoning...\nAnswer: 42", "42", 1.0),
    ("Answer: $42$", "42", 1.0),
    ("answer: 1,000", "1000", 1.0),
    ("ANSWER:42", 42, 1.0),
    ("Answer: 41", "42", -1.0),
    ("The result is 42", "42", -1.0),                              # no Answer: line
    ("Answer: 90 degrees", "90", 1.0),
    ("Answer: x = 42", "42", 1.0),
    ("Answer: \\boxed{42}", "42", 1.0),
    ("Answer: 42", "42.0", 1.0),                                   # integer labels compare as integers
    ("Answer: 42.0", "42", -1.0),                                  # ... but the prediction is not converted
    ("Answer: 42.", "42", 1.0),                                    # trailing period forgiven
    ("Answer: 3\nwait, no.\nAnswer: 5", "5", 1.0),                 # the last Answer: counts
    ("Answer: 5\nwait, no.\nAnswer: 3", "5", -1.0),
    ("Answer: 5" + " " * 300, "5", -1.0),                          # outside the last 300 chars
    ("Answer: \\frac{1}{2}", "\\frac12", 1.0),
    ("Answer: 42 <|im_end|>", "42", 1.0),
]


@pytest.mark.parametrize("response,label,expected", DAPO)
def test_dapo_reward(response, label, expected):
    detail = BUILTIN["dapo"]("", response, label)
    assert detail["score"] == expected and detail["acc"] is (expected > 0)
    assert get_reward_fn("dapo")("", response, label) == expected  # the dict's scalar is its score


def test_dapo_detail_carries_the_prediction():
    assert BUILTIN["dapo"]("", "Answer: $1,000$", "1000")["pred"] == "1000"
    assert BUILTIN["dapo"]("", "no answer", "1")["pred"] == "[INVALID]"


DEEPSCALER = [  # boxed answer after the last </think>: 1 / 0
    ("<think>maybe \\boxed{3}</think> so \\boxed{4}", "4", 1.0),
    ("<think>maybe \\boxed{4}</think> so \\boxed{3}", "4", 0.0),   # the thought's box does not count
    ("<think>so \\boxed{4}</think> done", "4", 0.0),               # nothing boxed after </think>
    ("no think tags \\boxed{4}", "4", 0.0),                        # thinking never finished
    ("<think>a</think>x</think> \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("<think></think>\\boxed{4}", "\\boxed{4}", 1.0),
    ("<think></think>\\boxed{4}", "", 0.0),
    ("<think></think>\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
]


@pytest.mark.parametrize("response,label,expected", DEEPSCALER)
def test_deepscaler_reward(response, label, expected):
    assert get_reward_fn("deepscaler")("", response, label) == expected


F1 = [  # SQuAD: lower-case, drop punctuation and a/an/the, token multiset overlap
    ("Paris", "paris", 1.0),
    ("The Eiffel Tower.", "eiffel tower", 1.0),
    ("in Paris France", "Paris", 2 * (1 / 3) * 1 / (1 / 3 + 1)),        # P=1/3 R=1 -> 0.5
    ("new york city", "new york", 2 * (2 / 3) * 1 / (2 / 3 + 1)),        # P=2/3 R=1 -> 0.8
    ("a b c d", "c d e f", 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)),           # "a" is an article: b c d, P=2/3 R=1/2
    ("blue", "red", 0.0),
    ("", "", 1.0),                                                      # both empty
    ("the", "", 1.0),                                                   # only an article: empty
    ("", "red", 0.0),
    ("red red red", "red", 2 * (1 / 3) * 1 / (1 / 3 + 1)),              # multiset: one shared "red"
    ("red car", ["blue car", "red car"], 1.0),                          # best of several golds
    ("42", 42, 1.0),
]


@pytest.mark.parametrize("response,label,expected", F1)
def test_f1_reward(response, label, expected):
    assert get_reward_fn("f1")("", response, label) == pytest.approx(expected, abs=1e-12)


GPQA_PROMPT = "Which is prime?\nA) 12\nB) 15\nC) 17\nD) 21\n"
GPQA = [  # (response, label, expected) with the options above; the correct one is C (17)
    ("The answer is C", "C", 1.0),
    ("Answer: (C)", "C", 1.0),
    ("answer: C", "C", 1.0),
    ("\\boxed{C}", "C", 1.0),
    ("\\boxed{\\text{C}}", "C", 1.0),
    ("I choose (C).", "C", 1.0),
    ("C is correct", "C", 1.0),
    ("C", "C", 1.0),
    ("C.", "C", 1.0),
    ("**Final Answer:** **C**", "C", 1.0),                          # markdown emphasis
    ("Answer: **(D)**", "D", 1.0),
    ("The answer is B", "C", 0.0),
    ("Option A is wrong; the final answer is C", "C", 1.0),          # the last statement counts
    ("<think>the answer is C</think>Answer: B", "C", 0.0),           # reasoning is not the answer
    ("a prime is odd, the answer is C", "C", 1.0),                   # article "a" is not option A
    ("It is 17", "C", 1.0),                                          # no letter: the option's text
    ("12, 15, 17 or 21", "C", 0.0),                                  # every option recited
    ("Answer: C", "17", 1.0),                                        # label as option text
    ("Answer: C", 2, 1.0),                                           # label as index
    ("Answer: C", "(C)", 1.0),
    ("Answer: C", {"answer": "C"}, 1.0),
    ("Answer: E", "C", 0.0),                                         # not an option: no letter
    ("I do not know", "C", 0.0),
]


@pytest.mark.parametrize("response,label,expected", GPQA)
def test_gpqa_reward(response, label, expected):
    assert get_reward_fn("gpqa")(GPQA_PROMPT, response, label) == expected


def test_gpqa_choices_from_the_label():
    label = {"choices": ["red", "green", "blue", "black", "white"], "answer": "white"}
    fn = get_reward_fn("gpqa")
    assert fn("Pick a colour", "Answer: E", label) == 1.0              # five options: E is valid
    assert fn("Pick a colour", "Answer: B", label) == 0.0
    assert fn("Pick a colour", "it is white", label) == 1.0


@pytest.mark.parametrize("response,label,expected", [
    ("22", "22", 1.0), (" 22\n", "22", 1.0), ("22", 22, 1.0), ("23", "22", 0.0), ("2 2", "22", 0.0),
])
def test_exact_match(response, label, expected):
    assert get_reward_fn("exact_match")("17+5=", response, label) == expected
