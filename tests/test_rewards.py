"""Table-driven tests for common.rewards; every expected value is computed by hand."""

import pytest

from common.rewards import (
    MRA_THRESHOLDS,
    PROBLEM_TYPES,
    accuracy_reward,
    extract_answer,
    format_reward,
    length_reward,
    mean_relative_accuracy,
    parse_choice,
    parse_number,
    rouge_f1,
    rouge_l_f1,
    word_error_rate,
)


def ans(x: str) -> str:
    """A well-formed completion whose answer is ``x``."""
    return f"<think>reasoning</think><answer>{x}</answer>"


# --------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no tags at all", None),
        ("<think>only thinking</think>", None),
        ("</answer>", None),
        ("<answer>B", None),  # never closed
        ("<answer>B</answer>", "B"),
        ("<answer> </answer>", ""),  # empty answer
        ("<answer></answer>", ""),
        ("<answer>\n  B \n</answer>", "B"),  # surrounding whitespace / newlines stripped
        ("<answer>line1\nline2</answer>", "line1\nline2"),  # multi-line body kept
        ("<answer>A</answer> then <answer>C</answer>", "C"),  # last wins
        ("<answer><answer>B</answer></answer>", "B"),  # nested: innermost closed span
        ("<answer>A <answer>B</answer>", "B"),  # unclosed earlier tag ignored
        ("<answer>A</answer> <answer>B", "A"),  # trailing unclosed tag ignored
        ("<ANSWER>B</ANSWER>", None),  # tags are case-sensitive
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        (" b ", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("(B)", "B"),
        ("(B", "B"),
        ("B. The red car", "B"),
        ("(B) The red car", "B"),
        ("B: red", "B"),
        ("B, red", "B"),
        ("Option B", "B"),
        ("option: b", "B"),
        ("Option (B)", "B"),
        ("Because it is red", None),  # letter followed by a letter
        ("A dog", None),  # letter followed by space + text is prose, not an option
        ("B text", None),
        ("I think B", None),  # letter not at the start
        ("BB", None),
        ("optional", None),
        ("", None),
        ("**B**", None),  # markdown not tolerated
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("B", "<answer>B</answer>", 1.0),
        ("B.", "<answer>B</answer>", 1.0),
        ("(B)", "<answer>B</answer>", 1.0),
        ("B. The red car", "<answer>B</answer>", 1.0),
        ("B)", "<answer>B</answer>", 1.0),
        (" b ", "<answer>B</answer>", 1.0),
        ("Option B", "<answer>B</answer>", 1.0),
        ("B", "<answer>(B) The red car</answer>", 1.0),  # solution parsed the same way
        ("B", "B", 1.0),  # solution without tags used whole
        ("B", "  B. red\n", 1.0),
        ("C", "<answer>B</answer>", 0.0),  # wrong letter
        ("Because", "<answer>B</answer>", 0.0),
        ("", "<answer>B</answer>", 0.0),  # empty answer
        ("B", "<answer>not a letter</answer>", 0.0),  # unparseable reference
        ("dog", "<answer>dog</answer>", 0.0),  # neither side is an option letter
    ],
)
def test_multiple_choice(answer, solution, expected):
    assert accuracy_reward(ans(answer), solution, "multiple choice") == expected


def test_multiple_choice_last_answer_wins():
    completion = "<think>maybe <answer>B</answer></think><answer>C</answer>"
    assert accuracy_reward(completion, "<answer>C</answer>", "multiple choice") == 1.0
    assert accuracy_reward(completion, "<answer>B</answer>", "multiple choice") == 0.0


# --------------------------------------------------------------------------- numerical


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.14", 3.14),
        ("  -2.5 ", -2.5),
        ("+7", 7.0),
        (".5", 0.5),
        ("3.", 3.0),
        ("1,000", 1000.0),
        ("1,000,000 people", 1_000_000.0),
        ("1,5", 1.0),  # not a thousands separator: first number is 1
        ("about 3.5 m, maybe 4", 3.5),  # first number, units ignored
        ("1e3", 1000.0),
        ("2 eggs", 2.0),
        ("1e999", None),  # overflows to inf -> rejected
        ("abc", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("3.14159", "<answer>3.14</answer>", 1.0),  # round(.,2) -> 3.14 == 3.14
        ("3.14", "<answer>3.15</answer>", 0.0),
        ("3.146", "<answer>3.15</answer>", 1.0),  # 3.146 rounds to 3.15
        ("3.144", "<answer>3.15</answer>", 0.0),  # 3.144 rounds to 3.14
        ("1,000", "<answer>1000</answer>", 1.0),
        ("1000 meters", "<answer>1,000</answer>", 1.0),
        ("-2.5", "<answer>-2.50</answer>", 1.0),
        ("2.5", "<answer>-2.5</answer>", 0.0),
        ("1e3", "<answer>1000</answer>", 1.0),
        ("seven", "<answer>7</answer>", 0.0),  # unparseable prediction
        ("7", "<answer>seven</answer>", 0.0),  # unparseable reference
        ("", "<answer>7</answer>", 0.0),  # empty answer
    ],
)
def test_numerical(answer, solution, expected):
    assert accuracy_reward(ans(answer), solution, "numerical") == expected


