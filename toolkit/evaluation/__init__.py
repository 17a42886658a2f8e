"""Evaluation metrics for fine-tuned models (NER, sequence classification, regression)."""
