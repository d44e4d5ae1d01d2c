"""HellaSwag scoring on a small fixture in the official jsonl format: a model trained on the right
endings scores 1.0, batched scores equal a direct one-ending-at-a-time computation, and two
torchrun processes count what one does."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, tiny_train_args

from gptcraft.data.shards import write_meta
from gptcraft.data.tokenizer import CharTokenizer
from gptcraft.evaluate import hellaswag
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs.checkpoint import save_checkpoint
from gptcraft.system.distributed import Dist
from gptcraft.track.logfile import read_log
from gptcraft.train import loop

SCENES = [
    ("A man is sitting on a roof. he", ["starts pulling up roofing.", "eats a cake.", "flies away.", "sings loud."], 0),
    ("A cat sees a mouse. the cat", ["reads a book.", "chases the mouse.", "drives off.", "paints."], 1),
    ("The kids are at the beach. they", ["file taxes.", "knit socks.", "build a sand castle.", "sleep."], 2),
    ("A woman holds a violin. she", ["cooks rice.", "jumps.", "mows grass.", "plays a slow tune on it."], 3),
    ("Rain falls on the town. people", ["open their umbrellas.", "ski.", "bake.", "dance on the moon."], 0),
]


def write_fixture(path, scenes=SCENES):
    """The official jsonl layout: one example per line with ind, activity_label, ctx_a, ctx_b, ctx, ..."""
    with open(path, "w") as f:
        for i, (ctx, endings, label) in enumerate(scenes):
            ctx_a, _, ctx_b = ctx.rpartition(". ")
            row = {"ind": i, "activity_label": "Test", "ctx_a": ctx_a + ".", "ctx_b": ctx_b, "ctx": ctx,
                   "split": "val", "split_type": "indomain", "label": label, "endings": endings,
                   "source_id": f"fixture~{i}"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_text("".join(c + " " + " ".join(e) for c, e, _ in SCENES))


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size, dropout=0.0))


def test_a_model_trained_on_the_right_endings_scores_one(tok, tmp_path):
    model = tiny_model(tok.vocab_size)
    right = [tok.encode(ctx + " " + endings[label]) for ctx, endings, label in SCENES]
    width = max(map(len, right))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in right])  # (5, width), right-padded
    targets = torch.tensor([r[1:] + [-1] * (width - len(r)) for r in right])  # -1: padding, not learnt
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):  # memorise the five right sentences
        _, loss = model(ids[:, :-1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    examples = hellaswag.read_examples(write_fixture(tmp_path / "val.jsonl"))
    result = hellaswag.score(model, tok, examples, 64, "cpu", "float32", Dist())
    assert result == {"acc": 1.0, "acc_norm": 1.0, "acc_norm_tokens": 1.0, "examples": 5}


def test_batched_scores_equal_a_direct_computation(tok, tmp_path):
    model = tiny_model(tok.vocab_size, seed=3).eval()
    examples = hellaswag.read_examples(write_fixture(tmp_path / "val.jsonl"))
    picks = []
    for ctx, endings, label in examples:
        sums, means, per_char = [], [], []
        for ending in endings:  # one ending at a time, no padding
            ctx_ids, end_ids = tok.encode(ctx), tok.encode(" " + ending)
            ids = torch.tensor(ctx_ids + end_ids)
            logits, _ = model(ids[None, :-1], ids[None, 1:])
            token_losses = F.cross_entropy(logits[0], ids[1:], reduction="none")[-len(end_ids) :]
            sums.append(token_losses.sum().item())
            means.append(token_losses.mean().item())
            per_char.append(token_losses.sum().item() / len(ending))
        rows, lengths = hellaswag.render((ctx, endings, label), tok, 64)
        batched_sums, batched_means = hellaswag.ending_losses(model, rows, lengths, "cpu", 64)
        assert batched_sums.tolist() == pytest.approx(sums, rel=1e-5)
        assert batched_means.tolist() == pytest.approx(means, rel=1e-5)
        picks.append([min(range(4), key=scores.__getitem__) == label for scores in (sums, per_char, means)])
    for batch_size in (1, 3):  # a last batch shorter than the others
        result = hellaswag.score(model, tok, examples, 64, "cpu", "float32", Dist(), batch_size)
        expected = [sum(p[i] for p in picks) / 5 for i in range(3)]
        assert [result["acc"], result["acc_norm"], result["acc_norm_tokens"]] == expected


class Unigram(torch.nn.Module):
    """A model that gives every next token the same fixed probabilities, whatever came before:
    each token's loss is -log p(token), so an ending's scores can be worked out by hand."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs).log())

    def forward(self, idx, targets=None):
        return self.logits.expand(*idx.shape, -1), None  # (B, T, V)


