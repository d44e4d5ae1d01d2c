"""Any text corpus into GPT-2 token shards: a Hugging Face dataset, or local txt/jsonl/parquet files.

python prepare/corpus.py --input 'books/*.txt' --out_dir data/books
python prepare/corpus.py --dataset openwebtext --out_dir data/openwebtext --num_proc 8

Documents are streamed in chunks of about a million characters to --num_proc worker
processes, which encode them with GPT-2's ordinary encoding and an end-of-text token after
each. A seeded draw per document sends it to val (about --val_fraction of them). Tokens go
to shards of --shard_tokens tokens as they come, so memory is bounded by the chunks in
flight, not by the corpus; the order of the output does not depend on --num_proc.

The dataset is built in a folder beside --out_dir (OUT_DIR.tmp) and swapped in whole when it is
complete, so --out_dir always holds either the old dataset or the new one (files other than
token files, meta.json and progress.json are carried over). Each finished shard is recorded in
OUT_DIR.tmp/progress.json; an interrupted run started again with the same arguments resumes
from the last finished train shard. Running again on a complete dataset does nothing.
"""

import argparse
import glob
import json
import multiprocessing
import os
import sys
import threading

import numpy as np
from tqdm import tqdm

from gptcraft.config import command_name
from gptcraft.data.shards import (
    META,
    SPLITS,
    ShardWriter,
    TokenFileError,
    is_dataset_file,
    read_meta,
    shard_meta,
    shard_version,
    write_meta,
)
from gptcraft.data.tokenizer import GPT2Tokenizer, TokenizerError
from gptcraft.errors import GptcraftError
from gptcraft.files import carry_over, make_dir, remove_dir, replaceable_dir, staging_dir, swap_dir, write_atomic

CHUNK_CHARS = 1 << 20  # documents per task: about a million characters, whatever --num_proc
PROGRESS = "progress.json"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(GptcraftError, RuntimeError):
    """Bad input or output directory; the message says what and how to fix it."""


# ----------------------------------------------------------------------------- input


def builder_of(path):
    """The datasets builder that reads path, by its extension; None for another kind of file."""
    return BUILDERS.get(os.path.splitext(path)[1].lower())


def local_files(patterns):
    """Expand files, folders and glob patterns; check every file is readable and of one kind."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if builder_of(f))
        else:
            found = sorted(glob.glob(pattern)) or [pattern]
        if not found:
            raise CorpusError(f"--input {pattern} is a folder without .txt, .jsonl, .json or .parquet files")
        files += found
    for path in files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise CorpusError(f"cannot read --input file {path}: {e.strerror}") from None
    kinds = {builder_of(f) for f in files}
    if None in kinds or len(kinds) > 1:
        raise CorpusError(f"--input files must all be .txt, all .jsonl/.json or all .parquet; got {', '.join(files)}")
    return [os.path.abspath(f) for f in files], kinds.pop()


# Hub datasets are read at a pinned commit where one is known, so that preparing again reads the same
# documents; --revision reads another (a commit, branch or tag; main: the newest).
DATASET_REVISIONS = {
    "openwebtext": "b4325f019c648b1641a1784748667e8b74e5e064",
    "HuggingFaceFW/fineweb-edu": "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9",
}


def dataset_revision(args):
    return args.revision or DATASET_REVISIONS.get(args.dataset, "main")


def describe_source(args, files):
    """What the output is made of: stored in meta.json, compared on every later run."""
    if args.input:
        source = {"files": [[f, os.path.getsize(f)] for f in files], "txt_sample_by": args.txt_sample_by}
    else:
        source = {"dataset": args.dataset, "revision": dataset_revision(args), "name": args.name, "split": args.split}
    return {**source, "text_column": args.text_column, "val_fraction": args.val_fraction, "seed": args.seed,
            "shard_tokens": args.shard_tokens, "tokenizer": "gpt2"}  # fmt: skip


def open_corpus(args, files, builder):
    """The documents as a datasets Dataset or IterableDataset, and a name for messages."""
    # Left to itself, datasets imports torch when it is installed: 500 MB resident, unused here.
    os.environ.setdefault("USE_TORCH", "0")
    import datasets

    if args.input:
        where = files[0] if len(files) == 1 else f"{len(files)} {builder} files"
    else:
        where = f"dataset {args.dataset} at revision {dataset_revision(args)}"
    try:
        if args.input:
            # json: read 1 MB blocks, not datasets' default 10 MB, which costs about 60 MB resident.
            options = {"text": {"sample_by": args.txt_sample_by}, "json": {"chunksize": 1 << 20}}.get(builder, {})
            # Local files are always streamed: bounded memory, no copy in the datasets cache.
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **options)
        else:
            ds = datasets.load_dataset(args.dataset, args.name, split=args.split, streaming=args.streaming,
                                       revision=dataset_revision(args))  # fmt: skip
    except Exception as e:  # datasets raises many kinds: missing dataset, bad split, no network
        raise CorpusError(f"cannot open {where}: {type(e).__name__}: {e}") from None
    return ds, where


def chunks(ds, where, text_column):
    """Lists of non-empty document texts of about CHUNK_CHARS characters each."""
    chunk, size = [], 0
    batches = ds.iter(batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as e:  # a damaged file surfaces here, from pyarrow or datasets
            raise CorpusError(f"cannot read {where}: {type(e).__name__}: {e}") from None
        if text_column not in batch:
            raise CorpusError(
                f"{where} has no column {text_column!r} (it has {', '.join(batch)}); pass --text_column NAME"
            )
        for text in batch[text_column]:
            if not text:
                continue
            if not isinstance(text, str):
                raise CorpusError(
                    f"{where}: column {text_column!r} holds {type(text).__name__} values, not text; "
                    "pass --text_column NAME"
                )
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- tokenization (worker side)

_tokenizer = None


def init_worker(tokenizer_file):
    global _tokenizer
    _tokenizer = GPT2Tokenizer(tokenizer_file)


def encode_chunk(job):
    """(tag, texts, is_val) -> (tag, ids, lengths, is_val): every document's tokens followed by an
    end-of-text token, concatenated as uint16; lengths[i] counts document i's, end-of-text included."""
    tag, texts, is_val = job
    eot = np.array([_tokenizer.eot_token], dtype=np.uint32)
    parts = [part for text in texts for part in (_tokenizer.encode_array(text), eot)]
    lengths = np.array([len(p) for p in parts[::2]], dtype=np.int64) + 1
    # uint16: GPT-2's ids fit, and the workers send back half the bytes.
    ids = np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, np.uint16)
    return tag, ids, lengths, is_val