# --------------------------------------------------------------------------- OCR / WER


@pytest.mark.parametrize(
    ("ref", "hyp", "expected"),
    [
        ("the cat sat down", "the cat sat down", 0.0),
        ("the cat sat down", "the cat sat up", 0.25),  # 1 substitution / 4
        ("a b c d", "a c d", 0.25),  # 1 deletion / 4
        ("a b", "a x b", 0.5),  # 1 insertion / 2
        ("a b", "x y z w", 2.0),  # 2 subs + 2 ins = 4 / 2 -> WER > 1
        ("Hello world", "hello world", 0.5),  # case-sensitive
        ("a  b\n c", "a b c", 0.0),  # any whitespace separates words
        ("a b", "", 1.0),  # 2 deletions / 2
        ("", "", 0.0),  # empty reference, empty hypothesis
        ("", "x", 1.0),  # empty reference, non-empty hypothesis
    ],
)
def test_word_error_rate(ref, hyp, expected):
    assert word_error_rate(ref, hyp) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("the cat sat down", "<answer>the cat sat down</answer>", 1.0),
        ("the cat sat up", "<answer>the cat sat down</answer>", 0.75),  # 1 - 1/4
        ("x y z w", "<answer>a b</answer>", 0.0),  # 1 - 2 clipped to 0
        ("a c d", "<answer>a b c d</answer>", 0.75),
        ("", "<answer>a b</answer>", 0.0),  # empty answer
        ("", "<answer></answer>", 1.0),  # empty reference and empty answer
        ("x", "<answer></answer>", 0.0),
    ],
)
def test_ocr(answer, solution, expected):
    assert accuracy_reward(ans(answer), solution, "OCR") == pytest.approx(expected)


# --------------------------------------------------------------------------- free-form / ROUGE

# ref "the cat sat on the mat" (6 tokens), hyp "the cat on the mat" (5 tokens):
#   R1: overlap the:2 cat on mat = 5; P = 5/5, R = 5/6; F = 2*(5/6)/(11/6) = 10/11
#   R2: ref {the-cat, cat-sat, sat-on, on-the, the-mat}, hyp {the-cat, cat-on, on-the, the-mat}
#       overlap 3; P = 3/4, R = 3/5; F = 2*(9/20)/(27/20) = 2/3
#   RL: LCS "the cat on the mat" = 5; F = 10/11
#   free-form = (10/11 + 2/3 + 10/11) / 3 = (60/33 + 22/33) / 3 = 82/99
# ref "the the cat", hyp "the the the the" (clipping):
#   R1: overlap min(2, 4) = 2; P = 2/4, R = 2/3; F = 2*(1/3)/(7/6) = 4/7
#   R2: ref {the-the:1, the-cat:1}, hyp {the-the:3}; overlap 1; P = 1/3, R = 1/2; F = 2*(1/6)/(5/6) = 2/5
#   RL: LCS = 2; P = 2/4, R = 2/3; F = 4/7
# ref "a b c d", hyp "d c b a": R1 = 1; R2 = 0 (no shared bigram); RL: LCS = 1, P = R = 1/4, F = 1/4
CAT, CAT_HYP = "the cat sat on the mat", "the cat on the mat"


