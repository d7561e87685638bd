"""compeff: distil large language models into small, fast sentiment-analysis students."""

__version__ = "0.1.0"
