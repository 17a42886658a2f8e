"""Build megaforge's four synthetic clinical fine-tuning tasks from a clinosim run.

Run with the Python that has ``clinosim`` installed (its ICD-10-CM names and short names are read
from the package), after ``clinosim simulate`` and ``clinosim narrate`` (see docs/clinical.md):

    python make_clinical_tasks.py out/cif OUTPUT_FOLDER

Every label comes from the simulator's structured record of the patient and encounter, never from
reading the note:

- ``clinical-ner``: the note's text with character-offset entities, ``DRUG`` (the record's
  medications, prescriptions and administrations) and ``PROBLEM`` (the record's chronic
  conditions, diagnoses, complications and family history, by ICD-10-CM name and clinosim's short
  name), found where those names occur in the note.
- ``clinical-note-type``: the note's text and its document type (``task_type``).
- ``clinical-nli``: a premise sentence of a note that names a recorded drug or problem, and a
  hypothesis about the patient: ``entailment`` when it states a recorded fact, ``contradiction``
  when it denies one, ``neutral`` when it is about a drug or problem this patient has no record of.
- ``clinical-sts``: the problem-and-medication lines of two notes, scored 0-5 as 5 x the Jaccard
  overlap of the recorded concepts they name.
- ``clinical-sft``: extraction as instruction following for decoders: a short excerpt of a note and
  the recorded drugs (or problems) it names, as prompt/completion or as a chat turn.

Splits are by patient (80/10/10), so no patient is in two splits. Output files are gzip'd jsonl
with mtime 0: two runs on the same clinosim output give identical bytes.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import clinosim
import yaml

CODES = Path(clinosim.__file__).resolve().parent / "codes" / "data"
SEED = 0
#: the most notes of one type per split of clinical-note-type (outpatient SOAP notes outnumber the rest)
NOTE_TYPE_CAP = {"train": 240, "valid": 30, "test": 60}
#: the most notes per split of clinical-ner, and examples per split of the pair tasks
NER_SIZE = {"train": 1000, "valid": 120, "test": 240}
PAIR_SIZE = {"train": 3000, "valid": 300, "test": 600}
#: the longest passage of clinical-sts, in characters (two fit in gatortron-tiny's 128 tokens)
STS_CHARS = 240
#: the longest note excerpt of clinical-sft, in characters (with its answer, within gpt-tiny's 128 tokens)
SFT_CHARS = 160
SFT_SIZE = {"train": 3000, "valid": 200, "test": 400}
#: words that end a drug name in a regimen string
ROUTES = {"PO", "IV", "SC", "IM", "SL", "PR", "INH", "TOP", "daily", "BID", "TID", "QID", "PRN", "continuous", "drip", "x"}
#: note types with fewer training notes than this are left out of clinical-note-type
MIN_TYPE_NOTES = 20


def note_text(narrative: dict) -> str:
    """The note as one string, exactly as the pretraining corpus writes it (docs/clinical.md)."""
    text = (narrative.get("text") or "").strip()
    if not text:
        text = "\n\n".join(f"{k.replace('_', ' ').upper()}:\n{v.strip()}"
                           for k, v in narrative.get("sections", {}).items() if isinstance(v, str) and v.strip())
    return text


def load_names() -> tuple[dict[str, str], dict[str, str]]:
    icd = yaml.safe_load((CODES / "icd-10-cm.yaml").read_text(encoding="utf-8"))["codes"]
    short = yaml.safe_load((CODES / "condition-short-name.yaml").read_text(encoding="utf-8"))["codes"]
    return ({c: v["en"] for c, v in icd.items() if v.get("en")},
            {c: v["en"] for c, v in short.items() if isinstance(v, dict) and v.get("en")})


def name_variants(name: str) -> set[str]:
    """``"Chronic kidney disease, unspecified"`` → itself, ``"Chronic kidney disease"``; ``"Hypertension
    (HTN)"`` → ``"Hypertension"``, ``"HTN"``; each also with a lower-case first letter."""
    out = {name}
    m = re.fullmatch(r"(.+?) \((.+)\)", name)
    if m:
        out |= {m.group(1), m.group(2)}
    for cut in (", ", " without ", " with "):
        for n in list(out):
            head = n.split(cut)[0]
            if len(head) >= 6 and head != n:
                out.add(head)
    out |= {n[0].lower() + n[1:] for n in out if n[:2] != n[:2].upper()}
    return {n for n in out if len(n) >= 3 or n.isupper()}


