"""Scheduled runs end to end on the embedded engine: published IDs never move or get reused.

One trained generation, then rounds that each add ~5% new items, remove ~1%, change ~1% of the
embeddings and shuffle the input, encoded incrementally with the champion; a kill -9 in the middle
of the write; two runs at once; a retrain that starts a new generation; the ID churn gate.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

import pipelines.registry as registry
from pipelines.arrow_utils import row_fingerprints
from pipelines.demo import write_demo_catalog
from pipelines.schema import DRIFT_TABLE, ID_CHANGES_TABLE, SEMANTIC_IDS_TABLE, RetiredReason
from rqvae.synthetic import CatalogSpec

pytestmark = [pytest.mark.spark, pytest.mark.usefixtures("job_isolation")]

MODEL, N_ITEMS, DIM = "csid-scheduled", 1500, 16
CHAMPION = f"models:/{MODEL}@champion"
TRAIN = ["--sample-size", "1200", *helpers.SMALL_MODEL, *helpers.GATE_OFF, "--model-name", MODEL,
         "--experiment", MODEL]


@dataclasses.dataclass
class World:
    work: Path
    out: Path
    catalogs: list[Path]  # catalog of each round, [0] the first

    @property
    def sids(self) -> Path:
        return self.out / SEMANTIC_IDS_TABLE

    def encode(self, catalog: Path, *extra: str) -> tuple[int, str, str]:
        return helpers.run_main(["--input", catalog, "--work-dir", self.work, "--output", self.out, "--stages",
                                 "validate,encode", "--model", CHAMPION, "--model-name", MODEL,
                                 "--experiment", MODEL, *extra])



def next_catalog(previous: Path, path: Path, seed: int, back: Path | None = None) -> Path:
    """The previous catalog with ~1% of items removed, ~1% of embeddings changed, ~5% new items, shuffled;
    with ``back``, the items of that older catalog that ``previous`` lacks return as they were."""
    table = helpers.read_delta(previous).select(["item_id", "embedding"])
    rng = np.random.default_rng(seed)
    kept = table.filter(pa.array(rng.random(table.num_rows) >= 0.01))
    vectors = np.stack(kept["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    changed = rng.random(len(vectors)) < 0.01
    vectors[changed] += rng.normal(scale=0.5, size=(int(changed.sum()), DIM)).astype(np.float32)
    ids = kept["item_id"].to_numpy()
    start = int(helpers.read_delta(previous)["item_id"].to_numpy().max()) + 1000 * seed  # never an old id
    new_ids = np.arange(start, start + int(0.05 * table.num_rows))
    fresh = rng.normal(size=(len(new_ids), DIM)).astype(np.float32)
    if back is not None:
        present = set(table["item_id"].to_pylist())
        gone = [r for r in helpers.read_delta(back).to_pylist() if r["item_id"] not in present]
        new_ids = np.concatenate([new_ids, [r["item_id"] for r in gone]]).astype(new_ids.dtype)
        fresh = np.concatenate([fresh, np.array([r["embedding"] for r in gone], dtype=np.float32).reshape(-1, DIM)])
    order = rng.permutation(len(ids) + len(new_ids))
    ids, vectors = np.concatenate([ids, new_ids])[order], np.concatenate([vectors, fresh])[order]
    out = pa.table({"item_id": pa.array(ids), "embedding": pa.array(list(vectors), pa.list_(pa.float32()))})
    return helpers.write_delta(path, out, parts=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("scheduled")
    first = root / "catalog-0"
    write_demo_catalog(first, CatalogSpec(n_items=N_ITEMS, dim=DIM, seed=5))
    w = World(root / "work", root / "tables", [first])
    rc, out, err = helpers.run_main(["--input", first, "--work-dir", w.work, "--output", w.out, *TRAIN])
    assert rc == 0, err[-3000:]
    assert "mode: full, because no semantic-ID table yet" in out
    for r in range(1, 5):  # round 3 also brings back the items round 2 removed
        back = w.catalogs[1] if r == 3 else None
        w.catalogs.append(next_catalog(w.catalogs[-1], root / f"catalog-{r}", seed=r, back=back))
    return w


def ledger_rows(path: Path, version: int | None = None) -> list[dict]:
    return DeltaTable(str(path), version=version).to_pyarrow_table().to_pylist()


def valid_ids(catalog: Path) -> set:
    return set(helpers.read_delta(catalog).column("item_id").to_pylist())


def fingerprints_changed(rows: list[dict], catalog: Path) -> set:
    """Items of the catalog whose embedding is not the one their current (or reactivatable) row was
    tokenized from."""
    table = helpers.read_delta(catalog)
    fps = row_fingerprints(np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32))
    held = {r["item_id"]: r["embedding_fingerprint"] for r in rows
            if r["active"] or r["retired_reason"] == RetiredReason.LEFT_CATALOG}
    return {i for i, fp in zip(table["item_id"].to_pylist(), fps.tolist()) if i in held and held[i] != fp}


def test_rounds_of_incremental_runs_never_move_or_reuse_a_published_id(world) -> None:
    owner: dict[str, object] = {}  # every semantic_id ever published -> its item
    for r in ledger_rows(world.sids):
        owner[r["semantic_id"]] = r["item_id"]
    for round_no in range(1, 5):
        policy = "keep" if round_no <= 2 else "retokenize"
        before = ledger_rows(world.sids)
        version = DeltaTable(str(world.sids)).version()
        catalog = world.catalogs[round_no]
        changed = fingerprints_changed(before, catalog)
        rc, out, err = world.encode(catalog, "--on-changed", policy)
        assert rc == 0, err[-3000:]
        assert "mode: incremental" in out
        rows = ledger_rows(world.sids)
        new_items = valid_ids(catalog) - {r["item_id"] for r in before}
        returning = (valid_ids(catalog) - valid_ids(world.catalogs[round_no - 1])) - new_items
        assert bool(returning) == (round_no == 3)
        retired_before = {r["item_id"]: r["semantic_id"] for r in before if not r["active"]}
        for item in returning:  # back with its old ID
            assert {r["semantic_id"] for r in rows if r["active"] and r["item_id"] == item} == {retired_before[item]}

        # Only the new items (and, under retokenize, the changed ones) went through the model.
        encoded = len(new_items) + (len(changed) if policy == "retokenize" else 0)
        assert f"{encoded} rows went through the model" in out
        assert f"embeddings changed: {len(changed)}" in out, (round_no, out[-2500:])

        # Every row published before is still there; nothing but its lifecycle columns moved.
        now = {r["semantic_id"]: r for r in rows}
        for old in before:
            kept = now[old["semantic_id"]]
            assert kept["item_id"] == old["item_id"]
            assert {k: kept[k] for k in ("codes", "suffix", "quantization_error", "tokenized_at", "mlflow_run_id")} \
                == {k: old[k] for k in ("codes", "suffix", "quantization_error", "tokenized_at", "mlflow_run_id")}
        # A semantic_id names one item, forever: unique over active and retired rows, never reissued.
        assert len(now) == len(rows)
        for sid, r in now.items():
            assert owner.setdefault(sid, r["item_id"]) == r["item_id"], sid
        # The active rows are exactly the catalog's valid items, one each.
        active = [r["item_id"] for r in rows if r["active"]]
        assert sorted(active) == sorted(valid_ids(catalog))
        # The published ID of every item that stayed is unchanged, except re-tokenized ones.
        current = {r["item_id"]: r["semantic_id"] for r in rows if r["active"]}
        previous = {o["item_id"]: o["semantic_id"] for o in before if o["active"]}
        moved = {i for i, sid in current.items() if i in previous and previous[i] != sid}
        if policy == "keep":
            assert not moved
            helpers.assert_sid_checker_passes(world.sids, "--levels", "3", "--codebook-size", "16",
                                              "--previous-version", str(version))
        else:
            retired = {r["item_id"] for r in rows if r["retired_reason"] == RetiredReason.EMBEDDING_CHANGED
                       and r["semantic_id"] not in {o["semantic_id"] for o in before if not o["active"]}}
            assert retired <= changed and moved <= changed
            id_changes = helpers.read_delta(world.out / ID_CHANGES_TABLE).to_pylist()
            assert {c["item_id"] for c in id_changes} >= retired
            for c in id_changes:
                assert owner[c["old_semantic_id"]] == owner[c["new_semantic_id"]] == c["item_id"]


def copy_table(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_KILL_DURING_MERGE = textwrap.dedent("""
    import os, signal, sys, threading
    import pipelines.io as io
    delay = float(sys.argv[1])
    merge = io.merge_into
    def killed_merge(*args, **kwargs):
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        merge(*args, **kwargs)
        threading.Event().wait(60)  # the kill comes here if the MERGE was faster
    io.merge_into = killed_merge
    from jobs.tokenize_catalog import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_run_killed_during_its_merge_leaves_a_readable_table_and_a_rerun_matches(world, tmp_path) -> None:
    catalog = next_catalog(world.catalogs[-1], tmp_path / "catalog", seed=9)
    reference = copy_table(world.out, tmp_path / "reference")
    rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", world.work, "--output", reference, "--stages",
                                   "validate,encode", "--model", CHAMPION])
    assert rc == 0, err[-3000:]
    expected = {(r["item_id"], r["semantic_id"], r["active"]) for r in ledger_rows(reference / SEMANTIC_IDS_TABLE)}
    for delay in (0.0, 0.3):
        out = copy_table(world.out, tmp_path / f"killed-{delay}")
        scratch = tmp_path / f"tmp-{delay}"  # the killed engine's scratch folder stays behind: keep it here
        scratch.mkdir()
        sids = out / SEMANTIC_IDS_TABLE
        version, rows = DeltaTable(str(sids)).version(), ledger_rows(sids)
        proc = subprocess.run(
            [sys.executable, "-c", _KILL_DURING_MERGE, str(delay), "--input", str(catalog), "--work-dir",
             str(world.work), "--output", str(out), "--stages", "validate,encode", "--model", CHAMPION],
            cwd=tmp_path, env=helpers.subprocess_env(TMPDIR=str(scratch)), capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        now = DeltaTable(str(sids))  # readable, at the old version or (the commit won the race) the new one
        if now.version() == version:
            assert now.to_pyarrow_table().to_pylist() == rows
        rc, _, err = helpers.run_main(["--input", catalog, "--work-dir", world.work, "--output", out, "--stages",
                                       "validate,encode", "--model", CHAMPION])
        assert rc == 0, err[-3000:]
        assert {(r["item_id"], r["semantic_id"], r["active"]) for r in ledger_rows(sids)} == expected


def test_two_runs_at_once_never_issue_one_id_twice(world, tmp_path) -> None:
    out = copy_table(world.out, tmp_path / "tables")
    catalogs = [next_catalog(world.catalogs[-1], tmp_path / f"catalog-{i}", seed=20 + i) for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, str(helpers.ROOT / "jobs" / "tokenize_catalog.py"), "--input", str(c), "--work-dir",
         str(world.work), "--output", str(out), "--stages", "validate,encode", "--model", CHAMPION],
        cwd=tmp_path, env=helpers.subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in catalogs]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(rc for rc, _, _ in results)
    assert 0 in codes, results
    for rc, _, err in results:
        if rc != 0:
            # the second waits for nothing: it meets the first's writer lock (or, if it came after, its commit)
            assert rc == 4 and ("another run is writing" in err or "another run wrote" in err), err[-2000:]
            assert "Run it again" in err, err[-2000:]
    rows = ledger_rows(out / SEMANTIC_IDS_TABLE)
    assert len({r["semantic_id"] for r in rows}) == len(rows)
    active = [r["item_id"] for r in rows if r["active"]]
    assert len(active) == len(set(active))


