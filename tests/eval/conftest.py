"""Fixtures for the evaluation tests: a small byte-level BPE tokenizer, a tiny random Llama saved with it."""

import pytest

from lmsqueeze.data.corpus import python_source_roots, read_texts

STDLIB = python_source_roots()[0]
TRAIN_FILES = [STDLIB / "textwrap.py", STDLIB / "string.py"]  # single files: fast, no directory walk
HAYSTACK_FILES = [STDLIB / "argparse.py", STDLIB / "difflib.py"]


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (BOS '<s>' prepended, EOS '</s>') trained on ~20 KB of two stdlib files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(list(read_texts(TRAIN_FILES, "train", max_chars=20_000)), trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def haystack():
    return "\n".join(read_texts(HAYSTACK_FILES, "test", max_chars=60_000))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (vocab = the tokenizer's) saved with its tokenizer, loadable by load_model."""
    from lmsqueeze.models.tiny import save_tiny_model

    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model(path, "llama", seed=0, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    import lmsqueeze

    return lmsqueeze.load_model(model_dir, dtype="fp32", device="cpu")
