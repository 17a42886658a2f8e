"""Make the shipped multi-turn chat task ``clinical-chat`` from the shipped ``clinical-sft`` records.

No simulator run: every conversation is assembled from ``toolkit/data/tasks/clinical/sft/SPLIT.jsonl.gz``
of the same split (so the chat splits keep clinical-sft's by-patient separation). Each conversation:

* half of them open with a system message;
* turn 1: a note excerpt and an instruction (``List the medications.`` / ``List the problems.``), the
  assistant answers with the items, as in clinical-sft;
* turn 2: after a medication list, ``How many medications is that?`` → the count (drug names hold no
  comma); after a problem list, a second excerpt and its question;
* turn 3 (half of them): another excerpt and its question.

Seeded (``random.Random(SEED)``) and written as gzip with mtime 0: the same command gives
byte-identical files. Usage (from the repository root)::

    python docs/scripts/make_clinical_chat.py toolkit/data/tasks/clinical/chat
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sys
from pathlib import Path

SEED = 0
SFT = Path(__file__).resolve().parents[2] / "toolkit" / "data" / "tasks" / "clinical" / "sft"
SYSTEM = "You abstract clinical notes. Answer with the items only, separated by commas."
WORDS = {"medications": "medications", "problems": "problems"}


def question(record: dict) -> tuple[str, str, str]:
    """(excerpt, kind, answer) of one clinical-sft record (prompt/completion or messages)."""
    if "messages" in record:
        user, assistant = record["messages"][0]["content"], record["messages"][1]["content"]
        excerpt, _, instruction = user.rpartition("\n")
        kind = "medications" if "medications" in instruction else "problems"
        return excerpt, kind, assistant
    excerpt, _, instruction = record["prompt"].rpartition("\n")
    kind = "medications" if instruction.startswith("Medications") else "problems"
    return excerpt, kind, record["completion"].strip()


def ask(excerpt: str, kind: str) -> str:
    return f"{excerpt}\nList the {WORDS[kind]}."


def conversations(records: list[dict], rng: random.Random) -> list[dict]:
    pool = [question(r) for r in records]
    sources = [r["source"] for r in records]
    order = list(range(len(pool)))
    rng.shuffle(order)
    out = []
    while order:
        i = order.pop()
        excerpt, kind, answer = pool[i]
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": ask(excerpt, kind)}, {"role": "assistant", "content": answer}]
        used = [sources[i]]
        if kind == "medications":
            messages += [{"role": "user", "content": "How many medications is that?"},
                         {"role": "assistant", "content": str(len(answer.split(", ")))}]
        elif order:
            j = order.pop()
            messages += [{"role": "user", "content": ask(*pool[j][:2])}, {"role": "assistant", "content": pool[j][2]}]
            used.append(sources[j])
        if order and rng.random() < 0.5:
            j = order.pop()
            messages += [{"role": "user", "content": ask(*pool[j][:2])}, {"role": "assistant", "content": pool[j][2]}]
            used.append(sources[j])
        out.append({"messages": messages, "source": used})
    return out


def write_gz(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    path.write_bytes(buf.getvalue())


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    for split in ("train", "valid", "test"):
        with gzip.open(SFT / f"{split}.jsonl.gz", "rt") as fh:
            records = [json.loads(line) for line in fh]
        rows = conversations(records, rng)
        write_gz(folder / f"{split}.jsonl.gz", rows)
        turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
        print(f"{split}: {len(rows)} conversations, {turns} assistant turns")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "toolkit/data/tasks/clinical/chat")
