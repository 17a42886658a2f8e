"""Build megaforge's ``clinical-summary`` seq2seq task (T5: note excerpt → structured summary line)
from the shipped ``clinical-ner`` task, so it needs nothing beyond a checkout:

    .venv/bin/python docs/scripts/make_clinical_summary.py toolkit/data/tasks/clinical

Each row is a short excerpt of a note (consecutive sentences naming at least one recorded drug or
problem, at most ``SUMMARY_CHARS`` characters) and the line that summarises it,
``problems: A, B; drugs: C`` — the PROBLEM and DRUG mentions of ``clinical-ner`` (themselves from
the simulator's structured record, never from reading the note) in order of first mention, without
repeats, ``none`` for an empty list. The NER splits are by patient, so these are too. Output files
are gzip'd jsonl with mtime 0: two runs give identical bytes.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

SEED = 0
#: the longest excerpt, in characters (with the task prefix, within t5-tiny-clinical's 128 encoder tokens)
SUMMARY_CHARS = 160
#: rows per split
SIZE = {"train": 3000, "valid": 200, "test": 400}
PREFIX = "summarize: "


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def sentences(text: str) -> list[tuple[int, int]]:
    """Line- and sentence-sized (start, end) pieces of a note (as make_clinical_tasks.py cuts them)."""
    out = []
    for m in re.finditer(r"[^\n]+", text):
        start = m.start()
        for piece in re.finditer(r".+?(?:[.;](?=\s)|$)", m.group(0)):
            s, e = start + piece.start(), start + piece.end()
            while s < e and text[s].isspace():
                s += 1
            if e - s >= 12:
                out.append((s, e))
    return out


def summary(text: str, entities: list[dict]) -> str:
    """``problems: A, B; drugs: C`` of the mentions, in order of first mention, each once."""
    def names(label: str) -> str:
        found = dict.fromkeys(text[m["start"]:m["end"]] for m in entities if m["label"] == label)
        return ", ".join(found) or "none"

    return f"problems: {names('PROBLEM')}; drugs: {names('DRUG')}"


def excerpts(note: dict) -> list[dict]:
    """Every run of consecutive sentences that names an entity, greedily grown up to SUMMARY_CHARS."""
    text, ents = note["text"], note["entities"]
    pieces = [(s, e, [m for m in ents if m["start"] >= s and m["end"] <= e]) for s, e in sentences(text)]
    rows, i = [], 0
    while i < len(pieces):
        if not pieces[i][2] or pieces[i][1] - pieces[i][0] > SUMMARY_CHARS:
            i += 1
            continue
        j, inside = i, []
        while j < len(pieces) and pieces[j][1] - pieces[i][0] <= SUMMARY_CHARS:
            inside += pieces[j][2]
            j += 1
        start, end = pieces[i][0], pieces[j - 1][1]
        rel = [{"start": m["start"] - start, "end": m["end"] - start, "label": m["label"]} for m in inside]
        excerpt = text[start:end]
        rows.append({"input": PREFIX + excerpt, "target": summary(excerpt, rel), "source": note["source"]})
        i = j
    return rows


def main(root: Path) -> None:
    prng = random.Random(SEED)
    for split in ("train", "valid", "test"):
        rows = [r for note in read(root / "ner" / f"{split}.jsonl.gz") for r in excerpts(note)]
        prng.shuffle(rows)
        write(root / "summary" / f"{split}.jsonl.gz", rows[: SIZE[split]])
        print(f"{split}: {min(len(rows), SIZE[split])} of {len(rows)} excerpts")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
