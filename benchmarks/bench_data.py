"""Data preparation of a big plain-text corpus against `tokenizers` alone on the same text (issue 27).

    python -m benchmarks.bench_data --sizes 10,100          # MB of generated text
    nice -n 10 python -m benchmarks.bench_data --sizes 10,100,1000 --workdir /tmp/bench_data

One generated corpus (English-like paragraphs, seeded: Zipf-distributed words from a 30k-word vocabulary,
sentences of 4-24 words, 2-8 sentences a paragraph, a non-ASCII word now and then); each size is a prefix
of it, paragraphs whole. For each size, in fresh child processes, alternated --reps times:

- prep: `load_data(data=text, files=[corpus])` with the default data and tokenizer settings (vocab 4096,
  dedup, 10 % / 10 % held out, the contamination report) and an empty cache: index the file, dedup,
  split, train BPE on the training split, tokenize every split into memory-mapped streams. Timed from
  the call to its return (imports excluded), peak RSS = the child's VmHWM;
- tokenizers: the same BPE trainer (settings as newllm's) on the same training documents, then
  `encode_batch_fast` on every document of every split in batches of the same size, ids into numpy
  arrays: what `tokenizers` alone needs to produce the same ids. The split is computed first (not
  timed); the documents are read as the trainer and the encoder ask for them, from the same file index
  (os.pread + decode: a few % of its time, which any reader of the file pays). A reference that held
  every document as a Python string first was slower, and more so the bigger the text (CPU +20 % at
  100 MB, x2.6 at 1 GB at 3e6facb), which flattered the ratio;
- cached: `load_data` again in a new process (the cache now full): its time, and `read_kb`, the bytes it
  read through read(2) (/proc/self/io rchar, minus the same count after imports): the memory-mapped
  streams come in by page faults, not read(2), so this counts everything else it read -- the corpus is
  not read at all (see tests/test_data.py: a cached text rerun never opens the file);
- disk: bytes of the prepared cache entry per token.

rate = MB of text per second; ratio = prep rate / tokenizers rate (goal >= 0.9), by wall time; cpu_ratio
the same by CPU time of all threads (steadier on a shared machine, where wall time mostly measures the
wait; both tokenize on all cores). RSS goal: 1 GB + 1 byte per byte of text. Numbers are medians over
the --reps alternated rounds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ints

WORDS, SEED = 30_000, 0
PREP = """
import json, os, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from newllm.config import DataConfig, TokenizerConfig
from newllm.data import load_data
def io():
    return int(dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())["rchar"])
corpus, cache = sys.argv[1], sys.argv[2]
d = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "text", "files": [corpus], "loss_on": "all"})
tok = OmegaConf.structured(TokenizerConfig)
r0 = io(); t0 = time.perf_counter(); c0 = time.process_time()
data = load_data(d, tok, cache)
seconds = time.perf_counter() - t0; cpu = time.process_time() - c0; read = io() - r0
hwm = [int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": hwm / 1024, "read_kb": read / 1024,
                  "hit": data.info["data/tokens_cache_hit"], "documents": data.info["data/documents"],
                  "tokens": sum(data.info[f"data/{k}_tokens"] for k in ("train", "val", "test")),
                  "contamination_val": data.info["data/contamination/val_documents"]}))
"""
REFERENCE = """
import json, sys, time
import numpy as np
from omegaconf import OmegaConf
from newllm.config import DataConfig, TokenizerConfig
from newllm.data.corpora import TEXT_UNITS
from newllm.data.prepare import _splits
from newllm.data.prepare import Documents
from newllm.data.streams import BATCH_DOCUMENTS, _batches
from newllm.data.textfiles import index_text_files
from newllm.data.tokenizer import train_bpe
from pathlib import Path
corpus = sys.argv[1]
d = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "text", "files": [corpus], "loss_on": "all"})
tok = OmegaConf.structured(TokenizerConfig)
files = index_text_files([Path(corpus)], "auto", None, TEXT_UNITS)
order, _ = _splits(Documents(files), d)  # not timed
t0 = time.perf_counter(); c0 = time.process_time()
tokenizer = train_bpe((files[i] for i in order["train"]), tok.vocab_size, tok.min_frequency)
tokens = 0
for k, idx in order.items():
    for batch in _batches(files, idx):
        for e in tokenizer.encode_batch_fast([files[i] for i in batch], add_special_tokens=False):
            tokens += len(np.asarray(e.ids, dtype=np.int16))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "tokens": tokens}))
