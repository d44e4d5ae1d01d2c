"""Bad input to train.py: one clear error before any training, and nothing on disk lost."""

import os
import shutil

import pytest
import torch
from conftest import run_here, tiny_train_args

from gptcraft.errors import GptcraftError
from gptcraft.train import loop

RUN = {"max_iters": 10, "eval_interval": 10}


@pytest.fixture(scope="module")
def trained(char_data_dir, tmp_path_factory):
    """A finished tiny run to resume from; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    loop.main(tiny_train_args(char_data_dir, out, **RUN))
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def snapshot(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


def refuses(data_dir, out, match, **overrides):
    """train.main refuses the arguments with a GptcraftError matching `match`, changing no file in out."""
    before = snapshot(out) if out.exists() else None
    with pytest.raises(GptcraftError, match=match):
        loop.main(tiny_train_args(data_dir, out, **{**RUN, **overrides}))
    if before is not None:
        assert snapshot(out) == before


def test_out_dir_not_writable(char_data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    refuses(char_data_dir, blocker / "out", r"out_dir .* is not writable .* choose another --out_dir")


def test_resume_without_a_checkpoint(char_data_dir, tmp_path):
    refuses(char_data_dir, tmp_path / "empty", r"init_from=resume but .* holds no checkpoint", init_from="resume")


def test_resume_with_another_model_shape_lists_the_differing_keys(char_data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    refuses(char_data_dir, out, r"holds a different model: n_layer=2 \(this run: 3\).*missing from the checkpoint: "
            r"transformer\.h\.2\.", init_from="resume", n_layer=3)  # fmt: skip
    refuses(char_data_dir, out, r"n_embd=32 \(this run: 64\).*transformer\.wte\.weight: checkpoint \[65, 32\], "
            r"model \[65, 64\]", init_from="resume", n_embd=64, n_head=2)  # fmt: skip


def test_resume_may_change_dropout_and_the_attention_path(char_data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    loop.main(tiny_train_args(char_data_dir, out, init_from="resume", dropout=0.2, attention="explicit",
                               **{**RUN, "max_iters": 12}))  # fmt: skip
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 12 and ckpt["model_args"]["dropout"] == 0.2


def test_resume_with_a_larger_block_size_than_the_model(char_data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    refuses(char_data_dir, out, "block_size 64 is larger than the block_size 32 of the model", init_from="resume",
            block_size=64)  # fmt: skip


def test_checkpoint_with_weights_that_do_not_fit_its_model_args(char_data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["model"]["transformer.h.1.mlp.c_fc.weight"]
    torch.save(ckpt, out / "ckpt.pt")
    refuses(char_data_dir, out, r"inconsistent.*missing from the checkpoint: transformer\.h\.1\.mlp\.c_fc\.weight",
            init_from="resume")  # fmt: skip


def test_checkpoint_whose_model_args_are_absurd(char_data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "n_layer": 10**9}}, out / "ckpt.pt")
    refuses(char_data_dir, out, r"ckpt.pt: its sizes make a model of about .* parameters, .* more than this machine's",
            init_from="resume", max_iters=RUN["max_iters"] + 2)  # fmt: skip


def test_truncated_checkpoint(char_data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 3])
    refuses(char_data_dir, out, "ckpt.pt is truncated or corrupt", init_from="resume")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_carrying_a_pickled_payload(char_data_dir, trained, tmp_path, capfd):
    out = copy_of(trained, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["extra"] = Payload()
    torch.save(ckpt, out / "ckpt.pt")
    refuses(char_data_dir, out, "holds objects that are not plain tensors or values, refused", init_from="resume")
    assert "pwned" not in capfd.readouterr().out  # the payload never ran


def test_block_size_larger_than_the_dataset(char_data_dir, tmp_path):
    # The val split of shakespeare_char holds about 111k tokens.
    refuses(char_data_dir, tmp_path / "out", r"block_size 200000 needs more than .* tokens", block_size=200000)


def test_unknown_device_or_backend(char_data_dir, tmp_path):
    refuses(char_data_dir, tmp_path / "out", "unknown device 'tpu'", device="tpu")
    result = run_here("train.py", *tiny_train_args(char_data_dir, tmp_path / "out", backend="mpi"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: backend must be one of auto, nccl, gloo; got 'mpi'"


def test_an_unprepared_dataset_offline_says_the_one_command_to_run(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(GptcraftError) as e:
        loop.main(tiny_train_args(tmp_path / "data", tmp_path / "out", **RUN))
    message = str(e.value)
    assert message.startswith("dataset shakespeare_char is not prepared and cannot download https://")
    assert message.count("offline") == 1 and "--input=PATH" not in message  # prepare's own hint is not train's
    assert message.endswith(f"--input PATH/TO/tinyshakespeare.txt --out_dir {tmp_path / 'data' / 'shakespeare_char'}")
