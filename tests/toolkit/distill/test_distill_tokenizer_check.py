"""check_same_tokenizer: logit distillation needs one vocabulary."""
import pytest

from slimlm.toolkit.distill import check_same_tokenizer
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import byte_tokenizer


def test_same_tokenizer_passes():
    check_same_tokenizer(byte_tokenizer(), byte_tokenizer())


def test_an_added_token_is_reported():
    student = byte_tokenizer()
    student.add_tokens(["<|tool|>"])
    with pytest.raises(SlimlmError, match="only in the student's") as err:
        check_same_tokenizer(byte_tokenizer(), student)
    assert "259 vs 260" in str(err.value) and "<|tool|>" in str(err.value)


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_swapped_ids_of_equal_size_vocabularies_are_reported():
    # Same tokens, same size: only a comparison of ids catches this.
    with pytest.raises(SlimlmError, match="different ids") as err:
        check_same_tokenizer(_Vocab({"a": 0, "b": 1, "c": 2}), _Vocab({"a": 1, "b": 0, "c": 2}))
    assert "'a': 0 vs 1" in str(err.value)
