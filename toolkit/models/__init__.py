"""Model families (gpt, bert, t5) built from shared blocks in ``toolkit.models.common``."""