def problem_codes(record: dict) -> set[str]:
    codes = {c["code"] for c in record["patient"].get("chronic_conditions", [])}
    codes |= set((record.get("condition_event") or {}).get("ground_truth_diseases", []))
    dx = record.get("clinical_diagnosis") or {}
    codes |= {dx.get("admission_diagnosis_code"), dx.get("discharge_diagnosis_code")}
    for key in ("working_diagnoses", "missed_diagnoses", "overcalled_diagnoses"):
        codes |= {d if isinstance(d, str) else d.get("code") for d in dx.get(key, [])}
    codes |= {c.get("code") if isinstance(c, dict) else c for c in record.get("complications_occurred", [])}
    for relative in record.get("family_history", []):
        codes |= set(relative.get("condition_codes", []))
    return {c for c in codes if c}


def problem_names(codes: set[str], icd: dict[str, str], short: dict[str, str]) -> dict[str, str]:
    """Name → ICD-10 category for every ICD-10-CM code in the categories of ``codes`` (the record
    keeps some conditions as a category, e.g. E78, that the note names by a billable child, E78.5),
    and for their short names."""
    categories = {code[:3] for code in codes}
    names = {}
    for code, name in sorted(icd.items()):
        if code[:3] in categories:
            names.update({n: code[:3] for n in name_variants(name)})
    for category in sorted(categories):
        if category in short:
            names.update({n: category for n in name_variants(short[category])})
    return names


def drug_names(record: dict) -> set[str]:
    p = record["patient"]
    items = p.get("current_medications", []) + p.get("baseline_chronic_medications", [])
    items += (record.get("discharge_prescription") or {}).get("items", [])
    items += record.get("medication_administrations", [])
    names = set()
    for item in items:
        name = item.get("drug_name") or "" if isinstance(item, dict) else ""
        # "steroid: Prednisone 40mg PO daily x5 days" → "Prednisone"; "Regular insulin (continuous IV)" → itself
        # and "Regular insulin"
        names.add(name)
        if ": " in name:
            name = name.split(": ", 1)[1]
        name = name.split(" (")[0]
        words = []
        for word in name.split():
            if any(ch.isdigit() for ch in word) or word in ROUTES:
                break
            words.append(word)
        names.add(" ".join(words))
    return {n for n in names if len(n) >= 2 and ":" not in n and not any(ch.isdigit() for ch in n)}


def find_mentions(text: str, names: dict[str, tuple[str, str]]) -> list[dict]:
    """Non-overlapping occurrences of ``names`` (name → (label, concept)) at word boundaries, longest
    first, as entities with their concept (an ICD-10 category or a lower-cased drug name)."""
    if not names:
        return []
    pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")(?![\w])")
    return [{"start": m.start(), "end": m.end(), "label": names[m.group(1)][0], "concept": names[m.group(1)][1]}
            for m in pattern.finditer(text)]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def sentences(text: str) -> list[tuple[int, int]]:
    """Line- and sentence-sized (start, end) pieces of a note."""
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


