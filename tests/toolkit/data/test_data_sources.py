"""load_texts on local files and hub specs: what it reads, and how it refuses bad input."""
import json
import time

import pytest

from slimlm.toolkit.data import check_source, load_texts
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import byte_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird é\n", encoding="utf-8")
    assert load_texts(str(path)) == ["first doc\nstill first", "second doc", "third é"]


def test_txt_split_argument_is_ignored_and_windows_newlines_work(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\n\r\ntwo\r\n")  # BOM and CRLF, as Windows editors write
    assert load_texts(str(path), split="train") == load_texts(str(path)) == ["one", "two"]


def test_txt_old_mac_line_ends_separate_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\rstill one\r\rtwo\r")
    assert load_texts(str(path)) == ["one\nstill one", "two"]


def test_jsonl_text_rows(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "  "}, {"text": "world", "id": 3}])
    assert load_texts(str(path)) == ["hello", "world"]


def test_jsonl_messages_rows_use_the_chat_template(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}, {"text": "plain"}])
    docs = load_texts(str(path), tokenizer=byte_tokenizer())
    assert docs == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n", "plain"]


def test_jsonl_messages_without_tokenizer_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(SlimlmError, match="tokenizer"):
        load_texts(str(path))


def test_jsonl_row_without_text_or_messages_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"prompt": "no"}])
    with pytest.raises(SlimlmError) as err:
        load_texts(str(path))
    msg = str(err.value)
    assert f"{path}:2" in msg and "'text'" in msg and "'messages'" in msg


@pytest.mark.parametrize("row, words", [({"text": None}, "'text' as null (NoneType)"),
                                         ({"text": 5}, "'text' as 5 (int)"),
                                         ({"messages": "hi"}, "'messages' as \"hi\" (str)")])
def test_jsonl_row_of_the_wrong_type_says_what_it_holds(tmp_path, row, words):
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    with pytest.raises(SlimlmError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_texts(str(path))


def test_messages_the_chat_template_refuses_name_the_row(tmp_path):
    """A template that raises (Mistral's, Llama 2's and Gemma's refuse roles that do not alternate) gave an
    internal error: jinja2's TemplateError is not a ValueError."""
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(SlimlmError, match=r"chat\.jsonl:2: the tokenizer's chat template could not render these "
                                          r"messages: TemplateError: Conversation roles must alternate"):
        load_texts(str(path), tokenizer=tok)


def test_jsonl_line_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(SlimlmError, match=r"a\.jsonl:3: not valid JSON"):
        load_texts(str(path))


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", "beta"], "n": [1, 2, 3, 4]}), path)
    assert load_texts(str(path)) == ["alpha", "beta"]


def test_parquet_without_text_column_lists_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["alpha"]}), path)
    with pytest.raises(SlimlmError, match="no 'text' column.*body"):
        load_texts(str(path))


def test_missing_path(tmp_path):
    with pytest.raises(SlimlmError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))


def test_bare_builtin_name_suggests_the_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlimlmError, match="builtin:wiki"):
        load_texts("wiki")


def test_unknown_extension(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(SlimlmError, match="unknown file type '.csv'"):
        load_texts(str(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
@pytest.mark.parametrize("content", ["", " \n\t\n  "])
def test_empty_or_whitespace_file(tmp_path, suffix, content):
    path = tmp_path / f"a{suffix}"
    path.write_text(content)
    with pytest.raises(SlimlmError, match="empty"):
        load_texts(str(path))


@pytest.mark.parametrize("data", [b"text\x00with a NUL", b"caf\xe9 latin-1 bytes"])
def test_binary_file(tmp_path, data):
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    with pytest.raises(SlimlmError, match="binary|UTF-8"):
        load_texts(str(path))


def test_garbage_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(SlimlmError, match="parquet"):
        load_texts(str(path))


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    # The hub libraries read HF_HUB_OFFLINE once at import, so flip their copies as well.
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_hf_unreachable_fails_fast_with_advice(hub_offline):
    start = time.monotonic()
    with pytest.raises(SlimlmError, match="could not reach the Hugging Face hub") as err:
        load_texts("hf:wikitext:wikitext-2-raw-v1:test")
    assert "local" in str(err.value)
    assert time.monotonic() - start < 10


def test_hf_spec_reads_config_and_split(hub_offline, tmp_path):
    # datasets also loads a local folder by path: the spec parsing and split choice, without a hub.
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "t1"}])
    write_jsonl(folder / "validation.jsonl", [{"text": "v1"}, {"text": "v2"}])
    assert load_texts(f"hf:{folder}") == ["v1", "v2"]  # the split argument's default
    assert load_texts(f"hf:{folder}", split="train") == ["t1"]
    assert load_texts(f"hf:{folder}::train", split="validation") == ["t1"]  # the spec wins
    with pytest.raises(SlimlmError, match="split 'test'"):
        load_texts(f"hf:{folder}::test")
    with pytest.raises(SlimlmError, match="cannot parse"):
        load_texts("hf:a:b:c:d")
    with pytest.raises(SlimlmError, match="cannot parse"):  # refused before any model loads
        check_source("hf:a:b:c:d")
    check_source(f"hf:{folder}")


def test_hf_rows_that_are_lines_of_one_text_are_joined_back(hub_offline, tmp_path):
    """wikitext stores each line of its files as a row (an empty row for a blank line): read row by row, an
    end-of-text token came after every line. Rows that are documents stay documents."""
    folder = tmp_path / "lines"
    folder.mkdir()
    rows = ["", " = Title = \n", "", " First paragraph .\n", " Second one .\n", "", " = = Part = = \n", "",
            " = Next = \n", "", " More .\n"]
    write_jsonl(folder / "test.jsonl", [{"text": r} for r in rows])
    # one document per article (a title line starts one; a section heading does not)
    assert load_texts(f"hf:{folder}::test") == [" = Title = \n\n First paragraph .\n Second one .\n\n = = Part = = \n",
                                                " = Next = \n\n More .\n"]
    docs = tmp_path / "docs"
    docs.mkdir()
    write_jsonl(docs / "test.jsonl", [{"text": "a page.\n"}, {"text": "two\nlines.\n"}, {"text": " "}])
    assert load_texts(f"hf:{docs}::test") == ["a page.\n", "two\nlines.\n"]  # a row of several lines: documents


def test_line_rows_without_titles_are_cut_at_blank_lines_past_a_bound(monkeypatch):
    """Joined into one text, wikitext-103's train split (540 MB) would be tokenized in one piece: tens of GB."""
    from slimlm.toolkit.data import sources

    monkeypatch.setattr(sources, "MAX_JOINED_CHARS", 10)
    rows = ["one two three\n", "four\n", "", "five six seven\n", "", "eight\n"]
    assert sources.rows_to_documents(rows) == ["one two three\nfour\n", "five six seven\n", "eight\n"]
    monkeypatch.setattr(sources, "MAX_JOINED_CHARS", 1 << 20)
    assert sources.rows_to_documents(rows) == ["one two three\nfour\n\nfive six seven\n\neight\n"]