def test_the_three_normalisations_by_hand(tmp_path):
    """Characters " ", a, b, c with probabilities 1/2, 1/4, 1/8, 1/8 cost 1, 2, 3, 3 units of ln 2.
    An ending is scored over " " + ending: its tokens number len(ending) + 1 here, its characters
    len(ending) (lm-evaluation-harness counts the ending without the space before it).

        ending    sum  per token  per character
        a          3   1.5        3               example 1, label 0: acc and acc_norm_tokens
        aa         5   1.67       2.5             pick "a", acc_norm "aaaa"
        aaaa       9   1.8        2.25
        b          4   2          4
        b          4   2          4               example 2, label 1: acc picks "b",
        aaa        7   1.75       2.33            acc_norm_tokens "aaa", acc_norm "aaaaaaaa"
        aaaaaaaa  17   1.89       2.125
        cccccc    19   2.71       3.17
    """
    scenes = [("c", ["a", "aa", "aaaa", "b"], 0), ("c", ["b", "aaa", "aaaaaaaa", "cccccc"], 1)]
    examples = hellaswag.read_examples(write_fixture(tmp_path / "two.jsonl", scenes))
    tok, model = CharTokenizer([" ", "a", "b", "c"]), Unigram([1 / 2, 1 / 4, 1 / 8, 1 / 8])
    sums, means = hellaswag.ending_losses(model, *hellaswag.render(examples[0], tok, 64), "cpu", 64)
    assert sums.tolist() == pytest.approx([3 * math.log(2), 5 * math.log(2), 9 * math.log(2), 4 * math.log(2)])
    assert means.tolist() == pytest.approx([1.5 * math.log(2), 5 / 3 * math.log(2), 1.8 * math.log(2), 2 * math.log(2)])
    result = hellaswag.score(model, tok, examples, 64, "cpu", "float32", Dist())
    assert result == {"acc": 0.5, "acc_norm": 0.0, "acc_norm_tokens": 1.0, "examples": 2}


def test_a_long_context_is_cut_from_the_left(tok):
    rows, lengths = hellaswag.render(("a cat sees " * 20, ["the mouse."] * 4, 0), tok, 32)
    assert all(len(r) == 33 for r in rows) and lengths == [len(tok.encode(" the mouse."))] * 4


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 1: not a HellaSwag example"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}', "line 1: needs a text ctx, 4 text endings"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "and a label 0 to 3"),
    ],
)
def test_bad_files_are_refused_with_the_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(hellaswag.HellaSwagError, match=message):
        hellaswag.read_examples(tmp_path / "bad.jsonl")


@pytest.fixture
def run_dir(tmp_path, tok):
    model = tiny_model(tok.vocab_size, seed=5)
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "model_args": vars(model.config)})
    write_meta(out, tok.meta())
    return out


def test_the_command_in_one_and_two_processes(run_dir, tmp_path, capsys):
    fixture = write_fixture(tmp_path / "val.jsonl")
    args = [f"--out_dir={run_dir}", f"--file={fixture}", "--device=cpu", "--batch_size=2"]
    one = hellaswag.main(args)
    printed = (f"acc {one['acc']:.4f}, acc_norm {one['acc_norm']:.4f} (per character, as "
               f"lm-evaluation-harness), acc_norm_tokens {one['acc_norm_tokens']:.4f} (per token, as "
               f"build-nanogpt) over 5 examples")  # fmt: skip
    assert printed in capsys.readouterr().out
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptcraft",
                     "hellaswag", *args, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert two.stdout.count("hellaswag: acc") == 1  # printed by rank 0
    assert printed in two.stdout


