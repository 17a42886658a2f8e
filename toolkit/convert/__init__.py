"""Conversion between megaforge's native checkpoints and other formats: Hugging Face export and
import, legacy Megatron-LM import, offline resharding, verification, and ``checkpoint.init_from``
sources. Streams one tensor group at a time; the families' weight names come from their
``ModelSpec.hf_adapter`` (written with :mod:`toolkit.mapping`)."""

from toolkit.convert.dispatch import convert, detect_source
from toolkit.convert.hf import export_hf, import_hf

__all__ = ["convert", "detect_source", "export_hf", "import_hf"]
