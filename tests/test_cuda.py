"""What only a GPU can show (skipped without one); part of the GPU acceptance command in
docs/gpu-acceptance.md."""

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_train_args
from test_loader import shards
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptcraft.data.batches import WindowSampler
from gptcraft.evaluate.loss import split_loss
from gptcraft.model import GPT, GPTConfig
from gptcraft.system.distributed import Dist

pytestmark = pytest.mark.cuda


def gpt2_like():
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=256, dropout=0.0)
    return GPT(config).cuda()


def test_training_forward_runs_on_the_flash_kernel():
    """With every SDPA backend but flash attention disabled, a bf16 training step still runs:
    the model's attention call is one flash accepts (no mask, causal, head size 64)."""
    model = gpt2_like()
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()


def test_no_recompiles_after_warm_up():
    """One training step, one evaluation and one whole-split score compile what they need;
    repeated, they compile nothing more (a short last full_val batch included)."""
    model = gpt2_like()
    model.compile()
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    tokens = np.random.default_rng(0).integers(0, 512, size=3000).astype(np.uint16)  # a short last window

    def one_round():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.train()
            model(idx, idx)[1].backward()
            model.eval()
            with torch.no_grad():
                model(idx, idx)
        split_loss(model, [tokens], 256, 4, "cuda", "bfloat16", Dist())

    one_round()
    torch.compiler.set_stance("fail_on_recompile")
    try:
        one_round()
    finally:
        torch.compiler.set_stance("default")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fsdp_compiled_mixed_precision_on_one_gpu(char_data_dir, tmp_path, dtype):
    out = tmp_path / dtype
    args = tiny_train_args(char_data_dir, out, device="cuda", dtype=dtype, fsdp=True, compile=True,
                           activation_checkpointing=True, max_iters=20, eval_interval=10)  # fmt: skip
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *args)
    assert "skipped step" not in result.stdout
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["iter_num"] == 20 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_batches_reach_the_gpu_as_on_the_cpu(tmp_path):
    """The GPU's batch is one int32 window copied from pinned memory and cut on the device: the
    same tokens as the CPU's."""
    files = shards(tmp_path, [500, 3000])
    cpu, gpu = (WindowSampler(files, 32, 4, 1337, 0, device) for device in ("cpu", "cuda"))
    (x, y), (gx, gy) = cpu.batch(3), gpu.batch(3)
    assert gx.dtype == torch.int64 and torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu())