def test_another_given_model_is_refused_unless_a_new_generation_is_asked_for(world, tmp_path) -> None:
    other = helpers.untrained_checkpoint(DIM)
    (tmp_path / "other.pt").write_bytes(other)
    version = DeltaTable(str(world.sids)).version()
    for mode in ("incremental", "auto"):
        rc, _, err = helpers.run_main(["--input", world.catalogs[-1], "--work-dir", world.work, "--output",
                                       world.out, "--stages", "validate,encode", "--model", tmp_path / "other.pt",
                                       "--mode", mode])
        assert rc == 2 and "--mode full" in err, err[-2000:]
        assert ("--mode incremental keeps the table's IDs" in err) == (mode == "incremental")
        assert ("starts a new generation only when asked" in err) == (mode == "auto")
    assert DeltaTable(str(world.sids)).version() == version


def own_copy(world: World, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the world's tables and MLflow store (registry aliases included) for a test that retrains."""
    return copy_table(world.out, tmp_path / "tables"), copy_table(world.work, tmp_path / "work")


def test_a_retrain_over_the_churn_limit_exits_3_and_moves_nothing(world, tmp_path) -> None:
    out, work = own_copy(world, tmp_path)
    registry.configure_tracking(work)
    champion = registry.alias_version(MODEL, registry.CHAMPION)
    version = DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version()
    rc, stdout, err = helpers.run_main(["--input", world.catalogs[-1], "--work-dir", work, "--output", out,
                                        *TRAIN, "--seed", "7", "--align", "none", "--max-id-churn", "0.01"])
    assert rc == 3, err[-3000:]
    assert "is above --max-id-churn 0.01" in err and "nothing was written" in err
    assert "new generation 2" in stdout
    registry.configure_tracking(work)
    assert registry.alias_version(MODEL, registry.CHAMPION) == champion
    assert DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version() == version


def test_a_retrain_against_another_mlflow_store_stops_before_training(world, tmp_path) -> None:
    """The table's model is not in this run's store (another --work-dir): registering there would give a second
    model its name and version numbers, so the run stops, naming the store and the fix, and nothing changes."""
    out = copy_table(world.out, tmp_path / "tables")
    version = DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version()
    other = tmp_path / "another-work"
    rc, stdout, err = helpers.run_main(["--input", world.catalogs[-1], "--work-dir", other, "--output", out, *TRAIN])
    assert rc == 2, err[-3000:]
    assert f"which the MLflow registry sqlite:///{other}" in err and "train under another --model-name" in err, err
    assert "MLFLOW_TRACKING_URI" in err and "fitted on" not in err + stdout
    assert DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version() == version
    registry.configure_tracking(other)
    assert not registry.has_version(MODEL, "1")  # nothing registered in the other store


def test_another_store_holding_another_model_under_the_tables_model_name_and_version_is_refused(world, tmp_path):
    """Another MLflow store (another --work-dir) whose own training registered a different model as the table's
    model name and version 1: its @champion is not the table's model, so a daily run with it would write codes of
    an unrelated model as generation 1's, and a retrain would warm-start from it. Both stop (exit 2) before
    encoding or training, naming both digests' beginnings and the fix; nothing changes."""
    out = copy_table(world.out, tmp_path / "tables")
    version = DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version()
    other = tmp_path / "another-work"
    rc, _, err = helpers.run_main(["--input", world.catalogs[0], "--work-dir", other, "--output",
                                   tmp_path / "other-tables", *TRAIN, "--seed", "9"])
    assert rc == 0, err[-3000:]
    registry.configure_tracking(other)
    assert registry.has_version(MODEL, "1")  # the same name and version as the table's model
    theirs = registry.checkpoint_digest(registry.resolve_model(f"models:/{MODEL}/1").checkpoint)
    registry.configure_tracking(world.work)
    ours = registry.checkpoint_digest(registry.resolve_model(f"models:/{MODEL}/1").checkpoint)
    assert theirs != ours
    daily = ["--input", world.catalogs[-1], "--work-dir", other, "--output", out, "--stages", "validate,encode",
             "--model", CHAMPION, "--model-name", MODEL, "--experiment", MODEL]
    retrain = ["--input", world.catalogs[-1], "--work-dir", other, "--output", out, *TRAIN]
    for args, fix in ((daily, "at the store that registered the table's model"),
                      (retrain, "train under another --model-name")):
        rc, stdout, err = helpers.run_main(args)
        assert rc == 2, err[-3000:]
        assert (f"{MODEL} version 1 in the MLflow registry sqlite:///{other}" in err and "is not the model that issued "
                "IDs in this table" in err and f"begins {theirs[:12]}, the one the runs table recorded {ours[:12]}"
                in err and fix in err), err[-3000:]
        assert "rows went through the model" not in stdout and "fitted on" not in stdout
    assert DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version() == version


def test_a_retrain_starts_an_aligned_generation_and_lists_every_change(world, tmp_path) -> None:
    out, work = own_copy(world, tmp_path)
    before = ledger_rows(out / SEMANTIC_IDS_TABLE)
    active_before = {r["item_id"]: r for r in before if r["active"]}
    held = {r["item_id"]: r for r in before if r["active"] or r["retired_reason"] == RetiredReason.LEFT_CATALOG}
    rc, stdout, err = helpers.run_main(["--input", world.catalogs[-1], "--work-dir", work, "--output", out,
                                        *TRAIN, "--seed", "3", "--max-id-churn", "1"])
    assert rc == 0, err[-3000:]
    assert "warm start from" in stdout and "new generation 2" in stdout
    rows = ledger_rows(out / SEMANTIC_IDS_TABLE)
    current = {r["item_id"]: r for r in rows if r["active"]}
    assert {r["generation"] for r in current.values()} == {2}
    stayed = {i for i, r in current.items() if i in active_before and r["semantic_id"] ==
              active_before[i]["semantic_id"]}
    moved = {i for i in current if i in active_before} - stayed
    assert stayed, "no item kept its ID"
    for i in stayed:  # a kept ID keeps its row: same codes, suffix, issue time
        assert current[i]["codes"] == active_before[i]["codes"] and current[i]["suffix"] == active_before[i]["suffix"]
    changes = {(c["item_id"], c["old_semantic_id"], c["new_semantic_id"])
               for c in helpers.read_delta(out / ID_CHANGES_TABLE).to_pylist() if c["generation"] == 2}
    # Every replaced ID is listed: the moved items', and the old ID of any item that came back with other codes.
    returned = {i for i in current if i in held and i not in active_before and held[i]["semantic_id"] !=
                current[i]["semantic_id"]}
    assert changes == {(i, held[i]["semantic_id"], current[i]["semantic_id"]) for i in moved | returned}
    drift = {(d["metric"], d["level"]): d["value"] for d in helpers.read_delta(out / DRIFT_TABLE).to_pylist()}
    assert drift[("ids_changed", None)] == len(moved)
    assert drift[("compared", None)] == len(set(current) & set(active_before))
    owners: dict[str, object] = {}
    for r in before + rows:  # no ID of generation 1 names another item in generation 2
        assert owners.setdefault(r["semantic_id"], r["item_id"]) == r["item_id"]
    assert os.path.isdir(out / "report")


def held_ids(rows: list[dict]) -> set:
    """Items holding an ID of the table's current generation: active, or retired in it as left/rejected."""
    generation = max(r["generation"] for r in rows)
    return {r["item_id"] for r in rows if r["active"] or (
        r["generation"] == generation and r["retired_reason"] in RetiredReason.REACTIVATABLE)}


def _without(catalog: Path, path: Path, share: float, seed: int) -> tuple[Path, set]:
    """``catalog`` with about ``share`` of its items left out (written to ``path``), and the ids left out."""
    table = helpers.read_delta(catalog).select(["item_id", "embedding"])
    away = np.random.default_rng(seed).random(table.num_rows) < share
    return (helpers.write_delta(path, table.filter(pa.array(~away)), parts=2),
            set(table.filter(pa.array(away))["item_id"].to_pylist()))


def test_items_away_when_a_generation_starts_have_their_ids_back_where_their_codes_are_the_same(world, tmp_path):
    """A retrain on a day some items are missing (a partial snapshot, rejected rows) retires them. Back on a later
    day, the new model's codes decide, as for every item present at the retrain: the same tuple and an item has
    its own ID back (it got a new suffix of it before), another and it moves, listed in id_changes."""
    out, work = own_copy(world, tmp_path)
    full = world.catalogs[-1]
    before = {r["item_id"]: r for r in ledger_rows(out / SEMANTIC_IDS_TABLE) if r["active"]}
    held = held_ids(ledger_rows(out / SEMANTIC_IDS_TABLE))
    partial, away = _without(full, tmp_path / "partial", 0.2, seed=11)
    returned = away & set(before)
    rc, stdout, err = helpers.run_main(["--input", partial, "--work-dir", work, "--output", out, *TRAIN,
                                        "--seed", "3", "--max-id-churn", "0.9"])
    assert rc == 0, err[-3000:]
    assert "new generation 2" in stdout
    # The items away, any the whole catalog lacks as well, and those away since earlier in generation 1.
    lacking = held - valid_ids(partial)
    assert f"{len(lacking)} items with IDs of generation 1 are not valid items of this catalog" in stdout, stdout
    rc, stdout, err = World(work, out, []).encode(full)
    assert rc == 0 and "mode: incremental" in stdout, err[-3000:]
    rows = ledger_rows(out / SEMANTIC_IDS_TABLE)
    current = {r["item_id"]: r for r in rows if r["active"]}
    assert returned <= set(current)
    back = {i for i in returned if current[i]["semantic_id"] == before[i]["semantic_id"]}
    assert back, "no item that was away had its ID back"
    for i in back:  # its own row again, now the current generation's
        assert current[i]["codes"] == before[i]["codes"] and current[i]["generation"] == 2
        assert current[i]["tokenized_at"] == before[i]["tokenized_at"]
    changes = {(c["item_id"], c["old_semantic_id"], c["new_semantic_id"])
               for c in helpers.read_delta(out / ID_CHANGES_TABLE).to_pylist()
               if c["item_id"] in returned and c["generation"] == 2}  # not the rounds' re-tokenizations
    assert changes == {(i, before[i]["semantic_id"], current[i]["semantic_id"]) for i in returned - back}
    # No item holds an active row beside a row it could have back, and no ID ever named two items.
    waiting = {r["item_id"] for r in rows if not r["active"] and r["retired_reason"] in RetiredReason.REACTIVATABLE}
    assert not waiting & set(current)
    owners: dict[str, object] = {}
    for r in rows:
        assert owners.setdefault(r["semantic_id"], r["item_id"]) == r["item_id"]


def test_a_new_generation_without_most_published_items_exits_3(world, tmp_path) -> None:
    """A partial snapshot of the catalog, seen by a daily run (which retires the items away) and then by a retrain:
    the churn gate sees only the items present, so the share of the generation's items the catalog lacks (away now
    or since earlier in the generation) is gated as well (--max-id-churn), naming the likely cause and the fix."""
    out, work = own_copy(world, tmp_path)
    registry.configure_tracking(work)
    champion = registry.alias_version(MODEL, registry.CHAMPION)
    partial, _ = _without(world.catalogs[-1], tmp_path / "partial", 0.8, seed=12)
    rc, stdout, err = World(work, out, []).encode(partial)
    assert rc == 0 and "WARNING" in stdout, err[-3000:]
    rows = ledger_rows(out / SEMANTIC_IDS_TABLE)
    version = DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version()
    held = held_ids(rows)
    n_away = len(held - valid_ids(partial))
    rc, _, err = helpers.run_main(["--input", partial, "--work-dir", work, "--output", out, *TRAIN, "--seed", "3",
                                   "--max-id-churn", "0.7"])
    assert rc == 3, err[-3000:]
    assert (f"{n_away} of {len(held)} items with published IDs of the last generation ({n_away / len(held):.2%}) "
            "are not valid items of this catalog (they left it or were rejected, in this run or earlier), more than "
            "--max-id-churn 0.7 allows when a new generation starts") in err, err[-3000:]
    assert "Check that --input is the whole catalog" in err and "nothing was written" in err
    registry.configure_tracking(work)
    assert registry.alias_version(MODEL, registry.CHAMPION) == champion
    assert DeltaTable(str(out / SEMANTIC_IDS_TABLE)).version() == version


def test_a_daily_run_on_a_catalog_that_lost_most_of_its_items_warns_and_keeps_their_ids(world, tmp_path) -> None:
    out, work = own_copy(world, tmp_path)
    before = {r["item_id"]: r["semantic_id"] for r in ledger_rows(out / SEMANTIC_IDS_TABLE) if r["active"]}
    partial, _ = _without(world.catalogs[-1], tmp_path / "partial", 0.9, seed=13)
    lacking = set(before) - valid_ids(partial)
    rc, stdout, err = World(work, out, []).encode(partial)
    assert rc == 0, err[-3000:]
    assert (f"WARNING: {len(lacking)} of {len(before)} published items are not valid items of this catalog and are "
            "retired now") in stdout, stdout[-3000:]
    rc, stdout, err = World(work, out, []).encode(world.catalogs[-1])  # the whole catalog again: every ID back
    assert rc == 0 and "WARNING" not in stdout, err[-3000:]
    after = {r["item_id"]: r["semantic_id"] for r in ledger_rows(out / SEMANTIC_IDS_TABLE) if r["active"]}
    assert {i: after[i] for i in before if i in after} == {i: before[i] for i in before if i in after}


def test_compare_to_measures_drift_against_another_table(world, tmp_path) -> None:
    out = tmp_path / "tables"
    rc, stdout, err = helpers.run_main(["--input", world.catalogs[1], "--work-dir", world.work, "--output", out,
                                        "--stages", "validate,encode,report", "--model", CHAMPION,
                                        "--compare-to", world.sids, "--max-id-churn", "1"])
    assert rc == 0, err[-3000:]
    now = {r["item_id"]: r["semantic_id"] for r in ledger_rows(out / SEMANTIC_IDS_TABLE)}
    other = {r["item_id"]: r["semantic_id"] for r in ledger_rows(world.sids) if r["active"]}
    both = set(now) & set(other)
    rows = helpers.read_delta(out / DRIFT_TABLE).to_pylist()
    drift = {(d["metric"], d["level"]): d["value"] for d in rows if d["against"] == str(world.sids)}
    assert drift[("compared", None)] == len(both)
    assert drift[("ids_changed", None)] == sum(now[i] != other[i] for i in both) > 0  # a fresh table: new suffixes
    own = {(d["metric"], d["level"]): d["value"] for d in rows if d["against"] != str(world.sids)}
    assert own[("compared", None)] == 0  # the run's own drift: a first run, nothing published before
    html = (out / "report" / "prefix_report.html").read_text(encoding="utf-8")
    assert "<h2>Drift</h2>" in html and "<h2>Comparison</h2>" in html


def test_parquet_output_is_rewritten_by_the_staged_swap_in_an_incremental_run(world, tmp_path) -> None:
    out = tmp_path / "tables"
    args = ["--work-dir", world.work, "--output", out, "--stages", "validate,encode", "--model", CHAMPION,
            "--format", "parquet"]
    rc, _, err = helpers.run_main(["--input", world.catalogs[0], *args])
    assert rc == 0, err[-3000:]
    first = {(r["item_id"], r["semantic_id"]) for r in helpers.read_parquet(out / SEMANTIC_IDS_TABLE).to_pylist()}
    rc, stdout, err = helpers.run_main(["--input", world.catalogs[1], *args])
    assert rc == 0, err[-3000:]
    assert "mode: incremental" in stdout
    rows = helpers.read_parquet(out / SEMANTIC_IDS_TABLE).to_pylist()
    assert first <= {(r["item_id"], r["semantic_id"]) for r in rows}
    assert sorted(r["item_id"] for r in rows if r["active"]) == sorted(valid_ids(world.catalogs[1]))
    assert not list(out.glob(".*staging*")) and not list(out.glob(".*backup*"))


def test_compare_to_a_table_that_is_no_semantic_id_table_names_the_columns(world, tmp_path) -> None:
    rc, _, err = helpers.run_main(["--input", world.catalogs[1], "--work-dir", world.work, "--output",
                                   tmp_path / "tables", "--stages", "validate,encode", "--model", CHAMPION,
                                   "--compare-to", world.catalogs[0]])
    assert rc == 2
    assert "compare_tables(--compare-to" in err and "'semantic_id'" in err
    missing = tmp_path / "nowhere"
    rc, out, err = helpers.run_main(["--input", world.catalogs[1], "--work-dir", world.work, "--output",
                                     tmp_path / "other", "--stages", "validate,encode", "--model", CHAMPION,
                                     "--compare-to", missing])
    assert rc == 2 and f"--compare-to {missing} does not exist" in err, err[-2000:]
    assert "==> encode" not in out and not (tmp_path / "other").exists()  # refused at start: nothing written


def test_a_catalog_grown_by_an_append_is_read_only_where_it_grew(world, tmp_path) -> None:
    """The fingerprint cache: the full run keeps every row group's fingerprints, the next incremental run
    reads the embeddings of the appended file only, and issues exactly the IDs a run without the cache does."""
    from deltalake import write_deltalake

    from pipelines import io

    catalog = copy_table(world.catalogs[0], tmp_path / "catalog")
    cache = tmp_path / "cache"

    def encode(out: Path, *extra: str) -> str:
        rc, stdout, err = helpers.run_main(["--input", catalog, "--work-dir", world.work, "--output", out,
                                            "--stages", "validate,encode", "--model", CHAMPION, "--model-name", MODEL,
                                            "--experiment", MODEL, *extra])
        assert rc == 0, err[-3000:]
        return stdout

    first = encode(tmp_path / "out", "--fingerprint-cache", cache)
    assert "mode: full" in first and f"each row group's fingerprints are kept in {cache} (" in first
    before, _ = io.embedding_files(str(catalog), "delta", "item_id", "embedding")
    assert before is not None and len(os.listdir(cache)) == len(before.row_groups)

    start = max(valid_ids(catalog)) + 1
    fresh = np.random.default_rng(11).normal(size=(40, DIM)).astype(np.float32)
    schema = DeltaTable(str(catalog)).schema().to_arrow()
    columns = {"item_id": pa.array(np.arange(start, start + 40)),
               "embedding": pa.array(list(fresh), pa.list_(pa.float32()))}
    write_deltalake(str(catalog), pa.table({f.name: columns.get(f.name, pa.nulls(40)) for f in schema}).cast(
        pa.schema(schema)), mode="append")
    after, _ = io.embedding_files(str(catalog), "delta", "item_id", "embedding")
    assert after is not None and len(after.row_groups) == len(before.row_groups) + 1
    copy_table(tmp_path / "out", tmp_path / "plain")
    version = DeltaTable(str(tmp_path / "out" / SEMANTIC_IDS_TABLE)).version()

    grown = encode(tmp_path / "out", "--fingerprint-cache", cache)
    assert "mode: incremental" in grown and "40 rows went through the model" in grown
    assert f"{len(before.row_groups)} of {len(after.row_groups)} row groups' fingerprints are kept in {cache}" in grown
    plain = encode(tmp_path / "plain", "--fingerprint-cache", "none")
    assert "40 rows went through the model" in plain and "fingerprints are kept" not in plain

    def ids(out: Path) -> list[tuple]:
        return sorted((r["item_id"], r["semantic_id"], r["active"]) for r in ledger_rows(out / SEMANTIC_IDS_TABLE))

    assert ids(tmp_path / "out") == ids(tmp_path / "plain") and len(ids(tmp_path / "out")) == len(valid_ids(catalog))
    helpers.assert_sid_checker_passes(tmp_path / "out" / SEMANTIC_IDS_TABLE, "--levels", "3", "--codebook-size", "16",
                                      "--previous-version", str(version))