# ----------------------------------------------------------------------------- output directory


def our_files(folder):
    """Files a run of this script may have left in folder."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [n for n in names if is_dataset_file(n)]


def check_out_dir(out_dir, source, force):
    """'done' if out_dir already holds this dataset, else the progress to resume from in the
    staging folder beside it (or None to start afresh there). Refuses to replace other data unless
    force, which also discards an unfinished run; out_dir itself changes only when the new dataset
    is complete, and only a folder gptcraft made is ever replaced or deleted."""
    found = our_files(out_dir)
    if not force and META in found and read_meta(out_dir).get("source") == source:
        return "done"
    way_out = "choose another --out_dir"
    staging = staging_dir(replaceable_dir(out_dir, way_out))
    progress = None
    if not force:  # force: without reading what is there, it may be damaged
        if META in found:
            refuse(out_dir, "a different dataset")
        if found:
            refuse(out_dir, f"token files of an unknown dataset ({', '.join(sorted(found)[:3])})")
        if os.path.exists(os.path.join(staging, PROGRESS)):
            progress = read_progress(os.path.join(staging, PROGRESS))
            if progress["source"] != source:
                refuse(staging, "an unfinished run with other input or settings")
    if progress is None:
        remove_dir(staging, way_out=way_out)
        make_dir(staging)
    return progress


def read_progress(path):
    """An unfinished run's progress.json (written by Pipeline.on_shard), checked field by field."""

    def count(v):
        return type(v) is int and v >= 0

    def shard(entry):  # a finished shard: a plain file name in the staging folder, and its tokens
        name = entry["file"]
        plain = isinstance(name, str) and name == os.path.basename(name) not in ("", ".", "..")
        return plain and count(entry["tokens"])

    try:
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
        shards, resume, max_token = progress["shards"], progress["resume"], progress["max_token"]
        ok = (isinstance(progress["source"], dict) and isinstance(resume, list) and len(resume) == 2
              and all(map(count, resume)) and all(count(max_token[s]) for s in SPLITS)
              and all(shard(e) for s in SPLITS for e in shards.get(s, ())))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError is a ValueError
        ok = False
    if not ok:
        raise CorpusError(f"{path} is damaged; pass --force to prepare afresh (the unfinished run is discarded)")
    return progress


