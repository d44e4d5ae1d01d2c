"""The GPU paths of parallelize.py and the trainer, run on the CPU: compile under DDP and FSDP2
on 2 gloo processes (with activation checkpointing), FSDP2's mixed-precision policy, DDP's buffers,
and a gradient norm without clipping at grad_clip=0."""

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_train_args
from test_distributed import RUN, torchrun

from gptcraft.model import GPT, GPTConfig
from gptcraft.system.distributed import Dist
from gptcraft.train import loop
from gptcraft.train.parallelize import clip_grad_norm, parallelize

SHORT = {**RUN, "max_iters": 10, "eval_interval": 10}
# Inductor fuses and reorders float32 sums: after 10 AdamW steps at lr 3e-3 the weights of a
# compiled run stay within this of the eager run's.
COMPILED_ATOL = 2e-3


@pytest.fixture(scope="module")
def eager(char_data_dir, tmp_path_factory):
    """best.pt of the uncompiled single-process run."""
    out = tmp_path_factory.mktemp("eager")
    loop.main(tiny_train_args(char_data_dir, out, **SHORT))
    return torch.load(out / "best.pt", weights_only=True)["model"]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_compiled_on_two_gloo_processes_matches_eager(eager, char_data_dir, tmp_path, fsdp):
    out = tmp_path / "compiled"
    # Under FSDP also with activation checkpointing, which compile must trace through.
    torchrun(*tiny_train_args(char_data_dir, out, compile=True, backend="gloo", fsdp=fsdp,
                              activation_checkpointing=fsdp, **SHORT))  # fmt: skip
    compiled = torch.load(out / "best.pt", weights_only=True)
    assert compiled["iter_num"] == 10
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled["model"][name], tensor, rtol=0, atol=COMPILED_ATOL)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one, so that DDP and FSDP2 can wrap a model inside the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Dist()
    dist.destroy_process_group()


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, pos_embedding="rope"))


def test_fsdp_gathers_parameters_in_the_run_dtype(one_process_group):
    model = parallelize(tiny_model(), one_process_group, "cpu", fsdp=True, dtype="bfloat16")
    seen = []
    linear = model.transformer.h[0].attn.c_attn
    linear.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    idx = torch.randint(0, 20, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert seen == [torch.bfloat16]
    assert linear.weight.dtype == linear.weight.grad.dtype == torch.float32  # sharded master weights and grads


def test_ddp_neither_broadcasts_the_fixed_tables_nor_copies_the_gradients(one_process_group):
    ddp = parallelize(tiny_model(), one_process_group, "cpu")
    assert ddp.broadcast_buffers is False and ddp.gradient_as_bucket_view  # no second copy of the gradients


def test_grad_clip_0_measures_the_norm_without_clipping(monkeypatch):
    model = tiny_model()
    idx = torch.randint(0, 20, (2, 8))
    model(idx, idx)[1].backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])

    def no_clipping(*args, **kwargs):
        raise AssertionError("clipping ran at grad_clip=0")

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", no_clipping)
    assert torch.equal(clip_grad_norm(model, 0), expected)
    with pytest.raises(AssertionError, match="clipping ran"):
        clip_grad_norm(model, 1.0)
