"""Fixtures for the data tests: a small byte-level BPE tokenizer and a corpus haystack."""

import pytest

from lmsqueeze.data.corpus import python_source_roots, read_texts

STDLIB = python_source_roots()[0]
TRAIN_FILES = [STDLIB / "textwrap.py", STDLIB / "string.py"]  # single files: fast, no directory walk
HAYSTACK_FILES = [STDLIB / "argparse.py", STDLIB / "difflib.py"]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (BOS '<s>' prepended) trained on ~20 KB of two stdlib files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(list(read_texts(TRAIN_FILES, "train", max_chars=20_000)), trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def haystack():
    return "\n".join(read_texts(HAYSTACK_FILES, "test", max_chars=60_000))
