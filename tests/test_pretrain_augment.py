"""Token augmentations: each one's effect, its rate, and special tokens added only afterwards."""
import numpy as np
import pytest

from twotower.common.model.encoder import tiny_bert
from twotower.pretrain.augment import (TokenAugmenter, delete_tokens, mask_tokens, replace_tokens,
                                       shuffle_tokens)

IDS = np.arange(1000, 3000, dtype=np.int64)  # 2000 distinct ordinary tokens


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bert().tokenizer


def rng(seed=0):
    return np.random.default_rng(seed)


def test_delete_keeps_order_at_rate_p_and_never_empties():
    out = delete_tokens(IDS, 0.1, rng())
    assert np.all(np.diff(out) > 0) and set(out) <= set(IDS)  # a subsequence, in order
    assert abs((1 - len(out) / len(IDS)) - 0.1) < 0.03
    assert np.array_equal(delete_tokens(IDS, 0.0, rng()), IDS)
    assert len(delete_tokens(IDS[:5], 1.0, rng())) == 1  # contriever's would be empty


def test_replace_changes_only_hit_positions_with_ordinary_tokens(tokenizer):
    aug = TokenAugmenter(["replace"], 0.2, tokenizer)
    assert not set(aug.pool) & set(tokenizer.all_special_ids)
    out = replace_tokens(IDS, 0.2, rng(), aug.pool)
    changed = out != IDS
    assert abs(changed.mean() - 0.2) < 0.03
    assert not set(out[changed]) & set(tokenizer.all_special_ids)
    assert len(out) == len(IDS)


def test_mask_puts_the_mask_id_at_rate_p(tokenizer):
    out = mask_tokens(IDS, 0.3, rng(), tokenizer.mask_token_id)
    hit = out == tokenizer.mask_token_id
    assert abs(hit.mean() - 0.3) < 0.03
    assert np.array_equal(out[~hit], IDS[~hit])


def test_shuffle_permutes_only_selected_positions():
    out = shuffle_tokens(IDS, 0.1, rng())
    assert sorted(out) == sorted(IDS)
    moved = out != IDS
    assert 0.05 < moved.mean() < 0.11  # selected ~10%, a few stay in place by chance
    assert np.array_equal(shuffle_tokens(IDS, 0.0, rng()), IDS)


def test_augmentations_apply_in_order_and_are_seeded(tokenizer):
    aug = TokenAugmenter(["delete", "mask"], 0.1, tokenizer)
    a, b = aug(IDS, rng(7)), aug(IDS, rng(7))
    assert np.array_equal(a, b)
    assert len(a) < len(IDS) and (a == tokenizer.mask_token_id).any()
    expected = mask_tokens(delete_tokens(IDS, 0.1, rng(7)), 0.1, rng_after_delete(7),
                           tokenizer.mask_token_id)
    assert np.array_equal(a, expected)
    assert np.array_equal(TokenAugmenter(["none"], 0.5, tokenizer)(IDS, rng()), IDS)


def rng_after_delete(seed):
    """The generator state the mask step sees: after delete drew len(IDS) uniforms."""
    g = rng(seed)
    g.random(len(IDS))
    return g


def test_special_tokens_are_added_after_augmenting(tokenizer):
    from twotower.pretrain.args import PairArgs
    from twotower.pretrain.pairs import CropPairs

    class OneChunk:
        num_chunks = 1

        def chunk(self, epoch, index):
            return IDS[:50]

        def start(self, epoch, index):
            return 0

    args = PairArgs(augmentation=["mask"], prob_augmentation=1.0, ratio_min=0.5, ratio_max=0.5,
                    chunk_length=50, n_pairs=2)
    item = CropPairs(OneChunk(), args, tokenizer, seed=0)[0]
    for ids in [item["query"], *item["keys"]]:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert (ids[1:-1] == tokenizer.mask_token_id).all() and len(ids) == 25 + 2


def test_unknown_or_impossible_augmentation_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown augmentation"):
        TokenAugmenter(["rotate"], 0.1, tokenizer)
