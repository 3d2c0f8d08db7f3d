"""Speed/memory switches change nothing but cost: gradient checkpointing (model.gradient_
checkpointing), alone and with GradCache; chunked forward calls (model.forward_chunk); and the
benchmark's report renders its own results."""
from tests.test_grad_cache import (assert_grads_close, cached_grads, finetune_batch,
                                   make_finetune_method, uncached_grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = make_finetune_method("infonce")
    checkpointed = make_finetune_method("infonce", gradient_checkpointing=True)
    assert checkpointed.encoder.query_model.is_activation_checkpointing
    batch = finetune_batch(plain.encoder)
    _, want = uncached_grads(plain, batch)
    _, got = uncached_grads(checkpointed, batch)
    assert_grads_close(got, want)
    _, got_cached = cached_grads(checkpointed, batch, 2)
    assert_grads_close(got_cached, want)


def test_forward_chunk_gives_the_same_embeddings_and_gradients():
    import torch

    from tests.test_grad_cache import texts

    plain = make_finetune_method("samtone_symmetric")
    chunked = make_finetune_method("samtone_symmetric", forward_chunk=3)
    batch = finetune_batch(plain.encoder)  # documents of 4-20 words: slices of unequal width
    docs = plain.encoder.tokenize(texts(7, 5, 1, 30), tower="doc")
    want = plain.encoder(docs["input_ids"], docs["attention_mask"], tower="doc")
    widths, forward_rows = [], chunked.encoder._forward_rows
    chunked.encoder._forward_rows = lambda ids, mask, *rest: (
        widths.append(ids.shape[1]), forward_rows(ids, mask, *rest))[1]
    got = chunked.encoder(docs["input_ids"], docs["attention_mask"], tower="doc")
    del chunked.encoder._forward_rows
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    lengths = docs["attention_mask"].sum(1).tolist()  # each slice cut to its own longest text
    assert widths == [max(lengths[s:s + 3]) for s in range(0, 7, 3)]
    assert len(set(widths)) > 1
    loss_plain, want_grads = uncached_grads(plain, batch)
    loss_chunked, got_grads = uncached_grads(chunked, batch)
    torch.testing.assert_close(loss_chunked, loss_plain, rtol=1e-5, atol=1e-6)
    assert_grads_close(got_grads, want_grads)
    _, cached = cached_grads(chunked, batch, 2)  # and inside GradCache
    assert_grads_close(cached, want_grads)


def test_benchmark_report_renders_every_section():
    from benchmarks.perf import markdown

    load = [1.0, 1.0, 1.0]
    res = {"encode": {"docs": 8, "batch_size": 4, "max_length": 16, "load_before": load,
                      "load_after": load, "systems": {"twotower fp32": {
                          "docs_per_s": 2.0, "speedup_vs_st": 1.5, "max_abs_diff_vs_st": 0.0}}},
           "train": {"batch_size": 4, "max_length": 16, "steps": 2, "warmup": 1,
                     "load_before": load, "load_after": load, "overhead": {"fp32": 1.02},
                     "rows": [{"system": "twotower", "precision": "fp32", "pairs_per_s": 3.0,
                               "vs_st_same_precision": 1.9, "vs_st_fp32": 1.9},
                              {"system": "bare loop", "precision": "bf16", "pairs_per_s": 4.0,
                               "dropout": "no dropout", "model_gflops_per_s": 50.5,
                               "of_matmul_peak": 0.25, "vs_st_same_precision": 1.1}],
                     "matmul_peak_gflops": {"fp32": 60.0, "bf16": 202.0}},
           "memory": {"batch": 512, "max_length": 128, "load_before": load, "load_after": load,
                      "rows": [{"setting": "GradCache chunk 32", "peak_rss_gb": 1.5, "step_s": 9}]}}
    text = markdown(res)
    for expected in ("| twotower fp32 | 2.0 | 1.5 | 0.0 |", "bare loop step = 1.02",
                     "| twotower | fp32 | - | 3.0 | - | - | 1.9 | 1.9 |",  # a row from before #24
                     "| bare loop | bf16 | no dropout | 4.0 | 50.5 | 0.25 | 1.1 | - |",
                     "fp32 60.0 GFLOP/s, bf16 202.0 GFLOP/s", "| GradCache chunk 32 | 1.5 | 9 |"):
        assert expected in text
