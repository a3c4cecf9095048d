"""Answer extraction and checking for math reasoning chains, with math-verify.

A chain's final answer is the content of its last complete `\\boxed{...}` (or `\\fbox{...}`).
A chain without one has no answer and is graded wrong: we do not guess from free text,
so a model is only credited when it states its answer the way the prompt asks.
Equivalence is math-verify's: 0.5 = \\frac{1}{2}, 18 = 18.0 = \\$18, 1,000 = 1000, x=5 = 5.

math-verify times out with SIGALRM, which only works in the main thread; in worker threads
(Ray actors, thread pools) we call it without a timeout instead.
"""

from __future__ import annotations

import logging
import re
import threading


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)|\s+([^\s{$]+))")
_TIMEOUT_S = 5


def extract_boxed(text: str) -> str | None:
    """Content of the last complete top-level \\boxed{...} or \\fbox{...}, stripped.

    Braces nest (\\boxed{\\frac{1}{2}} -> "\\frac{1}{2}"); a box whose braces never close
    (a truncated chain) is skipped. The brace-less form "\\boxed 5" gives "5".

    Returns:
        The content, or None when the text has no complete box.
    """
    last, pos = None, 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        if m.group(1) is None:  # "\boxed 5": one token
            last, pos = m.group(2), m.end()
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            last, pos = text[m.end() : i - 1].strip(), i
        else:
            pos = m.end()
    return last


def extract_answer(text: str) -> str | None:
    """The chain's final answer: the last boxed content; None when nothing is boxed."""
    return extract_boxed(text)


def is_correct(text: str, reference: str) -> bool:
    """Whether the chain's boxed answer equals the reference under math-verify.

    Args:
        text: the whole chain (or just its final step).
        reference: the gold answer, a number ("18", "1,000") or LaTeX ("\\frac{1}{2}").
    Returns:
        True when equivalent; False when wrong, unboxed, unparsable or on any error
        (never raises).
    """
    try:
        answer = extract_answer(text)
        if answer is None or not str(reference).strip():
            return False
        reference = str(reference).strip()
        if _norm(answer) == _norm(reference):
            return True
        timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        from math_verify import parse, verify  # deferred: answer extraction works without it

        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # math_verify's TimeoutException is a BaseException
        return False


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s)


# math-verify logs a warning when its timeout is disabled (our worker-thread path).
logging.getLogger("math_verify").setLevel(logging.ERROR)
