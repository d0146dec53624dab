"""The `slm` command: the README's workflow end to end, and one clear line (exit code 2) for each bad input."""

import subprocess
import sys

import pytest

from slmkit.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_train_generate_resume(tmp_path, capsys):
    from tests.conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    assert run_cli(capsys, "data", "prepare", "--corpus", str(corpus), "--tokenizer", "bpe:300", "--out", data,
                   "--quiet")[0] == 0
    tiny = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32"]
    code, out, _ = run_cli(capsys, "train", "--data", data, "--out", run, "--max-steps", "20", "--batch-size", "4",
                           "--eval-interval", "10", "--threads", "1", "--quiet", *tiny)
    assert code == 0 and "finished: step 20" in out
    code, out, _ = run_cli(capsys, "generate", run, "--prompt", "The king", "--max-new-tokens", "20", "--seed", "1")
    assert code == 0 and out.startswith("The king") and len(out) > len("The king\n")
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--max-steps", "30", "--quiet")
    assert code == 0 and "finished: step 30" in out


@pytest.mark.slow
def test_python_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "slmkit", "--help"], capture_output=True, text=True, check=True)
    assert "quickstart" in out.stdout and "examples:" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data", "prepare", "--corpus", "no-such-corpus", "--out", "{tmp}/d"], "unknown corpus 'no-such-corpus'"),
        (["data", "prepare", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/d"], "does not exist"),
        (["data", "prepare", "--corpus", "{tmp}/empty", "--out", "{tmp}/d"], "no text"),
        (["data", "prepare", "--corpus", "{tmp}/blob.bin", "--out", "{tmp}/d"], "unsupported file type"),
        (["data", "prepare", "--corpus", "{tmp}/latin1", "--out", "{tmp}/d"], "is not UTF-8 (byte 0xe9"),
        (["train", "--data", "{tmp}/nodata", "--out", "{tmp}/r", "--max-steps", "5"], "{tmp}/nodata"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-steps", "5", "--lr", "-1"], "lr=-1.0 must be"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-steps", "5", "--set", "n_head=5"], "must divide"),
        (["train", "--data", "{data}", "--out", "{tmp}/r"], "give a budget"),
        (["train", "--resume", "{tmp}/empty"], "not an slmkit directory"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-steps", "5", "--set", "lr=fast"],
         "TrainConfig.lr takes a number, not 'fast'"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--max-steps", "5", "--set", "n_layers=2"],
         "did you mean n_layer"),
        (["train", "--data", "{tmp}/empty", "--out", "{tmp}/r", "--max-steps", "5"], "`slm data prepare`"),
        (["generate", "{tmp}/empty"], "holds no checkpoint"),
        (["generate", "{tmp}/nothing-here"], "no such checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, tiny_data, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/a.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1/a.txt").write_bytes("café au lait\n".encode("latin-1"))
    args = [a.format(tmp=tmp_path, data=tiny_data) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("slm: error: ") and err.count("\n") == 1, err
    assert needle.format(tmp=tmp_path) in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()  # nothing half-written


def test_existing_out_is_refused(tmp_path, capsys):
    from tests.conftest import make_corpus

    corpus = str(make_corpus(tmp_path / "c"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "data", "prepare", "--corpus", corpus, "--out", str(tmp_path / "taken"))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken/keep.txt").read_text() == "precious"


def _example_lines() -> list[str]:
    from slmkit.cli import EXAMPLES, MORE_EXAMPLES

    return [line.split("  #")[0].strip() for line in (EXAMPLES + MORE_EXAMPLES).splitlines()
            if line.strip().startswith("slm ")]


@pytest.mark.parametrize("line", _example_lines())
def test_every_help_example_parses(line):
    import shlex

    from slmkit.cli import build_parser

    args = build_parser().parse_args(shlex.split(line)[1:])  # argparse exits on an unknown flag or a bad choice
    assert callable(args.fn)


def test_subcommand_help_shows_its_own_examples(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    out = capsys.readouterr().out
    examples = out.split("examples:")[1].strip().splitlines()
    assert len(examples) >= 2 and all(line.strip().startswith("slm data prepare ") for line in examples)


def test_stop_escapes_are_read_as_characters():
    from slmkit.cli import unescape

    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"  # an escaped backslash stays one backslash, followed by n
    assert unescape("naïve \\x41 \\q") == "naïve \\x41 \\q"  # other escapes and non-ASCII text pass through


@pytest.mark.parametrize("command", [
    ["train", "--data", "{data}", "--max-steps", "2", "--out", "{out}", "--overwrite"],
    ["train", "--data", "{data}", "--preset", "ngram-3", "--out", "{out}", "--overwrite"],
    ["data", "prepare", "--corpus", "{corpus}", "--tokenizer", "byte", "--out", "{out}", "--overwrite"],
    ["quickstart", "--out", "{out}", "--max-time", "1s"],
])
def test_overwrite_never_deletes_a_directory_slmkit_did_not_write(tmp_path, capsys, tiny_data, command):
    from tests.conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    home = tmp_path / "home"  # say, a typo'd --out
    (home / "src").mkdir(parents=True)
    (home / "src/main.py").write_text("precious")
    args = [a.format(data=tiny_data, out=home, corpus=corpus) for a in command]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "not written by slmkit" in err and err.count("\n") == 1, err
    assert (home / "src/main.py").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "home"]  # quickstart prepared no data either


def test_resume_refuses_flags_it_would_ignore(tmp_path, capsys, tiny_data):
    run = str(tmp_path / "run")
    tiny = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32"]
    assert run_cli(capsys, "train", "--data", str(tiny_data), "--out", run, "--max-steps", "4", "--batch-size", "4",
                   "--threads", "1", "--quiet", *tiny)[0] == 0
    for extra in (["--set", "n_layer=2"], ["--data", str(tiny_data)], ["--lr", "0.1"], ["--out", run],
                  ["--preset", "gpt-0.8m"], ["--train-config", "t.yaml"]):
        code, _, err = run_cli(capsys, "train", "--resume", run, "--max-steps", "8", *extra)
        assert code == 2 and "cannot be given with it" in err and extra[0] in err, (extra, err)
    code, out, _ = run_cli(capsys, "train", "--resume", run, "--max-steps", "6", "--threads", "1", "--quiet")
    assert code == 0 and "finished: step 6" in out and "s wall" in out
