"""Inference formats: the dtype chosen per machine, int8 and int4 weights close to the float ones,
and a trained model's loss nearly unchanged by them."""

import pytest
import torch
from conftest import run_script, tiny_train_args

from gptcraft.evaluate import cli as evaluate
from gptcraft.model import GPT, GPTConfig
from gptcraft.quantize import (
    GROUP_SIZE,
    KERNEL_ROWS,
    Int4Linear,
    Int8Linear,
    QuantizeError,
    check_scheme,
    prepare,
    weight_bytes,
)
from gptcraft.system import hardware


def flags(monkeypatch, bf16):
    """This CPU as torch would report it: AVX2, with or without avx512_bf16."""
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_auto_dtype_is_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    flags(monkeypatch, bf16=True)
    assert hardware.cpu_flags() == ["AVX2", "AVX-512", "avx512_bf16"]
    dtype, why = hardware.inference_dtype("auto", "cpu")
    assert dtype == "bfloat16" and "avx512_bf16" in why
    flags(monkeypatch, bf16=False)
    dtype, why = hardware.inference_dtype("auto", "cpu")
    assert dtype == "float32" and "no native bfloat16" in why
    assert hardware.inference_dtype("bfloat16", "cpu")[0] == "bfloat16"  # asked for: kept
    assert hardware.resolve_dtype("auto", "cpu") == "float32"  # training keeps its rule


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_dtype_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert hardware.inference_dtype("auto", "cuda")[0] == expected


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=128)).eval()


def test_int8_weights_round_to_the_nearest_step_of_their_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    q = Int8Linear(linear)
    w = linear.weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1): one scale per output channel
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    assert ((q.weight.float() * step - w).abs() <= step / 2 + 1e-7).all()
    for shape in ((1, 64), (3, 5, 64), (4, KERNEL_ROWS, 64)):  # the int8 kernel's path, then converted weights
        x = torch.randn(shape)
        expected = x @ (q.weight.float() * step).T + linear.bias  # the int8 weights times their scales
        assert (q(x) - expected).norm() < 0.01 * expected.norm()  # bf16 rounding of activations at most


def test_int4_groups_have_their_own_scale_and_zero():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 16, bias=False)
    q = Int4Linear(linear)
    w = linear.weight.detach().reshape(16, 128 // GROUP_SIZE, GROUP_SIZE)
    step = (w.amax(-1) - w.amin(-1)) / 15  # (out, groups)
    assert q.scales_and_zeros.shape == (128 // GROUP_SIZE, 16, 2)
    torch.testing.assert_close(q.scales_and_zeros[..., 0].float().T, step, rtol=1e-2, atol=0)
    x = torch.eye(128)  # each output row of x W^T is one input column of W: the dequantized weights
    dequantized = q(x).T.reshape(16, 128 // GROUP_SIZE, GROUP_SIZE)
    assert ((dequantized - w).abs() <= step[..., None] * 0.51 + 2e-3).all()  # half a step, and bf16 rounding


@pytest.mark.parametrize("scheme, tolerance", [("int8", 0.01), ("int4", 0.1)])
def test_quantized_logits_are_close_to_float32(scheme, tolerance):
    model = small_model()
    idx = torch.randint(0, 64, (2, 32))
    expected, _ = model(idx, idx)
    quantized = prepare(small_model(), torch.float32, scheme)
    got, _ = quantized(idx, idx)
    assert isinstance(quantized.lm_head, Int8Linear if scheme == "int8" else Int4Linear)
    assert quantized.transformer.wte.weight.dtype == torch.float32  # the lookup stays in float
    spread = expected.std()
    assert (got - expected).abs().mean() < tolerance * spread
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_weight_bytes_of_each_format():
    model = small_model()
    # per block: c_attn 128x384, attn.c_proj 128x128, c_fc 128x512, mlp.c_proj 512x128, their biases and
    # two LayerNorms (weight and bias of 128); then ln_f and the head tied to the 64-token embedding.
    matrices = 2 * (128 * 384 + 128 * 128 + 128 * 512 + 512 * 128) + 64 * 128
    rows = 2 * (384 + 128 + 512 + 128) + 64
    vectors = 2 * (384 + 128 + 512 + 128 + 4 * 128) + 2 * 128
    assert weight_bytes(model) == 4 * (matrices + vectors)
    assert weight_bytes(prepare(small_model(), torch.bfloat16)) == 2 * (matrices + vectors)
    assert weight_bytes(prepare(small_model(), torch.float32, "int8")) == matrices + 2 * rows + 4 * vectors


def test_schemes_without_a_kernel_are_refused_in_one_line():
    check_scheme("int8", "cuda:1")
    for scheme in ("int8", "int4"):
        with pytest.raises(QuantizeError, match=f"quantize={scheme} has no kernel on mps"):
            check_scheme(scheme, "mps")
    with pytest.raises(QuantizeError, match="choose one of none, int8, int4"):
        check_scheme("int2", "cpu")


@pytest.fixture(scope="module")
def trained_run(char_data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("trained")
    run_script("train.py", *tiny_train_args(char_data_dir, out_dir, n_embd=64, max_iters=60, lr_decay_iters=60))
    return out_dir


@pytest.mark.parametrize("args, tolerance", [(["--quantize=int8"], 0.01), (["--dtype=bfloat16"], 0.005)])
def test_a_trained_models_loss_hardly_moves(trained_run, char_data_dir, args, tolerance, capsys):
    common = [f"--out_dir={trained_run}", f"--data_dir={char_data_dir}", "--dataset=shakespeare_char",
              "--device=cpu", "--max_tokens=16384"]  # fmt: skip
    reference = evaluate.main([*common, "--dtype=float32"])
    assert reference < 3.5  # trained: a uniform guess over 65 characters scores 4.17
    loss = evaluate.main([*common, *args])
    assert abs(loss - reference) < tolerance * reference
    assert loss != reference  # the format did change the weights
    assert "quantized to int8" in capsys.readouterr().err or args != ["--quantize=int8"]
