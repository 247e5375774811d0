"""Logit distillation compares two distributions token id by token id, so it is meaningful only when
teacher and student share one vocabulary: the same string must have the same id in both."""
from __future__ import annotations

from ..errors import SlimlmError

_EXAMPLES = 5  # differing tokens quoted in the error; enough to recognise the cause


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Raise SlimlmError unless both tokenizers map exactly the same tokens to the same ids.

    Compares `get_vocab()` (which includes added and special tokens), not just sizes: two
    vocabularies of equal size with two ids swapped would silently distil the wrong targets.
    """
    teacher, student = teacher_tok.get_vocab(), student_tok.get_vocab()
    if teacher == student:
        return
    only_teacher = sorted(set(teacher) - set(student), key=teacher.get)
    only_student = sorted(set(student) - set(teacher), key=student.get)
    moved = sorted((t for t in set(teacher) & set(student) if teacher[t] != student[t]), key=teacher.get)
    found = []
    if only_teacher:
        found.append(f"{len(only_teacher)} only in the teacher's (e.g. {_quote(only_teacher)})")
    if only_student:
        found.append(f"{len(only_student)} only in the student's (e.g. {_quote(only_student)})")
    if moved:
        found.append(f"{len(moved)} with different ids (e.g. " + ", ".join(
            f"{t!r}: {teacher[t]} vs {student[t]}" for t in moved[:_EXAMPLES]) + ")")
    raise SlimlmError(
        f"the teacher and student tokenizers differ: {len(teacher)} vs {len(student)} tokens; "
        + "; ".join(found) + ".",
        "Logit distillation needs one shared vocabulary: choose a student from the teacher's model "
        "family (or built from the teacher, e.g. by pruning), or load both with the teacher's tokenizer.")


def _quote(tokens: list[str]) -> str:
    return ", ".join(repr(t) for t in tokens[:_EXAMPLES])
