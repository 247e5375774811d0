"""Sequence: token views, output-only rollback, clones, and refusing requests that cannot run."""
import pytest

from slimlm.serve.engine import Sequence, SequenceStatus


def test_tokens_prompt_and_outputs():
    seq = Sequence(7, [1, 2, 3], max_tokens=4, eos_token_ids=frozenset({0}), params="p")
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    seq.append_token(9)
    seq.append_token(8)
    assert seq.token_ids == [1, 2, 3, 9, 8] and seq.prompt_token_ids == [1, 2, 3]
    assert seq.output_token_ids == [9, 8] and seq.last_token_id == 8
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished and seq.finish_reason is None
    seq.status = SequenceStatus.FINISHED_LENGTH
    assert seq.is_finished and seq.finish_reason == "length"


def test_prompt_is_copied_not_aliased():
    prompt = [1, 2]
    seq = Sequence(0, prompt, max_tokens=1)
    seq.append_token(3)
    assert prompt == [1, 2]


def test_drop_last_tokens_never_drops_the_prompt():
    seq = Sequence(0, [1, 2], max_tokens=5)
    seq.append_token(3)
    with pytest.raises(ValueError, match="prompt cannot be dropped"):
        seq.drop_last_tokens(2)
    assert seq.token_ids == [1, 2, 3]
    seq.drop_last_tokens(1)
    assert seq.token_ids == [1, 2]


def test_clone_copies_tokens_but_not_kv_state():
    seq = Sequence(0, [1, 2], max_tokens=5, eos_token_ids=frozenset({4}), arrival_time=3.0)
    seq.append_token(3)
    seq.block_table, seq.num_computed_tokens, seq.status = [5], 2, SequenceStatus.RUNNING
    child = seq.clone(1)
    assert child.seq_id == 1 and child.token_ids == [1, 2, 3] and child.num_prompt_tokens == 2
    assert child.eos_token_ids == {4} and child.arrival_time == 3.0
    assert child.block_table == [] and child.num_computed_tokens == 0
    assert child.status is SequenceStatus.WAITING


@pytest.mark.parametrize("prompt,max_tokens,match", [([], 1, "prompt is empty"),
                                                     ([1], 0, "max_tokens must be at least 1")])
def test_refuses_requests_that_cannot_produce_a_token(prompt, max_tokens, match):
    with pytest.raises(ValueError, match=match):
        Sequence(0, prompt, max_tokens=max_tokens)
