"""Build a second real public catalog offline: Debian's binary packages embedded with all-MiniLM-L6-v2.

WordNet (bench/real_catalog.py) is a dictionary. This one is closer to a product catalog: about 64k
software packages, each with a one-line description, filed in one of Debian's ~58 sections (the
"department") and built from a source package (the "product family" its siblings share). It reads the
package lists apt already holds (`apt-cache dumpavail`: no network once `apt-get update` has run, which
any image that installs Debian packages has done) and writes the same schema as bench/real_catalog.py, so
bench/quality_real.py scores it with `--catalog bench/.cache/debian_packages.parquet --nmi2-depth 2`:

    item_id    int64          the package's index in name order (names are unique in the lists)
    embedding  list<float>    384-d, L2-normalised float32, of `text`
    category   list<string>   [section, source package] (the section without its "contrib/" or "non-free/"
                              area; the source is the package itself when the lists name none)
    lexname    string         the section: NMI1 / pur1 are level-1 codes against it
    text       string         "name: one-line description"; what was embedded

NMI2 / pur2 (`--nmi2-depth 2`) are then 2-prefixes against the source package: packages built together
(a library, its -dev and -doc packages, its language bindings) should share a 2-prefix.

    HF_HUB_OFFLINE=1 python bench/debian_catalog.py        # ~64k packages; the embeddings are cached
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_catalog import add_build_args, embed_texts, write_parquet  # noqa: E402


def parse_packages(text: str) -> list[dict[str, str]]:
    """The stanzas of a Debian package list (deb822: 'Field: value' lines, continuation lines start with a
    space, a blank line ends a stanza), each as {field: first line of its value}; one per package name, the
    first stanza a name appears in."""
    out: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if not line or line[0] in " \t" or ":" not in line:
                continue  # a continuation line (the long description, a folded field)
            name, value = line.split(":", 1)
            fields.setdefault(name, value.strip())
        if fields.get("Package") and fields.get("Description"):
            out.setdefault(fields["Package"], fields)
    return [out[name] for name in sorted(out)]


def catalog_rows(packages: list[dict[str, str]]) -> tuple[list[int], list[list[str]], list[str], list[str]]:
    """(item ids, [section, source] paths, sections, texts) of the parsed stanzas, in their order."""
    sections = [p.get("Section", "unknown").rsplit("/", 1)[-1] for p in packages]
    sources = [p.get("Source", p["Package"]).split(" ", 1)[0] for p in packages]  # "src (1.2-3)" -> "src"
    texts = [f"{p['Package']}: {p['Description']}" for p in packages]
    return list(range(len(packages))), [[s, src] for s, src in zip(sections, sources)], sections, texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packages-file", type=Path, default=None,
                   help="a deb822 package list to read instead of `apt-cache dumpavail`")
    add_build_args(p, "debian_packages.parquet", "packages by name")
    a = p.parse_args(argv)
    out = a.out if a.out is not None else a.cache_dir / "debian_packages.parquet"
    t_all = time.perf_counter()
    if a.packages_file is not None:
        if not a.packages_file.is_file():
            print(f"error: --packages-file {a.packages_file} is not a file (a deb822 list such as apt's "
                  "/var/lib/apt/lists/*_Packages, uncompressed)", file=sys.stderr)
            return 2
        listing = a.packages_file.read_text(encoding="utf-8", errors="replace")
    else:
        try:
            listing = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True,
                                     text=True, errors="replace").stdout
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"error: `apt-cache dumpavail` failed ({e}); on Debian/Ubuntu run `apt-get update` first, or pass "
                  "--packages-file", file=sys.stderr)
            return 2
    packages = parse_packages(listing)
    if a.limit is not None:
        packages = packages[:a.limit]
    if not packages:
        print("error: no package stanzas with a Description found (has `apt-get update` run?)", file=sys.stderr)
        return 2
    ids, categories, sections, texts = catalog_rows(packages)
    print(f"parse: {len(packages):,} packages, {len(set(sections))} sections, "
          f"{len({c[1] for c in categories}):,} source packages")
    emb = embed_texts(texts, a.cache_dir, batch_size=a.batch_size, refresh=a.refresh)
    t0 = time.perf_counter()
    write_parquet(out, ids, categories, sections, texts, emb)
    print(f"write: {out} ({out.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    print(f"total: {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