@pytest.mark.parametrize(
    ("ref", "hyp", "r1", "r2", "rl"),
    [
        (CAT, CAT_HYP, 10 / 11, 2 / 3, 10 / 11),
        ("the the cat", "the the the the", 4 / 7, 2 / 5, 4 / 7),
        ("a b c d", "d c b a", 1.0, 0.0, 1 / 4),
        ("Hello, World!", "hello world", 1.0, 1.0, 1.0),  # lower-cased, punctuation splits
        ("snake_case", "snake case", 1.0, 1.0, 1.0),  # "_" splits too
        ("cat", "cat", 1.0, 0.0, 1.0),  # one token: no bigrams -> R2 = 0
        ("cat", "dog", 0.0, 0.0, 0.0),
        ("", "cat", 0.0, 0.0, 0.0),
        ("cat", "", 0.0, 0.0, 0.0),
        ("", "", 0.0, 0.0, 0.0),
    ],
)
def test_rouge(ref, hyp, r1, r2, rl):
    assert rouge_f1(ref, hyp, 1) == pytest.approx(r1)
    assert rouge_f1(ref, hyp, 2) == pytest.approx(r2)
    assert rouge_l_f1(ref, hyp) == pytest.approx(rl)


def test_rouge_rejects_bad_order():
    with pytest.raises(ValueError):
        rouge_f1("a", "a", 0)


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        (CAT_HYP, f"<answer>{CAT}</answer>", 82 / 99),
        (CAT, f"<answer>{CAT}</answer>", 1.0),
        ("cat", "<answer>cat</answer>", 2 / 3),  # (1 + 0 + 1) / 3
        ("d c b a", "<answer>a b c d</answer>", (1 + 0 + 1 / 4) / 3),
        ("", f"<answer>{CAT}</answer>", 0.0),  # empty answer
        ("...", f"<answer>{CAT}</answer>", 0.0),  # no tokens
    ],
)
def test_free_form(answer, solution, expected):
    assert accuracy_reward(ans(answer), solution, "free-form") == pytest.approx(expected)


# --------------------------------------------------------------------------- regression


def test_mra_thresholds_are_exact():
    assert MRA_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@pytest.mark.parametrize(
    ("answer", "gt", "train", "eval_"),
    [
        # rel err 0.1 < 1-θ for θ = 0.50..0.85 (8 of 10); θ = 0.9 -> 0.1 not < 0.1; θ = 0.95 no
        ("9", "10", 0.9, 0.8),
        ("11", "10", 0.9, 0.8),
        ("10", "10", 1.0, 1.0),
        # rel err 0.15: passes θ = 0.50..0.80 (7); θ = 0.85 is the boundary (float 1-0.85 =
        # 0.15000000000000002 must not let 0.15 pass)
        ("8.5", "10", 0.85, 0.7),
        # rel err 0.05: passes θ = 0.50..0.90 (9); θ = 0.95 is the boundary
        ("9.5", "10", 0.95, 0.9),
        ("9.96", "10", 0.996, 1.0),  # rel err 0.004 < 0.05
        ("5", "10", 0.5, 0.0),  # rel err 0.5: 1-θ <= 0.5 never strictly greater
        ("25", "10", 0.0, 0.0),  # 1 - 1.5 clipped to 0
        ("-3", "-4", 0.75, 0.5),  # |gt| used; rel err 0.25 passes θ = 0.50..0.70 (5)
        ("0", "0", 1.0, 1.0),  # gt == 0: exact match only
        ("0.1", "0", 0.0, 0.0),
        ("1,000 m", "1000", 1.0, 1.0),
        ("many", "10", 0.0, 0.0),  # unparseable
        ("", "10", 0.0, 0.0),  # empty answer
    ],
)
def test_regression(answer, gt, train, eval_):
    solution = f"<answer>{gt}</answer>"
    assert accuracy_reward(ans(answer), solution, "regression") == pytest.approx(train)
    assert accuracy_reward(ans(answer), solution, "regression", mode="train") == pytest.approx(train)
    assert accuracy_reward(ans(answer), solution, "regression", mode="eval") == pytest.approx(eval_)


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [(9.0, 10.0, 0.8), (8.5, 10.0, 0.7), (9.5, 10.0, 0.9), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)],
)
def test_mean_relative_accuracy(pred, gt, expected):
    assert mean_relative_accuracy(pred, gt) == pytest.approx(expected)


# --------------------------------------------------------------------------- accuracy_reward: shared rules


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
@pytest.mark.parametrize(
    "completion",
    ["B", "<think>B</think>", "<answer>B", "", "answer: B"],
)
def test_no_answer_tag_scores_zero(problem_type, completion):
    assert accuracy_reward(completion, "<answer>B</answer>", problem_type) == 0.0


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_empty_answer_scores_zero(problem_type):
    assert accuracy_reward("<answer> </answer>", "<answer>1</answer>", problem_type) == 0.0


