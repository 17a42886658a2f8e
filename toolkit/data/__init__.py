"""Data layer: preprocessing into mmap indexed datasets, GPT pretraining datasets, blending,
resumable samplers and the shipped sample corpora. See ``docs/data.md``."""

from toolkit.data.blending import BlendedDataset, blending_indices, component_size, parse_data_prefix, split_documents
from toolkit.data.corpus import available_corpora, corpus_file, corpus_prefix
from toolkit.data.gpt_dataset import GPTDataset, build_gpt_datasets, build_indices
from toolkit.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from toolkit.data.preprocess import preprocess
from toolkit.data.readers import EXTENSIONS, READERS, detect_format, iter_documents, read_jsonl, read_text
from toolkit.data.sampler import PretrainingSampler, build_data_loader, collate

__all__ = [
    "BlendedDataset", "blending_indices", "component_size", "parse_data_prefix",
    "available_corpora", "corpus_file", "corpus_prefix",
    "GPTDataset", "build_gpt_datasets", "build_indices", "split_documents",
    "IndexedDataset", "IndexedDatasetWriter", "best_dtype",
    "preprocess",
    "EXTENSIONS", "READERS", "detect_format", "iter_documents", "read_jsonl", "read_text",
    "PretrainingSampler", "build_data_loader", "collate",
]
