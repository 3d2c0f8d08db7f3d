"""Stage 1: unsupervised contrastive pretraining from raw text (Contriever, ReContriever, ICT).

Data: chunks.py (tokenise once, chunk per epoch), pairs.py (crops, multi-pair, ICT items),
ict.py + sentences.py (Punkt offline), augment.py. Methods: inbatch.py, moco.py, relevance.py
(loss math from embeddings), method.py (shared base, build_method). Driver: run.py, demo.py.
"""
