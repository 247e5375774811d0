"""Built-in corpora: every name loads, the split is by document, disjoint, 90/10, and loses no text."""
import re

import pytest

from slimlm.toolkit.data import BUILTIN_CORPORA, load_texts
from slimlm.toolkit.data.builtin import _documents, builtin_path, split_documents, split_index
from slimlm.toolkit.errors import SlimlmError

NAMES = ["wiki", "c4", "tiny", "code", "multilingual", "technical"]
# Between two documents the file may hold only whitespace and separator markers.
GAP = re.compile(r"(?:\s|<\|endoftext\|>)*")


def test_the_six_corpora_are_listed():
    assert list(BUILTIN_CORPORA) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_split_is_disjoint_in_file_order_and_covers_the_whole_file(name):
    train = load_texts(f"builtin:{name}", "train")
    val = load_texts(f"builtin:{name}", "validation")
    assert train and val
    docs = _documents(name)
    # The cut is at the first document starting at or past 90% of the characters.
    cut = split_index(docs)
    sizes = [len(d) for d in docs]
    total = sum(sizes)
    assert 10 * sum(sizes[:cut - 1]) < 9 * total <= 10 * sum(sizes[:cut])
    # Validation is the documents from the cut; train those before it, less any that validation also holds (the
    # code and multilingual files repeat a few documents): no text is both trained on and evaluated on.
    assert val == list(docs[cut:]) and train == [d for d in docs[:cut] if d not in set(val)]
    assert not set(train) & set(val)
    # Walk the file: each document must come after the previous one (train before validation), and nothing but
    # separators may lie between them.
    text = builtin_path(name).read_text(encoding="utf-8")
    pos = 0
    for doc in docs:
        start = text.index(doc, pos)
        assert GAP.fullmatch(text[pos:start]), f"text lost before {doc[:60]!r}"
        pos = start + len(doc)
    assert GAP.fullmatch(text[pos:]), "text lost at the end of the file"
    # Validation ends with the end of the file.
    assert text.rstrip().endswith(val[-1])


def test_wiki_is_split_by_article_90_10_by_text_with_raw_tags():
    train = load_texts("builtin:wiki", "train")
    val = load_texts("builtin:wiki", "validation")
    n = len(train) + len(val)
    assert n == 2349  # one per <doc ...> ... </doc> in wiki.utf8
    share = sum(map(len, val)) / sum(map(len, train + val))
    assert abs(share - 0.10) < 0.005  # 10% of the text (wiki ends in short stubs: more than 10% of articles)
    for doc in (train[0], val[0], val[-1]):
        assert doc.startswith("<doc id=") and doc.endswith("</doc>")
    assert all(doc.count("</doc>") == 1 for doc in val)


@pytest.mark.parametrize("name,pattern_doc_count", [("tiny", 317), ("c4", 118)])
def test_document_counts_follow_the_file_markers(name, pattern_doc_count):
    docs = load_texts(f"builtin:{name}", "train") + load_texts(f"builtin:{name}", "validation")
    assert len(docs) == pattern_doc_count
    assert not any("<|endoftext|>" in d for d in docs)


def test_split_documents_trims_and_drops_empty_pieces():
    text = "\n\n  indented first\nsecond line  \n\n\n\n   \nnext\n\n"
    assert split_documents(text, r"\n(?:[ \t]*\n)+") == ["  indented first\nsecond line", "next"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(SlimlmError) as err:
        load_texts("builtin:wikipedia")
    for name in NAMES:
        assert name in str(err.value)


def test_unknown_split_is_refused():
    with pytest.raises(SlimlmError, match="split"):
        load_texts("builtin:wiki", "test")
