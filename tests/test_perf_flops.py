"""The model FLOPs that benchmarks/perf.py's train section reports beside pairs/s (Kaplan et al.
2020, Table 1): checked by hand on a tiny BERT, against the model's own weight matrices, and as
counted by the hook on a real forward call."""
import torch
from torch._dynamo.testing import CompileCounter
from transformers import BertConfig, BertModel

from benchmarks.perf_train import count_flops, forward_flops, rates

TINY = dict(hidden_size=4, num_hidden_layers=2, intermediate_size=8, num_attention_heads=2,
            vocab_size=50, max_position_embeddings=16)


def test_forward_flops_by_hand():
    # N = 2 d n_layer (2 d + d_ff) = 2*4*2*(8+8) = 256 non-embedding parameters;
    # per sequence of 5 tokens: 2 N L + 2 n_layer L^2 d = 2*256*5 + 2*2*25*4 = 2560 + 400 = 2960
    assert forward_flops(BertConfig(**TINY), batch=3, length=5) == 3 * 2960
    assert forward_flops(BertConfig(**TINY), batch=1, length=1) == 2 * 256 + 2 * 2 * 4


def test_n_is_the_weight_matrices_of_the_layers():
    model = BertModel(BertConfig(**TINY))
    weights = sum(m.weight.numel() for m in model.encoder.modules()
                  if isinstance(m, torch.nn.Linear))  # Q, K, V, O and the two FFN matrices
    assert forward_flops(model.config, 1, 1) - 2 * 2 * 4 == 2 * weights


def test_the_hook_counts_each_call_at_its_padded_shape():
    model, calls = BertModel(BertConfig(**TINY)), []
    count_flops([model], calls)
    model(input_ids=torch.ones(3, 5, dtype=torch.long))
    model(torch.ones(2, 7, dtype=torch.long))  # positional input_ids
    assert [f for _, f in calls] == [3 * 2960, forward_flops(model.config, 2, 7)]


def test_rates_count_the_calls_after_the_warm_up_three_times():
    calls = [(1.0, 100), (2.5, 200), (3.0, 300)]  # (time, forward FLOPs); the first is warm-up
    assert rates([2.0, 4.0], calls, batch=4, steps=1, warmup=1) == (2.0, 3 * 500 / 2.0)


def test_the_hook_is_not_traced_by_torch_compile():
    """A compiled model (train.compile, perf's --compile rows) keeps one compiled graph: were the
    hook traced, dynamo would guard on len(calls) and recompile on every call until its limit,
    then run the model eagerly, so a "compiled" row would time eager code (it did, before)."""
    torch._dynamo.reset()
    model, calls, counter = BertModel(BertConfig(**TINY)).eval(), [], CompileCounter()
    count_flops([model], calls)
    compiled = torch.compile(model, backend=counter, dynamic=True)
    try:
        compiled(torch.ones(2, 5, dtype=torch.long))
        frames = counter.frame_count
        assert frames > 0  # the model's graph was compiled, around the hook
        for length in (5, 6, 7, 5):
            compiled(torch.ones(2, length, dtype=torch.long))
        assert counter.frame_count == frames  # and not again on any later call
        assert [f for _, f in calls] == [forward_flops(model.config, 2, n)
                                         for n in (5, 5, 6, 7, 5)]
    finally:
        torch._dynamo.reset()
