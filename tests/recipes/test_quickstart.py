"""`slm quickstart` end to end on the real built-in corpus, with a seconds-long budget."""

import pytest

from slmkit.cli import main


@pytest.mark.slow
def test_quickstart_writes_a_report(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--max-time", "6s", "--preset", "llama-0.8m", "--threads", "1",
                 "--quiet"])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "val bits per byte" in report and "folio (out of domain)" in report and "ROMEO:" in report
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists()
    # run again: the prepared data is reused and the previous quickstart replaced
    assert main(["quickstart", "--out", str(out), "--max-time", "3s", "--preset", "llama-0.8m", "--threads", "1",
                 "--quiet"]) == 0
    assert "reusing prepared data" in capsys.readouterr().out
