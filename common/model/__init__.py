"""The encoder, its export to the sentence-transformers layout, gathers across processes, GradCache."""
