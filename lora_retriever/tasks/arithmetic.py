"""Arithmetic generated in code: sum, difference and product of small numbers (the ``arithmetic`` cluster).

``"What is 47 + 38?"`` -> ``"85"``, ``"What is 47 - 38?"`` -> ``"9"``, ``"What is 47 * 6?"`` -> ``"282"``.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar

from lora_retriever.tasks.base import Task

__all__ = ["ArithmeticTask", "DifferenceTask", "OperationTask", "ProductTask"]


class OperationTask(Task):
    """``a <symbol> b`` -> the result in digits. Subjects are written ``"a <symbol> b"``; templates use the
    fields ``{a}`` and ``{b}``. A commutative operation's ``a op b`` and ``b op a`` are one fact (one subject
    key), so a test item never appears in training with its operands swapped."""

    cluster = "arithmetic"
    symbol: ClassVar[str]
    commutative: ClassVar[bool] = False

    def subject_key(self, subject: str) -> str:
        a, b = self._operands(subject)
        if self.commutative:
            a, b = min(a, b), max(a, b)
        return f"{a}{self.symbol}{b}"

    def render(self, template: str, subject: str) -> str:
        a, b = self._operands(subject)
        return template.format(a=a, b=b, subject=subject)

    def _operands(self, subject: str) -> tuple[int, int]:
        match = re.fullmatch(rf"(\d+) {re.escape(self.symbol)} (\d+)", subject.strip())
        if match is None:
            raise ValueError(f"{self.name} subject must look like 'a {self.symbol} b', got {subject!r}")
        return int(match.group(1)), int(match.group(2))


class ArithmeticTask(OperationTask):
    """``a + b`` for two-digit ``a`` and ``b``; each unordered pair is asked once, in an order drawn from the
    seeded rng."""

    name = "arithmetic"
    description = "Two-digit addition: add two numbers between 10 and 99 and answer with the sum."
    symbol = "+"
    commutative = True
    train_templates = (
        "What is {a} + {b}?",
        "Calculate {a} + {b}.",
        "Add {a} and {b}.",
        "What is the sum of {a} and {b}?",
        "Compute {a} + {b} =",
    )
    alt_templates = (
        "{a} plus {b} equals what number?",
        "If you have {a} apples and someone gives you {b} more, how many apples do you have?",
        "Find the total when {b} is added to {a}.",
    )
    low, high = 10, 99

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        items = []
        for a in range(self.low, self.high + 1):
            for b in range(a, self.high + 1):
                x, y = (a, b) if rng.random() < 0.5 else (b, a)
                items.append((f"{x} + {y}", str(x + y)))
        return items


class DifferenceTask(OperationTask):
    """``a - b`` for two-digit ``a > b``: the answer is a positive number (no sign to get wrong)."""

    name = "difference"
    description = (
        "Two-digit subtraction: subtract the smaller of two numbers between 10 and 99 from the larger."
    )
    symbol = "-"
    train_templates = (
        "What is {a} - {b}?",
        "Calculate {a} - {b}.",
        "Subtract {b} from {a}.",
        "What is the difference between {a} and {b}?",
        "Compute {a} - {b} =",
    )
    alt_templates = (
        "{a} minus {b} equals what number?",
        "If you have {a} apples and give {b} of them away, how many apples are left?",
        "How much remains when {b} is taken away from {a}?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(f"{a} - {b}", str(a - b)) for a in range(11, 100) for b in range(10, a)]


class ProductTask(OperationTask):
    """``a * b`` for a two-digit ``a`` and a one-digit ``b`` from 2 to 9."""

    name = "product"
    description = "Multiplication: multiply a number between 10 and 99 by a single digit from 2 to 9."
    symbol = "*"
    train_templates = (
        "What is {a} * {b}?",
        "Calculate {a} * {b}.",
        "Multiply {a} by {b}.",
        "What is the product of {a} and {b}?",
        "Compute {a} * {b} =",
    )
    alt_templates = (
        "{a} times {b} equals what number?",
        "If each of {b} boxes holds {a} apples, how many apples are there in all?",
        "Find the result when {a} is multiplied by {b}.",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(f"{a} * {b}", str(a * b)) for a in range(10, 100) for b in range(2, 10)]