def refuse(folder, what):
    raise CorpusError(f"{folder} holds {what}; choose another --out_dir or pass --force to replace it")


# ----------------------------------------------------------------------------- the pipeline


def prepare(args):
    """Write the dataset that args describe into args.out_dir; return its meta.json content."""
    if not 0 < args.val_fraction < 1:
        raise CorpusError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.shard_tokens <= 0 or args.num_proc <= 0:
        raise CorpusError("--shard_tokens and --num_proc must be positive")
    files, builder = local_files(args.input) if args.input else (None, None)  # checks they can be read
    source = describe_source(args, files)
    tokenizer = GPT2Tokenizer(args.tokenizer_file)
    # --force discards an unfinished run: only once the new source has opened and its first documents read.
    opened = open_corpus(args, files, builder) if args.force else None
    if opened:
        next(chunks(*opened, args.text_column), None)
    progress = check_out_dir(args.out_dir, source, args.force)
    if progress == "done":
        print(f"{args.out_dir} already holds this dataset; nothing to do (--force prepares it again)")
        return read_meta(args.out_dir)
    ds, where = opened or open_corpus(args, files, builder)
    return Pipeline(args, tokenizer, source, progress or {}).run(ds, where)


class Pipeline:
    """One pass over the corpus: encoded chunks are routed, in order, to the train and val writers."""

    def __init__(self, args, tokenizer, source, progress):
        self.args, self.tokenizer, self.source = args, tokenizer, source
        self.final = os.path.realpath(args.out_dir)  # a link named as --out_dir is followed
        self.dir = staging_dir(self.final)  # swapped in for it when complete
        done = progress.get("shards", {})
        # Resume: train goes on from the chunk in which the last train shard ended, dropping
        # what that shard already holds; val starts over (val documents of the chunks before
        # are encoded again, a small fraction of the corpus) dropping what its shards hold.
        self.resume = progress.get("resume", [0, 0])
        skips = {"train": self.resume[1], "val": sum(s["tokens"] for s in done.get("val", ()))}
        shape = (args.shard_tokens, shard_version(tokenizer.vocab_size))
        self.writers = {
            split: ShardWriter(self.dir, split, *shape, done.get(split, ()), skips[split], self.on_shard)
            for split in SPLITS
        }
        self.resume_doc = self.resume[0]
        self.chunk_start = (0, 0)  # first document and train stream position of the chunk being routed
        self.documents = dict.fromkeys(SPLITS, 0)
        self.max_token = progress.get("max_token", dict.fromkeys(SPLITS, 0))

    def jobs(self, texts_in_chunks, in_flight):
        """((first document, documents), texts, is_val) per chunk. Chunks before the resume point
        carry only their val documents."""
        rng = np.random.default_rng(self.args.seed)
        first = 0
        for texts in texts_in_chunks:
            n = len(texts)
            is_val = rng.random(n) < self.args.val_fraction  # one draw per document, in corpus order
            if first < self.resume_doc:
                texts, is_val = [t for t, v in zip(texts, is_val, strict=True) if v], is_val[is_val]
            in_flight.acquire()  # released as results are taken: bounds the chunks in memory
            yield (first, n), texts, is_val
            first += n

    def route(self, result):
        """Write one encoded chunk's tokens to the train and val writers, in document order."""
        (first, n), ids, lengths, is_val = result
        n_val = int(is_val.sum())  # before the resume point is_val lists the val documents only
        self.documents["val"] += n_val
        self.documents["train"] += n - n_val
        self.chunk_start = (first, self.writers["train"].position)
        token_is_val = np.repeat(is_val, lengths)  # (len(ids),)
        for split, part in (("train", ids[~token_is_val]), ("val", ids[token_is_val])):
            if len(part):
                self.max_token[split] = max(self.max_token[split], int(part.max()))
                self.writers[split].write(part)

    def on_shard(self, writer):
        if writer is self.writers["train"]:
            first, position = self.chunk_start
            self.resume = [first, writer.finished - position]
        progress = {"source": self.source, "shards": {s: w.shards for s, w in self.writers.items()},
                    "resume": self.resume, "max_token": self.max_token}  # fmt: skip
        text = json.dumps(progress, indent=1).encode()
        write_atomic(os.path.join(self.dir, PROGRESS), lambda f: f.write(text))

    def run(self, ds, where):
        args = self.args
        in_flight = threading.Semaphore(2 * args.num_proc + 2)
        jobs = self.jobs(chunks(ds, where, args.text_column), in_flight)
        pool = None
        if args.num_proc > 1:
            pool = multiprocessing.get_context("spawn").Pool(args.num_proc, init_worker, (args.tokenizer_file,))
            results = pool.imap(encode_chunk, jobs)  # ordered: the output does not depend on num_proc
        else:
            global _tokenizer
            _tokenizer = self.tokenizer
            results = map(encode_chunk, jobs)
        total = len(ds) if hasattr(ds, "__len__") else None
        doc_bar = tqdm(total=total, unit=" docs", desc="documents", position=0, dynamic_ncols=True)
        tok_bar = tqdm(unit=" tok", unit_scale=True, desc="tokens", position=1, dynamic_ncols=True)
        pending = None  # the last chunk is held back: val may need its last document
        try:
            for result in results:
                in_flight.release()
                if pending is not None:
                    self.route(pending)
                pending = result
                doc_bar.update(result[0][1])
                tok_bar.update(len(result[1]))
            if pending is None:
                raise CorpusError(f"{where} holds no documents with text: the corpus is empty")
            if self.documents["val"] + pending[3].sum() == 0:  # a small corpus: val gets the last document
                pending[3][-1] = True
            self.route(pending)
            if self.documents["train"] == 0:
                raise CorpusError(f"{where} holds a single document; train and val need one each at least")
            shards = {split: writer.close() for split, writer in self.writers.items()}
        except BaseException:
            for writer in self.writers.values():
                writer.discard()
            raise
        finally:
            doc_bar.close()
            tok_bar.close()
            if pool is not None:
                pool.terminate()
        splits = {split: {"shards": shards[split], "documents": self.documents[split],
                          "max_token": self.max_token[split]} for split in SPLITS}  # fmt: skip
        meta = shard_meta(self.tokenizer.meta(), splits, shard_tokens=args.shard_tokens, source=self.source)
        write_meta(self.dir, meta)
        for name in our_files(self.dir):
            if name == PROGRESS or name.endswith(".tmp"):
                os.remove(os.path.join(self.dir, name))
        carry_over(self.final, self.dir, is_dataset_file)
        swap_dir(self.dir, self.final, way_out="choose another --out_dir")
        counts = ", ".join(f"{s} {meta['splits'][s]['tokens']:,} tokens in {len(shards[s])} shard(s)" for s in SPLITS)
        print(f"{args.out_dir}: {counts}")
        return meta


