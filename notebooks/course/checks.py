"""One check per exercise. A check prints "correct: ..." for a right answer and raises
`ExerciseError` with an explanation of what is wrong otherwise (so a wrong answer stops the cell,
and `tests/test_exercises.py` can show that every check rejects at least one wrong answer).

Names: check_ex_NN_K, exercise K of notebook NN.
"""

from __future__ import annotations


class ExerciseError(AssertionError):
    """A wrong answer; the message says what is wrong and where to look."""


def _correct(message: str) -> bool:
    print(f"correct: {message}")
    return True


def _wrong(message: str):
    raise ExerciseError(message)
