"""Label sets of fine-tuning tasks: discovered from the training file, stored with the run, and
checked against the valid/test files (a label the model never saw in training is an error)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from toolkit.data.tasks.formats import NerExample, PairExample
from toolkit.errors import DataError


@dataclass(frozen=True)
class LabelSet:
    """Ordered labels; ids are positions. NER label sets hold IOB2 tags with ``O`` first, then each
    entity type's ``B-``/``I-`` pair in sorted type order (as ``id2label`` in the HF export)."""

    labels: tuple[str, ...]

    @property
    def id_of(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def entity_types(self) -> list[str]:
        return sorted({t[2:] for t in self.labels if t[:2] in ("B-", "I-")})

    @classmethod
    def for_ner(cls, examples: Sequence[NerExample]) -> LabelSet:
        types = sorted({t[2:] for e in examples for t in e.tags if t != "O"})
        return cls(("O", *[f"{p}-{t}" for t in types for p in ("B", "I")]))

    @classmethod
    def for_classes(cls, examples: Sequence[PairExample]) -> LabelSet:
        return cls(tuple(sorted({str(e.label) for e in examples})))

    def check_ner(self, examples: Sequence[NerExample]) -> None:
        """Raise :class:`DataError` naming the file, line and tag of the first tag not in the set."""
        known = set(self.labels)
        for e in examples:
            for tag in e.tags:
                if tag not in known:
                    raise DataError(f"{e.where}: tag {tag!r} does not occur in the training data "
                                    f"(labels: {', '.join(self.labels)}); fix the file or add it to the training set")

    def check_classes(self, examples: Sequence[PairExample]) -> None:
        known = set(self.labels)
        for e in examples:
            if str(e.label) not in known:
                raise DataError(f"{e.where}: label {e.label!r} does not occur in the training data "
                                f"(labels: {', '.join(self.labels)}); fix the file or add it to the training set")
