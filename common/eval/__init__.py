"""Evaluation: BM25 and dense retrieval, metrics, sharded encoding, QA, significance, its outputs (run, metrics, markdown and HTML reports) and command line."""
