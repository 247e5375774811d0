"""results_table() / print_results(): one row per figure, readable values."""
import io

from rich.console import Console

from slimlm.toolkit.eval import print_results, results_table

PPL = {"perplexity": 6.8012, "nll_per_token": 1.917, "bits_per_byte": 0.9312, "tokens": 51100,
       "bytes": 230000, "windows": 100, "window": 512}
RESULTS = {"model": "smollm2-135m", "perplexity": {"wiki": PPL},
           "tasks": {"mytask": {"acc": 0.62, "acc_norm": 0.65, "n": 200}}}


def render(results) -> list[str]:
    buf = io.StringIO()
    print_results(results, console=Console(file=buf, width=140, color_system=None))
    return buf.getvalue().splitlines()


def test_one_row_per_figure():
    assert results_table(RESULTS).row_count == 4
    lines = render(RESULTS)
    assert any("smollm2-135m" in line for line in lines)
    wiki = [line for line in lines if "wiki" in line]
    assert len(wiki) == 2 and all("perplexity" in line for line in wiki)
    assert "6.80" in wiki[0] and "bits/byte" in wiki[1] and "0.931" in wiki[1]
    task = [line for line in lines if "mytask" in line]
    assert len(task) == 2
    assert "acc" in task[0] and "0.620" in task[0] and "acc_norm" in task[1] and "0.650" in task[1]


def test_missing_bits_per_byte_and_sections():
    r = {"model": "m", "perplexity": {"c4": dict(PPL, bits_per_byte=None)}}
    assert results_table(r).row_count == 1
    assert results_table({"model": "m"}).row_count == 0
    assert not any("bits/byte" in line for line in render(r))


def test_progress_prints_plain_lines_where_stderr_is_no_terminal():
    # In a log file (a pipeline's tee) a rich bar draws nothing; a line each tenth of the way tells how far it got.
    import io

    from rich.console import Console

    from slimlm.toolkit.eval._common import LoggedProgress

    log = io.StringIO()
    with LoggedProgress(console=Console(file=log, force_terminal=False), transient=True) as bar:  # as progress_bar
        task = bar.add_task("GPTQ", total=30)
        for _ in range(30):
            bar.advance(task)
    lines = [line for line in log.getvalue().splitlines() if line.strip()]
    assert lines[0] == "GPTQ: 1/30" and lines[-1] == "GPTQ: 30/30" and 10 <= len(lines) <= 12, lines
    quiet = io.StringIO()
    with LoggedProgress(console=Console(file=quiet, force_terminal=False), disable=True) as bar:
        bar.advance(bar.add_task("x", total=3))
    assert quiet.getvalue() == ""
