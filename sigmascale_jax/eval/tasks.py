"""Zero-shot multiple-choice tasks, defined the way lm-evaluation-harness (v0.4) defines them.

Each task reads its local file(s) under the data directory into documents in the
schema of the Hugging Face dataset the harness loads, then turns a document into
a `MultipleChoice`: one (context, continuation) request per choice, the gold index,
and the choice strings that `acc_norm` divides by. Harness conventions kept here:

- the context carries no trailing delimiter; each continuation is `" " + choice`
  (the harness's `target_delimiter`);
- WinoGrande is "multiple input": one context per option (the sentence up to the
  blank with the option filled in) and one shared continuation (the rest of the
  sentence), so only the part after the blank is scored ("partial scoring");
- HellaSwag's contexts and endings go through its `preprocess` (WikiHow bracket
  artifacts removed, `ctx_b` capitalized with `str.capitalize`);
- ARC and OpenBookQA answer with the choice text; the gold index is the answer
  key's position among the choice labels (OpenBookQA's key is left-stripped);
- MathQA's choices are parsed out of its `options` string with the harness's regex;
  a gold index the parse did not produce can never be matched (the harness's -100).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.data import data_file
from sigmascale_jax.io.fileio import read_json, read_text

TARGET_DELIMITER = " "
NO_GOLD = -100  # the harness's marker for a gold index outside the parsed choices


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """One document as requests: choice i is `contexts[i] + continuations[i]`, its ll summed over the continuation."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choices: tuple[str, ...]  # the harness's doc_to_choice; acc_norm divides by len(choice)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    files: tuple[str, ...]  # relative to the data directory
    metrics: tuple[str, ...]  # "acc" and, where the harness reports it, "acc_norm"
    load: Callable[[Path], list[dict]]  # data dir -> documents (HF schema)
    build: Callable[[dict], MultipleChoice]


# ------------------------------------------------------------------ file reading


def _json_lines(path: Path) -> list[dict]:
    docs = []
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"malformed line {i + 1} in {path}: not JSON") from None
        if not isinstance(doc, dict):
            raise UserError(f"malformed line {i + 1} in {path}: expected a JSON object")
        docs.append(doc)
    if not docs:
        raise UserError(f"{path} holds no documents")
    return docs


def _labels(path: Path, count: int) -> list[str]:
    labels = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if len(labels) != count:
        raise UserError(f"{path} has {len(labels)} labels for {count} documents")
    return labels


def _labelled(data_dir: Path, docs_rel: str, labels_rel: str) -> tuple[Path, list[tuple[dict, str]]]:
    """The documents of a JSON-lines file paired with the lines of its labels file."""
    path = data_file(data_dir, docs_rel)
    docs = _json_lines(path)
    return path, list(zip(docs, _labels(data_file(data_dir, labels_rel), len(docs))))


def _fields(path: Path, i: int, doc: dict, *names: str) -> list[Any]:
    try:
        return [doc[n] for n in names]
    except (KeyError, TypeError):
        raise UserError(f"malformed document {i + 1} in {path}: expected fields {', '.join(names)}") from None


# ------------------------------------------------------------------ loaders (HF schema)


def load_piqa(data_dir: Path) -> list[dict]:
    """`baber/piqa` validation: goal, sol1, sol2, label (int)."""
    path, labelled = _labelled(data_dir, "piqa/valid.jsonl", "piqa/valid-labels.lst")
    out = []
    for i, (doc, label) in enumerate(labelled):
        goal, sol1, sol2 = _fields(path, i, doc, "goal", "sol1", "sol2")
        out.append({"goal": goal, "sol1": sol1, "sol2": sol2, "label": int(label)})
    return out


def load_hellaswag(data_dir: Path) -> list[dict]:
    """`Rowan/hellaswag` validation (the file is already in that schema)."""
    path = data_file(data_dir, "hellaswag/hellaswag_val.jsonl")
    docs = _json_lines(path)
    for i, doc in enumerate(docs):
        _fields(path, i, doc, "activity_label", "ctx_a", "ctx_b", "endings", "label")
    return docs


def load_winogrande(data_dir: Path) -> list[dict]:
    """`allenai/winogrande` winogrande_xl validation: sentence, option1, option2, answer ("1"/"2")."""
    path, labelled = _labelled(data_dir, "winogrande/dev.jsonl", "winogrande/dev-labels.lst")
    out = []
    for i, (doc, label) in enumerate(labelled):
        sentence, o1, o2 = _fields(path, i, doc, "sentence", "option1", "option2")
        if "answer" in doc and str(doc["answer"]) != label:
            raise UserError(f"document {i + 1} of {path} answers {doc['answer']!r}, dev-labels.lst says {label!r}")
        if "_" not in sentence:
            raise UserError(f"malformed document {i + 1} in {path}: the sentence has no blank '_'")
        out.append({"sentence": sentence, "option1": o1, "option2": o2, "answer": label})
    return out


def _ai2_choices(path: Path, i: int, doc: dict) -> tuple[str, dict]:
    question, answer = _fields(path, i, doc, "question", "answerKey")
    stem, choices = _fields(path, i, question, "stem", "choices")
    return stem, {
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": answer,
    }


