"""Training prompts: one reader per format in the data root's `train/` folder.

Every reader yields `Prompt`s holding chat messages (the user turn only) and, where the record has
one, its reference answer. Drafters are trained on the target's own responses by default; the
reference answers are an option that costs no generation (`data.responses="reference"`, see
`ppow_jax.data.distill`). A malformed record is skipped and counted; a file that cannot be read at
all is an error naming it.

Contamination rule (data README): a training prompt whose text equals an eval prompt after
whitespace normalisation is removed, and the count is reported.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
from typing import Callable, Iterable, Iterator, Optional

from ppow_jax.errors import InputError
from ppow_jax.evaluation.questions import load_questions

# Plain-text records become a "continue this text" request over their first words.
PLAIN_TEXT_PREFIX_WORDS = 96


@dataclasses.dataclass(frozen=True)
class Prompt:
    key: str  # "<source>/<record id>", unique across the training set
    source: str  # what it was read from: a `train/` folder name, or "tfds:<name>"
    messages: tuple[dict, ...]  # chat messages, ending with the user turn
    instruction: str = ""  # the bare instruction when the prompt adds an input to it (Alpaca)
    reference: str = ""  # the record's own answer (Alpaca output, GSM8K answer, the rest of a text); "" if none

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)

    def contamination_keys(self) -> set[str]:
        """Texts compared with eval prompts: the whole prompt and, if any, the bare instruction."""
        return {normalise(self.text)} | ({normalise(self.instruction)} if self.instruction else set())


@dataclasses.dataclass
class ReadReport:
    """What reading produced: prompts per source, skipped malformed records, removed duplicates."""

    kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    malformed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    contaminated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    duplicates: int = 0

    def summary(self) -> str:
        parts = [f"{sum(self.kept.values())} prompts kept ({', '.join(f'{k}: {v}' for k, v in sorted(self.kept.items()))})"]
        parts.append(f"{sum(self.contaminated.values())} removed as equal to an eval prompt "
                     f"({', '.join(f'{k}: {v}' for k, v in sorted(self.contaminated.items())) or 'none'})")
        parts.append(f"{sum(self.malformed.values())} malformed records skipped "
                     f"({', '.join(f'{k}: {v}' for k, v in sorted(self.malformed.items())) or 'none'})")
        parts.append(f"{self.duplicates} duplicate prompts dropped")
        return "; ".join(parts)


def normalise(text: str) -> str:
    """Whitespace normalisation used by the contamination check."""
    return " ".join(text.split())


def _user(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)


def _load_json_array(path: pathlib.Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read a JSON array ({err})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records")
    return data


def _jsonl_records(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            report.malformed[source] += 1
            continue
        if isinstance(record, dict):
            yield number, record
        else:
            report.malformed[source] += 1


def _nonempty_str(value) -> Optional[str]:
    return value if isinstance(value, str) and value.strip() else None


def read_sharegpt(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[Prompt]:
    """[{"id", "conversations": [{"from": "human", "value"}, ...]}]: the first human turn."""
    for index, record in enumerate(_load_json_array(path)):
        turns = record.get("conversations") if isinstance(record, dict) else None
        first = next((t for t in turns if isinstance(t, dict) and t.get("from") == "human"), None) \
            if isinstance(turns, list) else None
        text = _nonempty_str(first.get("value")) if first else None
        if text is None:
            report.malformed[source] += 1
            continue
        yield Prompt(source=source, key=f"{source}/{record.get('id', index)}", messages=_user(text))


def _instruction_with_input(instruction: str, extra: object) -> str:
    extra = extra.strip() if isinstance(extra, str) else ""
    return f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()


def read_alpaca(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[Prompt]:
    """[{"instruction", "input", "output"}]: instruction plus input; the output is the reference."""
    for index, record in enumerate(_load_json_array(path)):
        instruction = _nonempty_str(record.get("instruction")) if isinstance(record, dict) else None
        if instruction is None:
            report.malformed[source] += 1
            continue
        yield Prompt(source=source, key=f"{source}/{index}",
                     messages=_user(_instruction_with_input(instruction, record.get("input"))), instruction=instruction,
                     reference=_answer(record.get("output")))


def read_alpaca_seed_tasks(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[Prompt]:
    """JSONL {"id", "instruction", "instances": [{"input", "output"}]}: one prompt per instance, its output the
    reference."""
    for number, record in _jsonl_records(path, report, source):
        instruction = _nonempty_str(record.get("instruction"))
        instances = record.get("instances")
        if instruction is None or not isinstance(instances, list) or not instances:
            report.malformed[source] += 1
            continue
        for i, instance in enumerate(instances):
            extra, output = (instance.get("input"), instance.get("output")) if isinstance(instance, dict) else (None, None)
            yield Prompt(source=source, key=f"{source}/{record.get('id', number)}/{i}",
                         messages=_user(_instruction_with_input(instruction, extra)), instruction=instruction,
                         reference=_answer(output))


def _answer(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _one_field_prompts(path: pathlib.Path, report: ReadReport, source: str, field: str,
                       to_prompt: Callable[[str, dict], tuple[tuple[dict, ...], str]]) -> Iterator[Prompt]:
    """JSONL records whose one wanted field is a non-empty string, turned into a conversation and a
    reference by `to_prompt(value, record)`."""
    for number, record in _jsonl_records(path, report, source):
        value = _nonempty_str(record.get(field))
        if value is None:
            report.malformed[source] += 1
            continue
        messages, reference = to_prompt(value, record)
        yield Prompt(source=source, key=f"{source}/{number}", messages=messages, reference=reference)


# GSM8K's calculator annotations ("48/2 = <<48/2=24>>24"): tool calls, not text a model writes.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def _question_and_answer(question: str, record: dict) -> tuple[tuple[dict, ...], str]:
    return _user(question), _CALCULATOR_ANNOTATION.sub("", _answer(record.get("answer")))


def read_gsm8k(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[Prompt]:
    """JSONL {"question", "answer"}: the question; the answer, without calculator annotations, is the
    reference."""
    return _one_field_prompts(path, report, source, "question", _question_and_answer)


def _continue_text(text: str, _record: Optional[dict] = None) -> tuple[tuple[dict, ...], str]:
    """A request to continue the text's opening words; the rest of the text, as written, is the reference."""
    words = list(re.finditer(r"\S+", text))
    rest = text[words[PLAIN_TEXT_PREFIX_WORDS].start():].rstrip() if len(words) > PLAIN_TEXT_PREFIX_WORDS else ""
    return (_user("Continue the following text.\n\n" + " ".join(w.group() for w in words[:PLAIN_TEXT_PREFIX_WORDS])),
            rest)


