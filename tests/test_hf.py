"""Hugging Face GPT-2 weights in and out: the same logits as transformers' GPT2LMHeadModel (offline)."""

import json
import os

import pytest
import torch
from conftest import run_script, tiny_train_args
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gptcraft import export, sample
from gptcraft.errors import GptcraftError
from gptcraft.hf import from_pretrained
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs.checkpoint import load_checkpoint, save_checkpoint
from gptcraft.train import loop

VOCAB = 65  # the size of the Shakespeare character vocabulary, so the finetuning test can use that data


def random_hf_model(folder, tie=True, **save_kwargs):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, tie_word_embeddings=tie)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 initialises biases and LayerNorms to constants: make every weight count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder, **save_kwargs)
    return hf


def assert_same_logits(hf, model):
    idx = torch.randint(0, VOCAB, (2, model.config.block_size))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model.eval()(idx, idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("weights", ["safetensors", "pytorch_model.bin", "untied"])
def test_from_pretrained_matches_transformers(tmp_path, weights):
    hf = random_hf_model(tmp_path, tie=weights != "untied", safe_serialization=weights != "pytorch_model.bin")
    model = from_pretrained(str(tmp_path))
    assert model.config.n_layer == 2 and model.config.block_size == 64
    assert model.config.tie_embeddings == (weights != "untied")
    assert_same_logits(hf, model)


def test_from_pretrained_reads_gpt2model_keys_and_crops_block_size(tmp_path):
    """OpenAI's files on the hub name weights without the 'transformer.' prefix and carry mask buffers."""
    hf = random_hf_model(tmp_path)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    os.remove(tmp_path / "model.safetensors")
    save_file(sd, tmp_path / "model.safetensors")
    model = from_pretrained(str(tmp_path), block_size=16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_from_pretrained_refuses_what_it_cannot_load(tmp_path):
    from gptcraft.hf import HFFormatError

    with pytest.raises(HFFormatError, match="neither a folder nor one of gpt2, gpt2-medium"):
        from_pretrained("gpt3")
    with pytest.raises(HFFormatError, match="has no config.json"):
        from_pretrained(str(tmp_path))
    random_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(HFFormatError, match="activation_function 'relu' is not GPT-2's tanh GELU"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(HFFormatError, match="the weights do not fit its config.json"):
        from_pretrained(str(tmp_path))
    with pytest.raises(HFFormatError, match="block_size 65 exceeds the 64 positions"):
        from_pretrained(str(tmp_path), block_size=65)


def write_run(out_dir, meta_dir, **model_args):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB, **model_args)
    torch.manual_seed(1)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(out_dir / "ckpt.pt", {"model": model.state_dict(), "model_args": args})
    (out_dir / "meta.json").write_text((meta_dir / "meta.json").read_text())
    return model


@pytest.mark.parametrize("bias, tie", [(True, True), (False, False)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tiny_run_dir, capsys, bias, tie):
    model = write_run(tiny_run_dir, tiny_run_dir, bias=bias, tie_embeddings=tie)
    hf_dir = tmp_path / "hf"
    export.main([f"--out_dir={tiny_run_dir}", f"--hf_dir={hf_dir}"])
    assert sorted(os.listdir(hf_dir)) == [".gptcraft-folder", "config.json", "meta.json", "model.safetensors"]
    assert_same_logits(GPT2LMHeadModel.from_pretrained(hf_dir), model)
    # Our own sampler reads the folder back, tokenizer included, and continues the same way.
    common = ["--device=cpu", "--num_samples=1", "--max_new_tokens=20", "--temperature=0", "--start=ROMEO:"]
    capsys.readouterr()
    sample.main([f"--out_dir={tiny_run_dir}", *common])
    from_run = capsys.readouterr().out
    sample.main([f"--init_from={hf_dir}", *common])
    assert capsys.readouterr().out == from_run


@pytest.mark.parametrize(
    "model_args, message",
    [
        (dict(pos_embedding="sinusoidal"), "cannot express pos_embedding='sinusoidal' (GPT-2: 'learned')"),
        (dict(pos_embedding="rope", qk_norm=True), "pos_embedding='rope' (GPT-2: 'learned'), qk_norm=True"),
        (dict(activation="relu2"), "activation='relu2' (GPT-2: 'gelu')"),
        (dict(logit_softcap=30.0), "logit_softcap=30.0 (GPT-2: 0.0)"),
    ],
)
def test_export_refuses_what_gpt2_cannot_express(tmp_path, tiny_run_dir, model_args, message):
    write_run(tiny_run_dir, tiny_run_dir, **model_args)
    with pytest.raises(GptcraftError) as e:
        export.main([f"--out_dir={tiny_run_dir}", f"--hf_dir={tmp_path / 'hf'}"])
    assert message in str(e.value)
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_finetune_and_evaluate_from_a_local_gpt2_folder(tmp_path, char_data_dir, capfd):
    random_hf_model(tmp_path / "hf")
    out = tmp_path / "out"
    args = tiny_train_args(char_data_dir, out, init_from=tmp_path / "hf", max_iters=4, eval_interval=4,
                           n_layer=5, n_embd=48)  # fmt: skip
    loop.main(args)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["model_args"]["n_layer"] == 2  # GPT-2's shape, not the config's
    assert ckpt["model_args"]["block_size"] == 32 and ckpt["model_args"]["bias"]
    assert "eval 4:" in capfd.readouterr().out
    loop.main(tiny_train_args(char_data_dir, tmp_path / "eval", init_from=tmp_path / "hf", eval_only=True))
    assert "eval 0: train loss" in capfd.readouterr().out and not (tmp_path / "eval" / "ckpt.pt").exists()


def test_gpt2_offline_and_wrong_dataset_errors(tmp_path, char_data_dir):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = run_script("train.py", *tiny_train_args(char_data_dir, tmp_path / "out", init_from="gpt2"),
                        check=False, env=env)  # fmt: skip
    assert result.returncode == 2
    assert "cannot get openai-community/gpt2 at revision 607a30d7" in result.stderr
    assert "pass their folder" in result.stderr
    with pytest.raises(GptcraftError, match="init_from='gpt-3' is none of auto, scratch, resume, gpt2"):
        loop.main(tiny_train_args(char_data_dir, tmp_path / "out", init_from="gpt-3"))
