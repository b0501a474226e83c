"""Text: prompt templates, incremental detokenizing, stop sequences."""