"""


def _vocabulary(rng: random.Random) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
               1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    words = {"".join(rng.choices(letters, weights, k=rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 10, 12))))
             for _ in range(WORDS * 2)}
    vocab = sorted(words)[:WORDS]
    rng.shuffle(vocab)
    for i in range(0, WORDS, 997):  # a non-ASCII word now and then: the text is not pure ASCII
        vocab[i] = vocab[i] + "é"
    return vocab


def generate(path: Path, size: int) -> None:
    """Paragraphs of the seeded corpus until `size` bytes (the last paragraph whole)."""
    rng = random.Random(SEED)
    vocab = _vocabulary(rng)
    cumulative = [0.0]
    for rank in range(1, WORDS + 1):
        cumulative.append(cumulative[-1] + 1.0 / rank)  # Zipf
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size:
            sentences = []
            for _ in range(rng.randint(2, 8)):
                words = rng.choices(vocab, cum_weights=cumulative[1:], k=rng.randint(4, 24))
                sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
            paragraph = " ".join(sentences) + "\n\n"
            f.write(paragraph)
            written += len(paragraph.encode("utf-8"))


def corpus(workdir: Path, mb: int) -> Path:
    """The prefix of the largest corpus asked for, cut at a paragraph boundary near `mb` MB."""
    path = workdir / f"corpus-{mb}mb.txt"
    if not path.exists():
        generate(path, mb * 1_000_000)
    return path


THREADS: int | None = None  # --threads: the rayon pool of every child (None: all cores)


def child(script: str, *args: str) -> dict:
    env = dict(os.environ)
    if THREADS:
        env.update({"RAYON_NUM_THREADS": str(THREADS), "RAYON_RS_NUM_CPUS": str(THREADS)})
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(path: Path, workdir: Path, reps: int) -> dict:
    text_mb = path.stat().st_size / 1e6
    preps, refs, cached = [], [], []
    for _ in range(reps):
        cache = workdir / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        preps.append(child(PREP, str(path), str(cache)))
        cached.append(child(PREP, str(path), str(cache)))
        refs.append(child(REFERENCE, str(path)))
    entry = next((workdir / "cache" / "prepared").iterdir())
    disk = sum(p.stat().st_size for p in entry.iterdir())
    prep_s, ref_s = statistics.median(p["seconds"] for p in preps), statistics.median(r["seconds"] for r in refs)
    prep_cpu, ref_cpu = statistics.median(p["cpu_s"] for p in preps), statistics.median(r["cpu_s"] for r in refs)
    tokens = preps[0]["tokens"]
    assert all(c["hit"] for c in cached) and refs[0]["tokens"] == tokens, (refs[0]["tokens"], tokens)
    return {"size_mb": round(text_mb, 1), "documents": preps[0]["documents"], "tokens": tokens,
            "tokenizers_s": round(ref_s, 2), "tokenizers_mb_s": round(text_mb / ref_s, 2),
            "prep_s": round(prep_s, 2), "prep_mb_s": round(text_mb / prep_s, 2), "ratio": round(ref_s / prep_s, 3),
            "tokenizers_cpu_s": round(ref_cpu, 2), "prep_cpu_s": round(prep_cpu, 2),
            "cpu_ratio": round(ref_cpu / prep_cpu, 3),
            "prep_peak_rss_mb": round(max(p["peak_rss_mb"] for p in preps)),
            "rss_goal_mb": round(1024 + text_mb * 1e6 / 2**20),
            "cached_s": round(statistics.median(c["seconds"] for c in cached), 3),
            "cached_peak_rss_mb": round(max(c["peak_rss_mb"] for c in cached)),
            "cached_read_kb": round(max(c["read_kb"] for c in cached), 1),
            "disk_bytes_per_token": round(disk / tokens, 3),
            "contamination_val": round(preps[0]["contamination_val"], 4),
            "rounds": reps}


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent)
    return proc.stdout.strip() or "unknown"


def main() -> None:
    import argparse

    global THREADS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100", help="MB of text, comma-separated (1000 = 1 GB: ~1 GB of disk)")
    p.add_argument("--reps", type=int, default=1, help="alternated rounds per size (median reported)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/newllm_bench_data"))
    p.add_argument("--out", type=Path, default=RESULTS / "data_prep.csv")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora and the cache")
    p.add_argument("--threads", type=int, default=None, help="tokenizers' threads in every child (default: all)")
    args = p.parse_args()
    THREADS = args.threads
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in ints(args.sizes):
        t0 = time.perf_counter()
        row = measure(corpus(args.workdir, mb), args.workdir, args.reps)
        load1, load5, _ = os.getloadavg()
        row.update({"threads": THREADS or os.cpu_count(), "load1": round(load1, 1), "load5": round(load5, 1),
                    "commit": commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    import pandas as pd

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
