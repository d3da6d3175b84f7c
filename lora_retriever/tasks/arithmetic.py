"""Two-digit addition, generated in code: ``"What is 47 + 38?"`` -> ``"85"``."""

from __future__ import annotations

import random
import re

from lora_retriever.tasks.base import Task

__all__ = ["ArithmeticTask"]

_SUM = re.compile(r"^(\d+) \+ (\d+)$")


class ArithmeticTask(Task):
    """``a + b`` for two-digit ``a`` and ``b``; the answer is the sum in digits.

    ``a + b`` and ``b + a`` are the same fact (one subject key), so a test sum never appears in training
    with its operands swapped. Each unordered pair is asked once, in an order drawn from the seeded rng.
    """

    name = "arithmetic"
    description = "Two-digit addition: add two numbers between 10 and 99 and answer with the sum."
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

    def subject_key(self, subject: str) -> str:
        a, b = self._operands(subject)
        return f"{min(a, b)}+{max(a, b)}"

    def render(self, template: str, subject: str) -> str:
        a, b = self._operands(subject)
        return template.format(a=a, b=b, subject=subject)

    @staticmethod
    def _operands(subject: str) -> tuple[int, int]:
        match = _SUM.match(subject.strip())
        if match is None:
            raise ValueError(f"arithmetic subject must look like 'a + b', got {subject!r}")
        return int(match.group(1)), int(match.group(2))
