import numpy as np
import pytest

from lmsqueeze.models.looped import LoopedConfig


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 512-token BPE trained on a small slice of the stdlib train split."""
    from lmsqueeze.data.corpus import read_texts
    from lmsqueeze.train.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer

    texts = list(read_texts(None, "train", max_chars=400_000))
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=512))
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out


def _tiny_cfg(unique=2, loops=1, heads=4, kv=2, head_dim=16, vocab=512, **kw):
    return LoopedConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_heads=heads,
                        num_kv_heads=kv, head_dim=head_dim, num_unique_layers=unique, num_loops=loops,
                        max_position_embeddings=512, **kw)


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture
def tiny_cfg():
    """Factory of tiny looped configs: tiny_cfg(unique, loops, heads=, kv=, head_dim=)."""
    return _tiny_cfg
