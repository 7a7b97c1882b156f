"""Rule-based rewards shared by RL training (GRPO) and evaluation.

Everything here is a pure function of strings, so the same scoring is used when
training a policy and when reporting benchmark numbers. Answers are read from the
LAST ``<answer>...</answer>`` span of a completion; solutions are stored in the same
form (a bare solution string without tags is also accepted).

Edge-case rules (kept here so the README can quote them):

* ``extract_answer``: last ``<answer>X</answer>`` whose body contains no further
  ``<answer>`` opening tag; body stripped. Tags are case-sensitive.
* A completion with no ``<answer>`` span scores 0.0 for every problem type.
* An empty answer scores 0.0 against any non-empty reference (it falls out of each
  type's rule); the only exception is OCR with an empty reference (see below).
* A reference that cannot be parsed (bad dataset row) scores 0.0 rather than raising,
  so that one bad sample cannot crash a training run.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
MODES = ("train", "eval")

# Thresholds of the mean-relative-accuracy metric (VSI-Bench style): 0.50, 0.55, ..., 0.95.
# Built with round() so they are the exact decimal literals, not accumulated float sums.
MRA_THRESHOLDS = tuple(round(0.50 + 0.05 * i, 2) for i in range(10))
# A relative error within this distance of a threshold counts as ON the boundary (a miss,
# since the test is strict "<"): 1 - 0.85 == 0.15000000000000002 must not let 0.15 pass.
_MRA_TOL = 1e-9

_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# Body of a think/answer block for format checking: no tag of either kind inside.
_NO_TAGS = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT_RE = re.compile(rf"<think>{_NO_TAGS}</think>\s*<answer>{_NO_TAGS}</answer>", re.DOTALL)
# Option letter at the start: optional "option"/"option:" prefix, optional "(", one letter,
# then end of string or one of ) . : ,   -> "B", "b", "(B)", "B.", "B)", "B. text", "Option B".
_CHOICE_RE = re.compile(r"(?:option\s*:?\s*)?\(?([a-z])(?:[).:,]|$)", re.IGNORECASE)
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_TOKEN_RE = re.compile(r"[^\W_]+")


# --------------------------------------------------------------------------- parsing


def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` span (stripped), or None if there is none.

    The body may not contain another ``<answer>`` opening tag, so for nested tags the
    innermost closed span wins: ``<answer><answer>B</answer></answer>`` -> ``"B"``, and an
    unclosed earlier tag (``<answer>A <answer>B</answer>``) is ignored -> ``"B"``.
    ``<answer> </answer>`` -> ``""`` (which scores 0 against a non-empty reference).
    """
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _solution_text(solution: str) -> str:
    """Reference answer: extracted like a completion; a tag-less solution is used whole."""
    answer = extract_answer(solution)
    return solution.strip() if answer is None else answer


def parse_choice(text: str) -> str | None:
    """Upper-case option letter at the start of ``text``, or None.

    Strict-but-tolerant: accepts ``B``, ``b``, ``B.``, ``B)``, ``(B)``, ``B: ...``,
    ``B. text``, ``Option B``; rejects anything where the letter is followed by another
    letter/space-then-text (``Because``, ``A dog``, ``B text``) or is not at the start
    (``I think B``), so prose is never mistaken for an option.
    """
    m = _CHOICE_RE.match(text.strip())
    return m.group(1).upper() if m else None


def parse_number(text: str) -> float | None:
    """First number in ``text`` as a finite float, or None.

    Thousands separators are removed only in the ``1,000`` / ``1,000,000`` pattern (comma
    followed by exactly three digits), so ``1,5`` reads as 1, not 15. Units and other
    trailing text are ignored (``3.5 m`` -> 3.5). Scientific notation is accepted.
    """
    m = _NUMBER_RE.search(_THOUSANDS_COMMA_RE.sub("", text))
    if m is None:
        return None
    value = float(m.group())
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- metrics


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (unit substitution/insertion/deletion)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def word_error_rate(ref: str, hyp: str) -> float:
    """Word-level edit distance / number of reference words (whitespace tokens, case-sensitive).

    Case and punctuation are kept because OCR is scored as an exact transcription. Can
    exceed 1 when the hypothesis is longer than the reference. Empty reference: 0.0 if the
    hypothesis is empty too, else 1.0 (so the OCR score is 1 or 0).
    """
    ref_words, hyp_words = ref.split(), hyp.split()
    if not ref_words:
        return 0.0 if not hyp_words else 1.0
    return _edit_distance(ref_words, hyp_words) / len(ref_words)


def _rouge_tokens(text: str) -> list[str]:
    """Lower-case alphanumeric runs (Unicode-aware; ``_`` and punctuation split)."""
    return _TOKEN_RE.findall(text.lower())


