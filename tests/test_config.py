import pytest

from slmkit.config import PRESETS, ModelConfig, TrainConfig, coerce_overrides, parse_duration
from slmkit.errors import SlmError
from slmkit.model import GPT


def test_presets_build_and_gpt_nano_matches_nanogpt_cpu_config():
    for name in PRESETS:
        ModelConfig.preset(name, vocab_size=300)
    cfg = ModelConfig.preset("gpt-0.8m", vocab_size=65)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 64)
    # nanoGPT reports 0.80M parameters for this config with its 65-char vocabulary
    assert 0.79e6 < GPT(cfg).num_params() < 0.82e6


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(n_head=5), "n_head=5 must divide n_embd=128"),
        (dict(n_kv_head=3), "n_kv_head=3"),
        (dict(pos="alibi"), "allowed: learned, sinusoidal, rope, none"),
        (dict(dropout=1.5), "dropout"),
        (dict(vocab_size=0), "vocab_size=0"),
    ],
)
def test_invalid_model_config_names_the_field(overrides, needle):
    with pytest.raises(SlmError, match=needle.replace("(", r"\(")):
        ModelConfig(**overrides)


@pytest.mark.parametrize(("overrides", "needle"), [(dict(lr=-1e-3), "lr=-0.001 must be positive"),
                                                   (dict(optimizer="adam"), "allowed: adamw, sgd"),
                                                   (dict(batch_size=0), "batch_size=0"),
                                                   (dict(max_time="soon"), "cannot read duration")])
def test_invalid_train_config_names_the_field(overrides, needle):
    with pytest.raises(SlmError, match=needle):
        TrainConfig(**overrides)


def test_yaml_and_json_round_trip(tmp_path):
    cfg = ModelConfig.preset("llama-3m", vocab_size=1000)
    for name in ("m.yaml", "m.json"):
        cfg.save(tmp_path / name)
        assert ModelConfig.load(tmp_path / name) == cfg
    (tmp_path / "bad.yaml").write_text("n_layers: 3\n")
    with pytest.raises(SlmError, match="unknown ModelConfig field"):
        ModelConfig.load(tmp_path / "bad.yaml")


def test_durations_and_overrides():
    assert parse_duration("5m") == 300 and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert TrainConfig(max_time="2m").max_time == 120
    assert coerce_overrides(ModelConfig, ["n_layer=8", "tie_embeddings=false"]) == {"n_layer": 8,
                                                                                   "tie_embeddings": False}
    with pytest.raises(SlmError, match="unknown ModelConfig field"):
        coerce_overrides(ModelConfig, ["layers=8"])
