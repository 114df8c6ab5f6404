"""alignx: one representation space across the languages of a causal LM (AlignX, Bu et al., EMNLP 2025)."""

__version__ = "0.1.0"
