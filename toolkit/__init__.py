"""megaforge: train transformer language models at any scale."""

__version__ = "0.1.0"
