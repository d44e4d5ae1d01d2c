"""README.md's commands, run top to bottom in a copy of the repository on the CPU, so that the page
cannot drift from the code. `python -m pytest -m readme` runs this file alone.

Each ```bash block's lines run in order, as a newcomer would type them, with three kinds of change:
- SKIP: lines that need a network, a GPU or a folder the reader fills in, each with its reason;
- SHORT: extra keys that make a run seconds long (appended: later keys win, so nothing else changes);
- LOCAL: placeholders replaced by the test data; the tiny Shakespeare recipes read the local text
  (--input) and GPT-2's BPE ranks come from the local file (GPTCRAFT_TIKTOKEN_FILE).
The data folder is prepared from the local text before the first line, as the first command
would download it.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import GPT2_TIKTOKEN, ROOT, SHAKESPEARE

pytestmark = pytest.mark.readme

# A substring of the line -> why the test does not run it.
SKIP = {
    "../nanoGPT": "a nanoGPT checkout the reader has",
    "pip install": "installs packages (network); the test runs in the installed environment",
    "configs/train_shakespeare_char.py": "the baby GPT, sized for a GPU: many minutes an evaluation on a CPU",
    "--nproc_per_node=8": "8 GPUs",
    "--device=cuda": "a GPU",
    "configs/train_gpt2": "GPT-2 124M on OpenWebText or FineWeb: GPUs and a prepared corpus",
    "init_from=gpt2": "downloads GPT-2 from the Hugging Face hub",
    "prepare/fineweb.py": "downloads FineWeb-Edu",
    "python -m pytest": "the test suite itself",
}
# The program a line starts with -> keys appended to make it short.
SHORT = {
    "train.py": ["--max_iters=20", "--eval_iters=2"],
    "sample.py": ["--max_new_tokens=20"],
    "bench.py": ["--sample_tokens=20"],
    "gptcraft eval": ["--max_tokens=4096"],
}
LOCAL = {
    "path/to/tinyshakespeare.txt": str(SHAKESPEARE),
}


def readme_commands(text):
    """The lines of every ```bash block, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def skip_reason(line):
    return next((why for text, why in SKIP.items() if text in line), None)


def prepared(line):
    """The line as the test runs it: placeholders replaced, comments dropped, SHORT keys added."""
    for text, local in LOCAL.items():
        line = line.replace(text, local)
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|")  # drops comments, keeps the pipe apart
    lexer.whitespace_split = True
    words = list(lexer)
    cuts = [-1] + [i for i, w in enumerate(words) if w == "|"] + [len(words)]
    segments = [words[a + 1 : b] for a, b in zip(cuts, cuts[1:], strict=False)]
    last = segments[-1]
    program = " ".join(last[:2]) if last[0] == "gptcraft" else next((w for w in last if w.endswith(".py")), "")
    last += SHORT.get(program, [])
    if re.search(r"prepare[/ ]shakespeare", line) and "--input" not in last:
        last += ["--input", str(SHAKESPEARE)]  # instead of downloading the text
    return " | ".join(shlex.join(s) for s in segments)


def copy_of_the_repository(dest):
    """The files a clone holds: git's tracked files where git is there, else the tree without runs."""
    try:
        names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                               capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if not p.is_dir()
                 and not {"data", ".git", "__pycache__"} & set(p.relative_to(ROOT).parts)
                 and not p.relative_to(ROOT).parts[0].startswith(("out", "hf-"))]  # fmt: skip
    for name in names:
        if (ROOT / name).exists() or (ROOT / name).is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name, follow_symlinks=False)  # gptcraft/model.py stays a link


def commands_bin(folder):
    """`python`, `gptcraft` and `torchrun` as a user's shell finds them, running this interpreter."""
    folder.mkdir()
    for name, run in (("python", ""), ("gptcraft", "-m gptcraft"), ("torchrun", "-m torch.distributed.run")):
        (folder / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {run} "$@"\n')
        (folder / name).chmod(0o755)
    return folder


def test_the_lists_name_lines_of_the_readme():
    lines = readme_commands((ROOT / "README.md").read_text())
    assert all(any(text in line for line in lines) for text in SKIP), "a SKIP entry matches no README line"
    assert all(any(text in line for line in lines) for text in LOCAL)


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom_on_a_cpu(tmp_path):
    repo = tmp_path / "gptcraft"
    copy_of_the_repository(repo)
    # What the first training command would download, from the local copy.
    subprocess.run([sys.executable, "prepare/shakespeare_char.py", "--input", str(SHAKESPEARE)], cwd=repo,
                   env={**os.environ, "PYTHONPATH": str(repo)}, check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GPTCRAFT_TIKTOKEN_FILE": str(GPT2_TIKTOKEN),
           "PATH": f"{commands_bin(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    ran = []
    for line in readme_commands((repo / "README.md").read_text()):
        if skip_reason(line):
            continue
        command = prepared(line)
        result = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{line}\n{output}"
        # An example that reused an earlier example's out_dir would find nothing to do, or be refused.
        assert "nothing to do" not in output and "Traceback" not in output, f"{line}\n{output}"
        ran.append(line)
    assert len(ran) >= 15
    assert (repo / "out-shakespeare-char-cpu" / "attention.png").exists()
    assert (repo / "hf-shakespeare-char" / "model.safetensors").exists()
