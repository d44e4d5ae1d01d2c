"""Benchmark corpus preparation: prepare/corpus.py against the common reference approach.

python tools/bench_prepare.py         # a 100 MB corpus, both pipelines, 2 workers each
python tools/bench_prepare.py --size_mb 1000 --skip_reference

The corpus is a jsonl of documents of 5 to 60 random tiny-Shakespeare paragraphs, shuffled
and repeated until it holds --size_mb (in whole rounds of about 10 MB). The reference
approach: datasets.map with one encode_ordinary per document (num_proc workers), then one
memmap write per split. Each pipeline runs in its own process; peak RSS is the largest sum
over that process and its workers, sampled every 50 ms; CPU time is theirs together.
Both must produce the same number of tokens.
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

SHARED = os.environ.get("GPTCRAFT_SHARED_DATA", os.path.join("..", "shared", "data"))


def documents(shakespeare, n, rng):
    """n documents, each 5 to 60 consecutive tiny-Shakespeare paragraphs from a random place."""
    with open(shakespeare, encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    docs = []
    for _ in range(n):
        k = rng.randint(5, 60)
        start = rng.randrange(len(paragraphs) - k)
        docs.append("\n\n".join(paragraphs[start : start + k]))
    return docs


def build_corpus(path, shakespeare, size_mb, seed=0):
    """Write 2,000 documents, reshuffled each round, until the file holds at least size_mb
    megabytes (whole rounds of about 10 MB)."""
    rng = random.Random(seed)
    docs = [json.dumps({"text": text}) + "\n" for text in documents(shakespeare, 2000, rng)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            rng.shuffle(docs)
            for line in docs:
                f.write(line)
                written += len(line.encode())
    return written


def tree_rss(pid):
    """Resident bytes of pid and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended meanwhile
    return total


def cpu_seconds():
    """CPU time of the finished children (and theirs, once waited for), user and system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd):
    """Run cmd; return its wall time and CPU time in seconds and its peak tree RSS in bytes."""
    # stderr goes to a file, not a pipe: nothing reads a pipe while the command runs, and its
    # progress bars would fill the pipe's 64 kB buffer and block it for good.
    with tempfile.TemporaryFile("w+") as err:
        start, cpu = time.perf_counter(), cpu_seconds()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        if proc.returncode:
            err.seek(0)
            sys.exit(f"error: {' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return wall, cpu_seconds() - cpu, peak


def reference(corpus, out_dir, tokenizer_file, num_proc):
    """The common approach: a datasets.map over documents, then one memmap write per split."""
    import numpy as np
    from datasets import load_dataset

    from gptcraft.data.tokenizer import GPT2Tokenizer

    enc = GPT2Tokenizer(tokenizer_file).enc
    ds = load_dataset("json", data_files=corpus, split="train", cache_dir=os.path.join(out_dir, "cache"))
    splits = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)

    def encode(example):
        ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]
        return {"ids": ids, "len": len(ids)}

    for name, split in (("train", splits["train"]), ("val", splits["test"])):
        tokenized = split.map(encode, remove_columns=["text"], num_proc=num_proc)
        out = np.memmap(os.path.join(out_dir, f"{name}.bin"), dtype=np.uint16, mode="w+",
                        shape=(sum(tokenized["len"]),))  # fmt: skip
        pos = 0
        batches = min(1024, len(tokenized))  # more batches than documents would fail
        for i in range(batches):
            part = tokenized.shard(num_shards=batches, index=i, contiguous=True).with_format("numpy")
            ids = np.concatenate(part["ids"])
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
        out.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size_mb", type=float, default=100, help="corpus size in megabytes")
    p.add_argument("--num_proc", type=int, default=2, help="worker processes, for both pipelines")
    p.add_argument("--work_dir", help="where the corpus and outputs go (default: a temporary folder, removed)")
    p.add_argument("--tokenizer_file", default=os.path.join(SHARED, "gpt2.tiktoken"))
    p.add_argument("--shakespeare", default=os.path.join(SHARED, "tinyshakespeare.txt"))
    p.add_argument("--skip_reference", action="store_true", help="time prepare/corpus.py only")
    p.add_argument("--reference_only", nargs=2, metavar=("CORPUS", "OUT_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_only:
        return reference(*args.reference_only, args.tokenizer_file, args.num_proc)

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_prepare_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    size = build_corpus(corpus, args.shakespeare, args.size_mb)
    print(f"corpus: {corpus}, {size / 1e6:.0f} MB")
    results = {}
    try:
        ours = os.path.join(work, "ours")
        cmd = [sys.executable, "-m", "gptcraft.prepare.corpus", "--input", corpus, "--out_dir", ours, "--force",
               "--num_proc", str(args.num_proc), "--tokenizer_file", args.tokenizer_file]  # fmt: skip
        wall, cpu, peak = run_measured(cmd)
        with open(os.path.join(ours, "meta.json"), encoding="utf-8") as f:
            tokens = sum(s["tokens"] for s in json.load(f)["splits"].values())
        results["prepare/corpus.py"] = (wall, cpu, peak, tokens)
        if not args.skip_reference:
            ref = os.path.join(work, "reference")
            shutil.rmtree(ref, ignore_errors=True)
            os.makedirs(ref)
            cmd = [sys.executable, __file__, "--reference_only", corpus, ref, "--num_proc", str(args.num_proc),
                   "--tokenizer_file", args.tokenizer_file]  # fmt: skip
            wall, cpu, peak = run_measured(cmd)
            tokens = sum(os.path.getsize(os.path.join(ref, f"{s}.bin")) // 2 for s in ("train", "val"))
            results["reference (datasets.map)"] = (wall, cpu, peak, tokens)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    for name, (wall, cpu, peak, tokens) in results.items():
        print(f"{name:26s} {tokens:,} tokens in {wall:.1f} s: {tokens / wall / 1e6:.2f}M tokens/s, "
              f"{cpu:.1f} CPU s, peak RSS {peak / 1e6:.0f} MB")  # fmt: skip
    if len(results) == 2:
        (a, _, _, ta), (b, _, _, tb) = results.values()
        if ta != tb:
            sys.exit(f"error: the pipelines disagree on the token count ({ta:,} against {tb:,})")
        print(f"speed-up: {b / a:.2f}x")


if __name__ == "__main__":
    main()