def parser(dataset=None, out_dir=None, script="prepare/corpus.py"):
    p = argparse.ArgumentParser(prog=command_name(script), description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=dataset is None)
    src.add_argument("--input", nargs="+", help="local .txt, .jsonl/.json or .parquet files, folders or globs")
    default_note = f" (default {dataset})" if dataset else ""
    src.add_argument("--dataset", default=dataset, help=f"Hugging Face dataset name{default_note}")
    p.add_argument("--name", help="the Hugging Face dataset's configuration name, if it has several")
    p.add_argument("--split", default="train", help="the Hugging Face dataset's split to read")
    p.add_argument("--revision", help="the Hugging Face dataset's commit, branch or tag (default: the pinned commit "
                                      "of openwebtext and fineweb-edu, else main)")  # fmt: skip
    p.add_argument("--streaming", action="store_true", help="stream the Hugging Face dataset, no full download")
    p.add_argument("--text_column", default="text", help="column that holds the documents (jsonl key)")
    p.add_argument("--txt_sample_by", default="document", choices=("document", "paragraph", "line"),
                   help=".txt input: a document is a whole file, a paragraph or a line")  # fmt: skip
    p.add_argument("--out_dir", required=out_dir is None, default=out_dir, help="dataset directory to write")
    p.add_argument("--val_fraction", type=float, default=0.0005, help="share of the documents for val")
    p.add_argument("--seed", type=int, default=2357, help="seed of the train/val draw")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--tokenizer_file", help="local GPT-2 .tiktoken file (offline); or set GPTCRAFT_TIKTOKEN_FILE")
    p.add_argument("--force", action="store_true", help="replace the dataset --out_dir holds (a folder gptcraft made)")
    return p


def run(args):
    """prepare(args), with a one-line error for what the user can fix."""
    try:
        prepare(args)
    except (CorpusError, TokenizerError, TokenFileError, OSError) as e:
        sys.exit(f"error: {e}")


def main(argv=None, dataset=None, out_dir=None, script="prepare/corpus.py"):
    run(parser(dataset, out_dir, script).parse_args(argv))


if __name__ == "__main__":
    main()