def main(cif: Path, output: Path) -> None:
    icd, short = load_names()
    version = (cif / "narratives" / "current_version.txt").read_text().strip()
    records = {}
    for path in sorted((cif / "structural" / "patients").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        for encounter in record["encounters"]:
            records[encounter["encounter_id"]] = record
    patients = sorted({r["patient"]["patient_id"] for r in records.values()})
    rng = random.Random(SEED)
    rng.shuffle(patients)
    n = len(patients)
    splits = {p: "train" if i < 0.8 * n else "valid" if i < 0.9 * n else "test" for i, p in enumerate(patients)}

    notes = []  # one dict per note: split, type, text, entities, drugs, problems (record facts)
    for path in sorted((cif / "narratives" / version / "documents").glob("*/*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        record = records[doc["encounter_id"]]
        meta = {d["document_id"]: d for d in record["documents"]}[doc["document_id"]]
        text = note_text(doc["narrative"])
        if not text:
            continue
        drugs, codes = drug_names(record), problem_codes(record)
        problems = problem_names(codes, icd, short)
        names = {p: ("PROBLEM", category) for p, category in problems.items()}
        names.update({d: ("DRUG", d.lower()) for d in drugs})
        notes.append({"split": splits[record["patient"]["patient_id"]], "type": meta["task_type"], "text": text,
                      "entities": find_mentions(text, names), "drugs": drugs, "problems": set(problems),
                      "source": f"clinosim/{doc['document_id']}"})
    type_counts = Counter(x["type"] for x in notes if x["split"] == "train")
    all_drugs = sorted(set().union(*(x["drugs"] for x in notes)))
    all_problems = sorted({icd[c] for c in icd if len(c) == 3} | set(short.values()))

    for split in ("train", "valid", "test"):
        part = [x for x in notes if x["split"] == split]
        prng = random.Random(f"{SEED}-{split}")

        # clinical-ner: notes with at least one entity, outpatient SOAP notes no more than the rest together
        soap = [x for x in part if x["type"] == "outpatient_soap" and x["entities"]]
        other = [x for x in part if x["type"] != "outpatient_soap" and x["entities"]]
        prng.shuffle(soap)
        chosen = other + soap[: max(len(other), NER_SIZE[split] // 2)]
        prng.shuffle(chosen)
        write(output / "clinical-ner" / f"{split}.jsonl.gz",
              [{"text": x["text"], "entities": [{k: m[k] for k in ("start", "end", "label")} for m in x["entities"]],
                "source": x["source"]} for x in chosen[: NER_SIZE[split]]])

        # clinical-note-type: at most NOTE_TYPE_CAP notes of a type
        by_type = defaultdict(list)
        for x in part:
            if type_counts[x["type"]] >= MIN_TYPE_NOTES:
                by_type[x["type"]].append(x)
        rows = []
        for note_type in sorted(by_type):
            group = by_type[note_type]
            prng.shuffle(group)
            rows += [{"text": x["text"], "label": note_type, "source": x["source"]} for x in group[: NOTE_TYPE_CAP[split]]]
        prng.shuffle(rows)
        write(output / "clinical-note-type" / f"{split}.jsonl.gz", rows)

        # clinical-nli: premise sentences naming a recorded fact
        premises = []
        for x in part:
            for s, e in sentences(x["text"]):
                inside = [m for m in x["entities"] if m["start"] >= s and m["end"] <= e]
                if inside:
                    premises.append((x, x["text"][s:e], inside))
        rows = []
        while len(rows) < PAIR_SIZE[split] and premises:
            x, premise, inside = prng.choice(premises)
            mention = prng.choice(inside)
            kind = mention["label"]
            label = prng.choice(["entailment", "contradiction", "neutral"])
            if label == "neutral":  # a drug / problem this patient has no record of
                pool = all_drugs if kind == "DRUG" else all_problems
                own = x["drugs"] if kind == "DRUG" else x["problems"]
                subject = prng.choice([p for p in pool if p not in own and p.lower() not in x["text"].lower()])
            else:
                subject = x["text"][mention["start"]:mention["end"]]
            templates = {("DRUG", True): ["The patient is on {}.", "{} has been prescribed.", "The patient takes {}."],
                         ("DRUG", False): ["The patient is not on {}.", "{} has never been prescribed.", "The patient does not take {}."],
                         ("PROBLEM", True): ["The patient has {}.", "History of {}.", "{} is among the patient's problems."],
                         ("PROBLEM", False): ["The patient does not have {}.", "No history of {}.", "{} has been ruled out."]}
            hypothesis = prng.choice(templates[(kind, label != "contradiction")]).format(subject)
            rows.append({"text_a": premise, "text_b": hypothesis[0].upper() + hypothesis[1:], "label": label,
                         "source": x["source"]})
        write(output / "clinical-nli" / f"{split}.jsonl.gz", rows)

        # clinical-sts: the problem and medication sentences of two notes (at most STS_CHARS), scored
        # 5 x the Jaccard overlap of the recorded concepts they name
        passages = []
        for x in part:
            keep, concepts = [], set()
            for s, e in sentences(x["text"]):
                inside = [m for m in x["entities"] if m["start"] >= s and m["end"] <= e]
                if inside and sum(len(k) + 1 for k in keep) + e - s <= STS_CHARS:
                    keep.append(x["text"][s:e])
                    concepts |= {m["concept"] for m in inside}
            if concepts:
                passages.append((" ".join(keep), concepts, x["source"]))
        by_concept = defaultdict(list)
        for i, (_, concepts, _) in enumerate(passages):
            for c in concepts:
                by_concept[c].append(i)
        rows, seen = [], set()
        while len(rows) < PAIR_SIZE[split] and len(passages) > 1:
            i = prng.randrange(len(passages))
            if prng.random() < 0.7:  # a partner sharing a concept, so that scores spread over 0-5
                j = prng.choice(by_concept[prng.choice(sorted(passages[i][1]))])
            else:
                j = prng.randrange(len(passages))
            if i == j or (i, j) in seen or passages[i][0] == passages[j][0]:
                continue
            seen.add((i, j))
            a, b = passages[i][1], passages[j][1]
            rows.append({"text_a": passages[i][0], "text_b": passages[j][0], "score": round(5 * len(a & b) / len(a | b), 3),
                         "source": f"{passages[i][2]} {passages[j][2]}"})
        write(output / "clinical-sts" / f"{split}.jsonl.gz", rows)

        # clinical-sft: extraction as instruction following. A short excerpt of a note (its sentences naming
        # drugs, or problems, at most SFT_CHARS) and the recorded drugs / problems it names, in order of
        # first mention; half as prompt/completion, half as a chat turn
        rows = []
        for x in part:
            for kind, cue, ask in (("DRUG", "Medications:", "List the medications."),
                                   ("PROBLEM", "Problems:", "List the problems.")):
                keep, names = [], []
                for s, e in sentences(x["text"]):
                    inside = [m for m in x["entities"] if m["start"] >= s and m["end"] <= e and m["label"] == kind]
                    if inside and sum(len(k) + 1 for k in keep) + e - s <= SFT_CHARS:
                        keep.append(x["text"][s:e])
                        names += [x["text"][m["start"]:m["end"]] for m in inside]
                if not names:
                    continue
                excerpt, answer = " ".join(keep), ", ".join(dict.fromkeys(names))
                if prng.random() < 0.5:
                    rows.append({"prompt": f"{excerpt}\n{cue}", "completion": f" {answer}", "source": x["source"]})
                else:
                    rows.append({"messages": [{"role": "user", "content": f"{excerpt}\n{ask}"},
                                              {"role": "assistant", "content": answer}], "source": x["source"]})
        prng.shuffle(rows)
        write(output / "clinical-sft" / f"{split}.jsonl.gz", rows[: SFT_SIZE[split]])

    counts = Counter((x["split"], x["type"]) for x in notes)
    print(json.dumps({f"{s}/{t}": c for (s, t), c in sorted(counts.items())}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
