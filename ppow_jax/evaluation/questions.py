"""Question files in the MT-bench / Spec-Bench JSONL format: {"question_id", "category", "turns": [...]}."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from ppow_jax.errors import InputError

# The four question sets under `<data root>/eval/`, in the order the benchmarks tabulate them.
EVAL_SETS = ("mt_bench", "humaneval", "gsm8k", "alpaca")


def eval_set_path(data_root: str | pathlib.Path, name: str) -> pathlib.Path:
    """The question file of eval set `name` under a data root."""
    return pathlib.Path(data_root) / "eval" / name / "question.jsonl"


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: str
    category: str  # "<set>/<category>", the set being the file's folder (or stem)
    turns: tuple[str, ...]


def set_name(path: pathlib.Path) -> str:
    return path.parent.name if path.stem == "question" else path.stem


def load_questions(path: str | pathlib.Path, limit: int = 0) -> list[Question]:
    """Reads one question file; a malformed record is an error naming the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"question file {path} does not exist")
    name = set_name(path)
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object")
            turns = record.get("turns")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise InputError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
            if "question_id" not in record:
                raise InputError(f"{where}: missing 'question_id'")
            category = str(record.get("category") or "").strip()
            questions.append(Question(question_id=str(record["question_id"]),
                                      category=f"{name}/{category}" if category else name, turns=tuple(turns)))
            if limit and len(questions) >= limit:
                break
    if not questions:
        raise InputError(f"question file {path} holds no questions")
    return questions