def test_a_missing_file_is_one_line(run_dir, tmp_path):
    with pytest.raises(hellaswag.HellaSwagError, match="cannot read HellaSwag file"):
        hellaswag.main([f"--out_dir={run_dir}", f"--file={tmp_path / 'none.jsonl'}", "--device=cpu"])


def test_training_scores_hellaswag_at_each_evaluation(char_data_dir, tmp_path, capsys):
    fixture = write_fixture(tmp_path / "val.jsonl")
    out = tmp_path / "out"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=4, eval_interval=2, hellaswag_file=fixture))
    rows = [r for r in read_log(out) if "val_loss" in r]
    assert [r["iter"] for r in rows] == [0, 2, 4]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # the weights of the last evaluation
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    char_tok = CharTokenizer(json.loads((out / "meta.json").read_text())["chars"])
    direct = hellaswag.score(model, char_tok, hellaswag.read_examples(fixture), 32, "cpu", "float32", Dist())
    logged = [rows[-1][f"hellaswag_{key}"] for key in ("acc", "acc_norm", "acc_norm_tokens")]
    assert logged == [direct["acc"], direct["acc_norm"], direct["acc_norm_tokens"]]
    assert "hellaswag acc " in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(hellaswag.HellaSwagError, match="bad.jsonl, line 1"):
        loop.main(tiny_train_args(char_data_dir, tmp_path / "out2", hellaswag_file=tmp_path / "bad.jsonl"))
    assert not (tmp_path / "out2" / "log.jsonl").exists()  # refused before the run started


def test_the_download_is_pinned_by_the_sha256_recorded_at_first_download(run_dir, tmp_path, monkeypatch, capsys):
    """No public record of the official file's sha256 was found: the first download's is kept beside
    it, and a cached file that changed since (or differs from --sha256) is refused."""
    import hashlib
    import io
    import urllib.request

    fixture = write_fixture(tmp_path / "official.jsonl").read_bytes()
    monkeypatch.setattr(hellaswag, "VAL_EXAMPLES", len(fixture.splitlines()))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(fixture))
    cache = tmp_path / "cache"
    args = [f"--out_dir={run_dir}", "--device=cpu", f"--cache_dir={cache}"]
    hellaswag.main(args)
    digest = hashlib.sha256(fixture).hexdigest()
    assert (cache / "hellaswag_val.jsonl.sha256").read_text() == f"{digest}  hellaswag_val.jsonl\n"
    assert f"sha256 {digest}, recorded in" in capsys.readouterr().out
    hellaswag.main([*args, f"--sha256={digest.upper()}"])
    with pytest.raises(hellaswag.HellaSwagError, match=rf"has sha256 \w+, not {'0' * 64} \(--sha256\)"):
        hellaswag.main([*args, f"--sha256={'0' * 64}"])
    (cache / "hellaswag_val.jsonl").write_bytes(fixture.replace(b'"label": 0', b'"label": 1', 1))  # tampered
    with pytest.raises(hellaswag.HellaSwagError, match=rf"not {digest} \(recorded in .*sha256 at its download\)"):
        hellaswag.main(args)
    (cache / "hellaswag_val.jsonl.sha256").unlink()
    with pytest.raises(hellaswag.HellaSwagError, match="no readable .*sha256 recorded at its download: delete"):
        hellaswag.main(args)


def test_text_outside_a_character_vocabulary_is_one_line_before_any_compute(run_dir, char_data_dir, tmp_path):
    """A character model knows only its training text's characters: HellaSwag text with others
    (here a tab, which neither vocabulary holds) is refused up front, by the
    command and by a training run, which then writes nothing."""
    fixture = write_fixture(tmp_path / "val.jsonl", [(SCENES[0][0] + "\t", SCENES[0][1], 0), *SCENES[1:]])
    with pytest.raises(hellaswag.HellaSwagError, match=r"val.jsonl: characters not in the vocabulary: '\\t'"):
        hellaswag.main([f"--out_dir={run_dir}", f"--file={fixture}", "--device=cpu"])
    out = tmp_path / "out"
    with pytest.raises(hellaswag.HellaSwagError, match=r"val.jsonl: characters not in the vocabulary: '\\t'"):
        loop.main(tiny_train_args(char_data_dir, out, max_iters=2, hellaswag_file=fixture))
    assert not out.exists() or not list(out.iterdir())
