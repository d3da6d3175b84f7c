"""Next-action answers in the seed's style (``TAP(3)``) and the rule that scores them, :func:`action_match`.

The rule: an answer is an action when, after the project's exact-match normalisation
(:func:`lora_retriever.metrics.normalize_answer`: first line, no ``Answer:`` label, no wrapping quotes or
closing period, case-folded), the whole of it is one ``NAME(arg, ...)`` with integer arguments. Two actions
match when their names are equal and their arguments are equal as integers; spaces inside the action don't
count (``"tap( 3 )"`` == ``"TAP(3)"``). Anything else in the answer (``"I would TAP(3)"``, ``"TAP(3) then
TAP(4)"``) is not an action, and a non-action never matches an action: the match is exact on the action.
"""

from __future__ import annotations

import re

from lora_retriever.metrics import exact_match, normalize_answer

__all__ = ["TAP", "action_match", "format_action", "normalize_action", "parse_action"]

TAP = "TAP"
_ACTION = re.compile(r"([a-z_]+)\((-?\d+(?:,-?\d+)*)\)")


def format_action(name: str, *args: int) -> str:
    """The canonical text of an action: ``format_action("TAP", 3) -> "TAP(3)"``.

    Raises:
        ValueError: a name that is not letters/underscores, or a non-integer argument.
    """
    if not re.fullmatch(r"[A-Za-z_]+", name):
        raise ValueError(f"action name must be letters or underscores, got {name!r}")
    bad = [a for a in args if not isinstance(a, int) or isinstance(a, bool)]
    if bad:
        raise ValueError(f"action arguments must be ints, got {bad[0]!r} in {name}{args}")
    return f"{name.upper()}({','.join(str(a) for a in args)})"


def parse_action(text: str) -> tuple[str, tuple[int, ...]] | None:
    """``(NAME, (args...))`` when the normalised ``text`` is exactly one action, else ``None``."""
    match = _ACTION.fullmatch("".join(normalize_answer(text).split()))
    if match is None:
        return None
    return match.group(1).upper(), tuple(int(a) for a in match.group(2).split(","))


def normalize_action(text: str) -> str:
    """The comparison form for action tasks: an action's canonical text (``"TAP(3)"``), or for anything that
    is not one action, the project's :func:`normalize_answer` form (which never equals an action's)."""
    action = parse_action(text)
    return normalize_answer(text) if action is None else format_action(action[0], *action[1])


def action_match(prediction: str, reference: str) -> float:
    """1.0 when ``prediction`` is the same action as ``reference`` (see the module docstring for the rule).

    Raises:
        ValueError: ``reference`` is not an action (score a non-action task with ``exact_match``).
    """
    if parse_action(reference) is None:
        raise ValueError(f"reference {reference!r} is not an action such as 'TAP(3)'; use exact_match for it")
    return exact_match(prediction, reference, normalize=normalize_action)