def read_text_jsonl(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[Prompt]:
    """JSONL {"text"} web prose: a request to continue its opening words."""
    return _one_field_prompts(path, report, source, "text", _continue_text)


def read_text_lines(path: pathlib.Path, report: ReadReport, source: str) -> Iterator[Prompt]:
    """One document per line: a request to continue its opening words."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            messages, reference = _continue_text(line)
            yield Prompt(source=source, key=f"{source}/{number}", messages=messages, reference=reference)


Reader = Callable[[pathlib.Path, ReadReport, str], Iterator[Prompt]]

# file name -> reader, for the files of `train/` (data README); other files are named explicitly.
KNOWN_FILES: dict[str, Reader] = {
    "ShareGPT_V3_filtered_500.json": read_sharegpt,
    "sg_90k_part1_html_cleaned_lang_first_sampled_sorted.json": read_sharegpt,
    "alpaca_data_cleaned_1000.json": read_alpaca,
    "alpaca_en_demo.json": read_alpaca,
    "seed_tasks.jsonl": read_alpaca_seed_tasks,
    "train.jsonl": read_gsm8k,
    "c4_demo.jsonl": read_text_jsonl,
    "wiki_demo.txt": read_text_lines,
}

READERS: dict[str, Reader] = {
    "sharegpt": read_sharegpt, "alpaca": read_alpaca, "alpaca_seed_tasks": read_alpaca_seed_tasks,
    "gsm8k": read_gsm8k, "text_jsonl": read_text_jsonl, "text_lines": read_text_lines,
}


def training_files(data_root: pathlib.Path, folders: Iterable[str]) -> list[tuple[pathlib.Path, Reader]]:
    """The readable files of the chosen `train/` folders, each with its reader."""
    found = []
    for folder in folders:
        directory = data_root / "train" / folder
        if not directory.is_dir():
            raise InputError(f"training data folder {directory} does not exist (data root: {data_root})")
        files = [(p, KNOWN_FILES[p.name]) for p in sorted(directory.iterdir()) if p.name in KNOWN_FILES]
        if not files:
            raise InputError(f"{directory} holds no file of a known training format ({', '.join(KNOWN_FILES)})")
        found.extend(files)
    return found


def eval_prompt_texts(data_root: pathlib.Path) -> set[str]:
    """Every turn of every question file under `eval/`, whitespace-normalised."""
    texts = set()
    for path in sorted((data_root / "eval").glob("*/*.jsonl")):
        for question in load_questions(path):
            texts.update(normalise(turn) for turn in question.turns)
    return texts


def read_training_prompts(data_root: str | pathlib.Path, folders: Iterable[str],
                          tfds_source: Optional[dict] = None) -> tuple[list[Prompt], ReadReport]:
    """All training prompts of `folders` (and of a prepared TFDS dataset, when `tfds_source` names
    one: keyword arguments of `read_tfds_prompts`), without eval prompts and without duplicates."""
    data_root = pathlib.Path(data_root)
    forbidden = eval_prompt_texts(data_root)
    if not forbidden:
        raise InputError(f"no eval question files under {data_root / 'eval'}: the contamination check needs them")
    report, prompts, seen = ReadReport(), [], set()
    streams = [(path.parent.name, reader(path, report, path.parent.name))
               for path, reader in training_files(data_root, folders)]
    if tfds_source and tfds_source.get("name"):
        streams.append((f"tfds:{tfds_source['name']}", read_tfds_prompts(**tfds_source, report=report)))
    for source, stream in streams:
        for prompt in stream:
            text = normalise(prompt.text)
            if prompt.contamination_keys() & forbidden:
                report.contaminated[source] += 1
            elif text in seen:
                report.duplicates += 1
            else:
                seen.add(text)
                report.kept[source] += 1
                prompts.append(prompt)
    return prompts, report



def read_tfds_prompts(name: str, *, split: str = "train", field: str = "text", data_dir: str | None = None,
                      data_source=None, report: ReadReport | None = None) -> Iterator[Prompt]:
    """Prompts from a dataset the user already prepared with TFDS (`tfds.data_source`, no TensorFlow).

    Each record's `field` (str or bytes) is the user turn. `data_source` replaces the TFDS lookup
    (any random-access sequence of dicts).
    """
    report = report if report is not None else ReadReport()
    if data_source is None:
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise InputError("a TFDS source needs tensorflow-datasets: pip install -e '.[tfds]'") from None
        try:
            data_source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as err:  # tfds raises DatasetNotFoundError, ValueError, ... for unprepared data
            raise InputError(f"TFDS dataset {name!r} split {split!r} cannot be opened ({err})") from None
    source = f"tfds:{name}"
    for index in range(len(data_source)):
        record = data_source[index]
        value = record.get(field) if isinstance(record, dict) else None
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        text = _nonempty_str(value)
        if text is None:
            report.malformed[source] += 1
            continue
        yield Prompt(source=source, key=f"{source}/{split}/{index}", messages=_user(text))