@pytest.mark.parametrize("problem_type", ["OCR", "free-form"])
def test_exact_tagless_solution(problem_type):
    assert accuracy_reward(ans("red car parked"), "  red car parked\n", problem_type) == 1.0


@pytest.mark.parametrize("bad_type", ["multiple_choice", "ocr", "", "yes/no"])
def test_unknown_problem_type(bad_type):
    with pytest.raises(ValueError, match="unknown problem_type") as err:
        accuracy_reward(ans("B"), "<answer>B</answer>", bad_type)
    assert repr(bad_type) in str(err.value)
    assert all(t in str(err.value) for t in PROBLEM_TYPES)


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_unknown_mode(problem_type):
    # raised even when the completion has no answer tag
    with pytest.raises(ValueError, match="unknown mode 'test'"):
        accuracy_reward("no tags", "<answer>B</answer>", problem_type, mode="test")


# --------------------------------------------------------------------------- format_reward


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>reasoning</think><answer>B</answer>", 1.0),
        ("<think>\nstep 1\nstep 2\n</think>\n\n<answer>\nB\n</answer>", 1.0),
        ("  \n<think>r</think> <answer>B</answer>\n ", 1.0),  # outer whitespace stripped
        ("<think></think><answer></answer>", 1.0),  # empty bodies allowed
        ("Sure! <think>r</think><answer>B</answer>", 0.0),  # text before
        ("<think>r</think><answer>B</answer> done", 0.0),  # text after
        ("<think>r</think> so <answer>B</answer>", 0.0),  # text between
        ("<think>r</think>", 0.0),  # think without answer
        ("<answer>B</answer>", 0.0),  # answer without think
        ("<answer>B</answer><think>r</think>", 0.0),  # wrong order
        ("<think>r</think><answer>A</answer><answer>B</answer>", 0.0),  # two answers
        ("<think>a</think><think>b</think><answer>B</answer>", 0.0),  # two thinks
        ("<think>a <think>b</think></think><answer>B</answer>", 0.0),  # nested think
        ("<think>r <answer>A</answer></think><answer>B</answer>", 0.0),  # answer inside think
        ("<think>r</think><answer><answer>B</answer></answer>", 0.0),  # nested answer
        ("<think>r</think><answer>B</think></answer>", 0.0),  # stray tag inside answer
        ("<think>r<answer>B</answer>", 0.0),  # think never closed
        ("<THINK>r</THINK><ANSWER>B</ANSWER>", 0.0),  # case-sensitive
        ("", 0.0),
        ("just text", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# --------------------------------------------------------------------------- length_reward


@pytest.mark.parametrize(
    ("completion", "accuracy", "min_len", "max_len", "kwargs", "expected"),
    [
        ("a b c d e", 1.0, 3, 10, {}, 0.2),
        ("a b c d e", 1.0, 5, 5, {}, 0.2),  # both bounds inclusive
        ("a b c d e", 1.0, 6, 10, {}, 0.0),  # too short
        ("a b c d e", 1.0, 1, 4, {}, 0.0),  # too long
        ("a b c d e", 0.9, 3, 10, {}, 0.0),  # not fully correct
        ("a b c d e", 0.0, 3, 10, {}, 0.0),
        ("a b c d e", 1.0, 3, 10, {"bonus": 0.5}, 0.5),
        ("a b c d e", 0.6, 3, 10, {"threshold": 0.5}, 0.2),
        ("a b c d e", 0.4, 3, 10, {"threshold": 0.5}, 0.0),
        ("a\n\nb\tc  d e", 1.0, 5, 5, {}, 0.2),  # any whitespace run separates words
        # "<think>one", "two", "three</think>", "<answer>B</answer>" -> 4 words (tags included)
        ("<think>one two three</think> <answer>B</answer>", 1.0, 4, 4, {}, 0.2),
        ("", 1.0, 0, 3, {}, 0.2),
        # Video-R1's rule counts completion tokens, not words
        ("a b c d e", 1.0, 320, 512, {"n_tokens": 400}, 0.2),
        ("a b c d e", 1.0, 320, 512, {"n_tokens": 513}, 0.0),
        ("a b c d e", 1.0, 3, 10, {"n_tokens": 319}, 0.0),
        ("a b c d e", 0.0, 320, 512, {"n_tokens": 400}, 0.0),
    ],
)
def test_length_reward(completion, accuracy, min_len, max_len, kwargs, expected):
    assert length_reward(completion, accuracy, min_len, max_len, **kwargs) == expected


def test_length_reward_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        length_reward("a", 1.0, 5, 4)
