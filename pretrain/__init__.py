"""Stage 1: unsupervised contrastive pretraining from raw text (Contriever, ReContriever, ICT).

Data: chunks.py (tokenise once, chunk per epoch), pairs.py (crops, multi-pair, ICT items),
ict.py + sentences.py (Punkt offline), augment.py. Methods, one file each (losses/): inbatch.py,
moco.py + moco_queue.py, relevance.py, base.py (shared, from embeddings); build_method in
losses/__init__.py. Driver: run.py, demo.py.
"""