def _f1(overlap: int, n_ref: int, n_hyp: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_hyp, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_f1(ref: str, hyp: str, n: int) -> float:
    """ROUGE-N F1 with clipped n-gram counts; 0.0 if either side has no n-grams."""
    if n < 1:
        raise ValueError(f"ROUGE order must be >= 1, got {n}")
    ref_t, hyp_t = _rouge_tokens(ref), _rouge_tokens(hyp)
    ref_ng = Counter(tuple(ref_t[i : i + n]) for i in range(len(ref_t) - n + 1))
    hyp_ng = Counter(tuple(hyp_t[i : i + n]) for i in range(len(hyp_t) - n + 1))
    overlap = sum((ref_ng & hyp_ng).values())
    return _f1(overlap, sum(ref_ng.values()), sum(hyp_ng.values()))


def rouge_l_f1(ref: str, hyp: str) -> float:
    """ROUGE-L F1: longest common subsequence of tokens; 0.0 if either side is empty."""
    ref_t, hyp_t = _rouge_tokens(ref), _rouge_tokens(hyp)
    prev = [0] * (len(hyp_t) + 1)
    for r in ref_t:
        cur = [0]
        for j, h in enumerate(hyp_t, 1):
            cur.append(prev[j - 1] + 1 if r == h else max(prev[j], cur[j - 1]))
        prev = cur
    return _f1(prev[-1], len(ref_t), len(hyp_t))


def mean_relative_accuracy(pred: float, gt: float) -> float:
    """Fraction of thresholds θ in 0.50..0.95 with relative error < 1 - θ.

    gt == 0 has no relative error: 1.0 if pred == 0 else 0.0. Errors within 1e-9 of a
    boundary count as on it (strict ``<`` fails), which makes the result independent of
    float noise such as ``1 - 0.9 == 0.09999999999999998``.
    """
    if gt == 0:
        return 1.0 if pred == 0 else 0.0
    rel = abs(pred - gt) / abs(gt)
    return sum(rel < (1 - t) - _MRA_TOL for t in MRA_THRESHOLDS) / len(MRA_THRESHOLDS)


# --------------------------------------------------------------------------- rewards


def _regression_score(pred: float, gt: float, mode: str) -> float:
    if mode == "eval":
        return mean_relative_accuracy(pred, gt)
    if gt == 0:
        return 1.0 if pred == 0 else 0.0
    return min(1.0, max(0.0, 1 - abs(pred - gt) / abs(gt)))


def accuracy_reward(completion: str, solution: str, problem_type: str, mode: str = "train") -> float:
    """Correctness of the completion's last answer against the solution, in [0, 1].

    * ``multiple choice``: same option letter (see ``parse_choice``).
    * ``numerical``: first numbers equal after ``round(x, 2)``.
    * ``OCR``: ``1 - WER`` clipped to [0, 1].
    * ``free-form``: mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (a one-word answer thus
      scores at most 2/3, because it has no bigrams).
    * ``regression``: train -> ``1 - |pred-gt|/|gt|`` clipped; eval -> mean relative accuracy.

    ``mode`` only changes regression, but is validated for every type so a typo fails fast.
    Arguments are validated before the completion is looked at.
    """
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}; known: {', '.join(PROBLEM_TYPES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    reference = _solution_text(solution)

    if problem_type == "multiple choice":
        letter = parse_choice(answer)
        return float(letter is not None and letter == parse_choice(reference))
    if problem_type == "OCR":
        return min(1.0, max(0.0, 1 - word_error_rate(reference, answer)))
    if problem_type == "free-form":
        scores = (
            rouge_f1(reference, answer, 1),
            rouge_f1(reference, answer, 2),
            rouge_l_f1(reference, answer),
        )
        return sum(scores) / len(scores)

    pred, gt = parse_number(answer), parse_number(reference)
    if pred is None or gt is None:
        return 0.0
    if problem_type == "numerical":
        return float(round(pred, 2) == round(gt, 2))
    return _regression_score(pred, gt, mode)


def format_reward(completion: str) -> float:
    """1.0 iff the stripped completion is exactly ``<think>...</think>`` + whitespace +
    ``<answer>...</answer>``, else 0.0.

    Bodies may be empty or multi-line but may not contain any think/answer tag, and no
    text may appear before, between (other than whitespace) or after the two blocks.
    """
    return float(_FORMAT_RE.fullmatch(completion.strip()) is not None)


def length_reward(
    completion: str,
    accuracy: float,
    min_len: int,
    max_len: int,
    bonus: float = 0.2,
    threshold: float = 1.0,
    n_tokens: int | None = None,
) -> float:
    """``bonus`` if ``accuracy >= threshold`` and the completion's length is in [min_len, max_len].

    Length = ``n_tokens`` when given (Video-R1's rule: 320..512 completion tokens), otherwise the
    number of whitespace-separated words of the whole completion (tags included), which needs no
    tokenizer and so is identical in training and evaluation. Only correct
    answers are rewarded so the bonus cannot be farmed by padding wrong answers; the
    default threshold 1.0 means fully correct (lower it for graded types like free-form).
    """
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) > max_len ({max_len})")
    length = len(completion.split()) if n_tokens is None else n_tokens
    return bonus if accuracy >= threshold and min_len <= length <= max_len else 0.0