def load_arc(subset: str) -> Callable[[Path], list[dict]]:
    """`allenai/ai2_arc` test: question, choices {text, label}, answerKey (from the original ARC jsonl)."""

    def load(data_dir: Path) -> list[dict]:
        path = data_file(data_dir, f"arc_{subset.lower()}/ARC-{subset}-Test.jsonl")
        out = []
        for i, doc in enumerate(_json_lines(path)):
            stem, rest = _ai2_choices(path, i, doc)
            out.append({"id": doc.get("id"), "question": stem, **rest})
        return out

    return load


def load_openbookqa(data_dir: Path) -> list[dict]:
    """`allenai/openbookqa` main test: question_stem, choices {text, label}, answerKey."""
    path = data_file(data_dir, "openbookqa/test.jsonl")
    out = []
    for i, doc in enumerate(_json_lines(path)):
        stem, rest = _ai2_choices(path, i, doc)
        out.append({"id": doc.get("id"), "question_stem": stem, **rest})
    return out


def load_mathqa(data_dir: Path) -> list[dict]:
    """`math_qa` test: Problem, options, correct (a list in one JSON file)."""
    path = data_file(data_dir, "mathqa/test.json")
    docs = read_json(path)
    if not isinstance(docs, list) or not docs:
        raise UserError(f"malformed {path}: expected a non-empty JSON list of problems")
    out = []
    for i, doc in enumerate(docs):
        problem, options, correct = _fields(path, i, doc, "Problem", "options", "correct")
        out.append({"Problem": problem, "options": options, "correct": correct})
    return out


# ------------------------------------------------------------------ requests (harness task YAMLs)


def _choose(context: str, choices: list[str], gold: int) -> MultipleChoice:
    """An ordinary task: one context, each choice scored as `" " + choice`."""
    return MultipleChoice(
        contexts=(context,) * len(choices),
        continuations=tuple(TARGET_DELIMITER + c for c in choices),
        gold=gold,
        choices=tuple(choices),
    )


def build_piqa(doc: dict) -> MultipleChoice:
    return _choose(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def hellaswag_preprocess(text: str) -> str:
    """The harness's `hellaswag/utils.py: preprocess`."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def build_hellaswag(doc: dict) -> MultipleChoice:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _choose(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def build_winogrande(doc: dict) -> MultipleChoice:
    blank = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:blank] + opt for opt in (doc["option1"], doc["option2"]))
    rest = TARGET_DELIMITER + doc["sentence"][blank + 1 :].strip()
    return MultipleChoice(contexts=contexts, continuations=(rest, rest), gold={"1": 0, "2": 1}[doc["answer"]], choices=contexts)


def _gold_from_key(labels: list[str], key: str) -> int:
    return labels.index(key) if key in labels else NO_GOLD


def build_arc(doc: dict) -> MultipleChoice:
    c = doc["choices"]
    return _choose(f"Question: {doc['question']}\nAnswer:", list(c["text"]), _gold_from_key(c["label"], doc["answerKey"]))


def build_openbookqa(doc: dict) -> MultipleChoice:
    c = doc["choices"]
    return _choose(doc["question_stem"], list(c["text"]), _gold_from_key(c["label"], doc["answerKey"].lstrip()))


MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


def mathqa_choices(options: str) -> list[str]:
    """The harness's `mathqa/utils.py: doc_to_choice`."""
    return [c[4:].rstrip(" ,") for c in MATHQA_OPTION.findall(options)]


def build_mathqa(doc: dict) -> MultipleChoice:
    choices = mathqa_choices(doc["options"])
    gold = "abcde".index(doc["correct"])
    return _choose(f"Question: {doc['Problem']}\nAnswer:", choices, gold if gold < len(choices) else NO_GOLD)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), ("acc", "acc_norm"), load_piqa, build_piqa),
        Task("hellaswag", ("hellaswag/hellaswag_val.jsonl",), ("acc", "acc_norm"), load_hellaswag, build_hellaswag),
        Task("winogrande", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), ("acc",), load_winogrande, build_winogrande),
        Task("arc_easy", ("arc_easy/ARC-Easy-Test.jsonl",), ("acc", "acc_norm"), load_arc("Easy"), build_arc),
        Task("arc_challenge", ("arc_challenge/ARC-Challenge-Test.jsonl",), ("acc", "acc_norm"), load_arc("Challenge"), build_arc),
        Task("openbookqa", ("openbookqa/test.jsonl",), ("acc", "acc_norm"), load_openbookqa, build_openbookqa),
        Task("mathqa", ("mathqa/test.json",), ("acc", "acc_norm"), load_mathqa, build_mathqa),
    )
}
ZEROSHOT_TASKS = tuple(TASKS)


def load_task(name: str, data_dir: Path, limit: int | None = None) -> tuple[list[dict], list[MultipleChoice]]:
    """The first `limit` documents of a task (all without a limit) and their requests."""
    task = TASKS[name]
    docs = task.load(data_dir)[:limit]
    built = []
    for i, doc in enumerate(docs):
        try:
            built.append(task.build(doc))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"malformed document {i + 1} of {name} ({', '.join(task.files)}): {type(e).__name__}: {e}") from None
    return docs, built
