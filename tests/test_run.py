"""slmkit/run.py: what counts as slmkit's own directory, lineage, and the --overwrite guard."""

import json

import pytest

from slmkit import run
from slmkit.errors import SlmError


def _dir(tmp_path, name, meta):
    d = tmp_path / name
    d.mkdir()
    if meta is not None:
        (d / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    (d / "file").write_text("x")
    return d


@pytest.mark.parametrize(("meta", "kind"), [
    ({"kind": "train"}, "train"),
    ({"kind": "slmkit-run/1"}, "train"),  # slmkit 0.1 runs
    ({"kind": "slmkit-run/1", "model_class": "ngram"}, "ngram"),
    ({"format": "slmkit-shards/1"}, "data"),
    ({"model_class": "imported"}, "import"),
    ({"step": 10, "train": {}}, "checkpoint"),
    ({"kind": "something-else"}, None),
    ({"name": "my-npm-package"}, None),  # a meta.json that is not ours
    ("{not json", None),
    ("[1, 2]", None),
    (None, None),
])
def test_kind_of_recognises_old_and_new_directories(tmp_path, meta, kind):
    assert run.kind_of(_dir(tmp_path, "d", meta)) == kind


def test_read_meta_is_one_line_for_every_bad_directory(tmp_path):
    for d, needle in ((tmp_path / "missing", "no such directory"), (_dir(tmp_path, "a", None), "no meta.json"),
                      (_dir(tmp_path, "b", "{"), "not valid JSON"), (_dir(tmp_path, "c", {"x": 1}), "not written by")):
        with pytest.raises(SlmError, match=needle) as e:
            run.read_meta(d)
        assert "\n" not in str(e.value)
    with pytest.raises(SlmError, match=r"holds prepared shards .*, not a model trained"):
        run.read_meta(_dir(tmp_path, "data", {"kind": "data"}), kinds=("train",))


def test_check_out(tmp_path):
    assert run.check_out(tmp_path / "new", overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert run.check_out(tmp_path / "empty", overwrite=False) is False
    ours = _dir(tmp_path, "ours", {"kind": "train"})
    with pytest.raises(SlmError, match="already exists; pass --overwrite"):
        run.check_out(ours, overwrite=False)
    assert run.check_out(ours, overwrite=True) is True
    with pytest.raises(SlmError, match="this command reads"):
        run.check_out(ours, overwrite=True, inputs=(ours / "file",))
    with pytest.raises(SlmError, match="not written by slmkit"):
        run.check_out(_dir(tmp_path, "theirs", None), overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(SlmError, match="is a file"):
        run.check_out(tmp_path / "f", overwrite=True)
    run.clear_out(ours, overwrite=True)
    assert not ours.exists()


def test_new_meta_pins_its_parent(tmp_path):
    parent = _dir(tmp_path, "data", {"kind": "data"})
    meta = run.new_meta("train", parent=parent, recipe={"lr": 1e-3}, model_class="dense", status="running")
    assert meta["kind"] == "train" and meta["schema"] == run.SCHEMA and meta["status"] == "running"
    assert meta["lineage"]["parent"]["kind"] == "data" and len(meta["lineage"]["parent"]["meta_sha256"]) == 64
    assert meta["lineage"]["recipe"] == {"stage": "train", "lr": 1e-3}
    assert meta["versions"]["slmkit"] and meta["created"]
    with pytest.raises(ValueError):
        run.new_meta("no-such-kind")
