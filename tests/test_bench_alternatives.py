"""bench/alternatives.py's (s) variant, the hand-written "no Spark" script (delta-rs + rqvae + NumPy), issues
exactly the job's semantic IDs on the same catalog and model: codes after the collision spread, suffixes and
the ID strings. Otherwise the benchmark would compare the job with a script that does less work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers
import numpy as np
import pytest

from pipelines.demo import write_demo_catalog
from rqvae import ModelConfig, TrainConfig, encode_array, fit, save_checkpoint
from rqvae.synthetic import CatalogSpec, make_catalog

pytestmark = [pytest.mark.spark]

BENCH = helpers.ROOT / "bench" / "alternatives.py"
JOB = helpers.ROOT / "jobs" / "tokenize_catalog.py"
N_ITEMS, DIM = 400, 16


def test_the_no_spark_script_issues_the_jobs_semantic_ids(tmp_path) -> None:
    spec = CatalogSpec(N_ITEMS, DIM, seed=3)
    catalog = tmp_path / "catalog"
    write_demo_catalog(catalog, spec)
    # 4 x 4 x 4 tuples for 400 items with 2 ranked alternatives: many items move off a collision and many
    # still share a tuple, so both the spread and the suffix order are exercised.
    config = ModelConfig(input_dim=DIM, hidden_dims=(32, 16), latent_dim=8, num_levels=3, codebook_size=4,
                         collision_alternatives=2)
    fitted = fit(make_catalog(spec).embeddings, config, TrainConfig(epochs=2, batch_size=256, seed=0))
    model = save_checkpoint(fitted.model, tmp_path / "model.pt")

    env = helpers.subprocess_env()
    job = subprocess.run(
        [sys.executable, str(JOB), "--input", str(catalog), "--output", str(tmp_path / "job"),
         "--work-dir", str(tmp_path / "work"), "--model", str(model), "--max-reject-share", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    script = subprocess.run(
        [sys.executable, str(BENCH), "--worker", "s", "--catalog", str(catalog), "--model", str(model),
         "--output", str(tmp_path / "standalone" / "semantic_ids")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, (script.stdout + script.stderr)[-4000:]
    counts = json.loads(script.stdout.strip().splitlines()[-1])
    assert counts["rows"] == N_ITEMS and counts["skipped"] == 0
    assert counts["moved"] > 10, counts  # the collision spread ran ...
    assert counts["max_suffix"] >= 2, counts  # ... and tuples still shared by several items got suffixes

    ours = helpers.by_item(helpers.read_delta(tmp_path / "job" / "semantic_ids"))
    theirs = helpers.by_item(helpers.read_delta(tmp_path / "standalone" / "semantic_ids"))
    assert sorted(ours) == sorted(theirs) == list(range(N_ITEMS))
    assert all(r["active"] for r in ours.values())
    for column in ("codes", "suffix", "semantic_id"):
        differ = [i for i in ours if ours[i][column] != theirs[i][column]]
        examples = [(ours[i], theirs[i]) for i in differ[:2]]
        assert not differ, f"{column} differs for {len(differ)} items, e.g. {examples}"
    # An item's own code's error is the explicit |r - c|: the same to float32 precision in both. A moved
    # item's is its alternative's, from the squared distances the ranking used (rqvae.quantizer.ranked_codes),
    # whose last bits depend on the batch the engine gave the model (24 of 400 items off by up to 2e-4
    # relative in one CI run): the same code, not always the same bits.
    nearest = encode_array(fitted.model, make_catalog(spec).embeddings).codes[:, -1]
    moved = np.array([ours[i]["codes"][-1] != nearest[i] for i in range(N_ITEMS)])
    assert moved.sum() == counts["moved"]
    theirs_err = np.array([theirs[i]["quantization_error"] for i in range(N_ITEMS)])
    ours_err = np.array([ours[i]["quantization_error"] for i in range(N_ITEMS)])
    np.testing.assert_allclose(theirs_err[~moved], ours_err[~moved], rtol=1e-6)
    np.testing.assert_allclose(theirs_err[moved], ours_err[moved], rtol=1e-3)
    assert sum(r["suffix"] > 0 for r in theirs.values()) >= 10
    assert theirs[0]["semantic_id"] == "_".join(map(str, [*theirs[0]["codes"], theirs[0]["suffix"]]))

    # bench/scale_check.py, the sampled check used where (s) cannot hold the catalog (50M): it agrees with
    # the job's table, and it fails on a table that another model issued.
    check = [sys.executable, str(helpers.ROOT / "bench" / "scale_check.py"), "--catalog", str(catalog),
             "--table", str(tmp_path / "job" / "semantic_ids"), "--sample", "300"]
    good = subprocess.run([*check, "--model", str(model)], env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, (good.stdout + good.stderr)[-3000:]
    result = json.loads(good.stdout.strip().splitlines()[-1])
    assert result["sampled"] == result["valid"] == 300 and result["missing"] == result["prefix_mismatches"] == 0
    assert result["exact"] + result["moved_to_alternative"] + result["second_chance"] == 300
    assert result["moved_to_alternative"] > 5 and result["last_code_not_ranked"] == 0
    other = save_checkpoint(fit(make_catalog(spec).embeddings, config, TrainConfig(epochs=2, batch_size=256,
                                                                                     seed=1)).model,
                            tmp_path / "other.pt")
    bad = subprocess.run([*check, "--model", str(other)], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and json.loads(bad.stdout.strip().splitlines()[-1])["prefix_mismatches"] > 0


def test_the_quantized_benchmark_catalog_has_few_values_close_to_the_generated_ones(monkeypatch) -> None:
    from rqvae.synthetic import iter_catalog_chunks

    monkeypatch.syspath_prepend(str(helpers.ROOT / "bench"))
    from make_catalog import quantizer

    spec = CatalogSpec(3000, 32, seed=1)
    transform = quantizer(8)
    chunks = list(iter_catalog_chunks(spec, 1000))
    quantized = np.concatenate([transform(c).embeddings for c in chunks])
    original = np.concatenate([c.embeddings for c in chunks])
    assert len(np.unique(quantized)) <= 255
    step = 4 * float(chunks[0].embeddings.std()) / 127
    inside = np.abs(original) <= 4 * chunks[0].embeddings.std()
    assert np.abs(quantized - original)[inside].max() <= step / 2 + 1e-7  # rounding to the nearest level


def test_the_benchmarks_write_the_quantized_catalog_under_its_own_name(monkeypatch, tmp_path) -> None:
    from deltalake import DeltaTable

    monkeypatch.syspath_prepend(str(helpers.ROOT / "bench"))
    import encode_throughput

    monkeypatch.setattr(encode_throughput, "OUT", tmp_path)
    quantized = encode_throughput.catalog_path(500, 16, "delta", quantize_bits=8)
    plain = encode_throughput.catalog_path(500, 16, "delta")
    assert (quantized.name, plain.name) == ("catalog_500_16_q8_delta", "catalog_500_16_delta")

    def values(path) -> np.ndarray:
        table = DeltaTable(str(path)).to_pyarrow_dataset().to_table().sort_by("item_id")
        return np.stack(table["embedding"].to_numpy(zero_copy_only=False))

    q, x = values(quantized), values(plain)
    assert q.shape == x.shape == (500, 16)
    assert len(np.unique(q)) <= 255 < len(np.unique(x))  # the same items, rounded to 255 levels
    assert np.abs(q - x).max() <= 4 * float(x.std()) / 127  # within one level's step (generous: sigma of all)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PSS is read from /proc")
def test_the_memory_sampler_counts_a_forked_childs_shared_pages_once_in_pss(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(helpers.ROOT / "bench"))
    from encode_throughput import run_sampled

    # 400 MB touched by the parent, then a fork that only sleeps: its RSS repeats the parent's pages.
    script = ("import os, time, numpy as np\n"
              "a = np.ones(50_000_000)\n"
              "pid = os.fork()\n"
              "time.sleep(2.0)\n"
              "os._exit(0) if pid == 0 else os.waitpid(pid, 0)\n")
    rc, wall, rss, pss, _ = run_sampled([sys.executable, "-c", script], dict(os.environ))
    assert rc == 0 and wall >= 2.0
    assert rss >= 2 * 380  # both processes show the 400 MB
    assert 380 <= pss <= 0.6 * rss  # counted once between them


def test_the_floors_are_their_engines_and_compared_with_the_full_run(monkeypatch) -> None:
    """--variants f,i0 adds the full runs the floors are shares of ... the floor worker starts the embedded engine
    as the job does and says how long its parts took ... and a floor above 0.15 x its full run says the daily-run
    target is out of reach."""
    monkeypatch.syspath_prepend(str(helpers.ROOT / "bench"))
    import alternatives

    assert alternatives.selected("f,i0") == ["e", "k", "f_local", "f_spark", "i0_local", "i0_spark"]
    with pytest.raises(SystemExit, match="unknown variant 'f_remote'"):
        alternatives.selected("f_remote")
    worker = subprocess.run([sys.executable, str(BENCH), "--worker", "floor", "--engine", "local"],
                            env=helpers.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
    parts = json.loads(worker.stdout.strip().splitlines()[-1])
    assert parts["worker"] == "floor" and parts["imports_s"] > 0 and parts["engine_start_s"] > 0
    figures = {"e": {"wall_s": 30.0}, "f_local": {"wall_s": 3.0}, "k": {"wall_s": 60.0}, "f_spark": {"wall_s": 12.0}}
    rows = {r["ratio"]: r for r in alternatives.floors(figures)}
    assert set(rows) == {"f_local/e", "f_spark/k"}  # no (0) runs given: no row for them
    assert rows["f_local/e"]["value"] == pytest.approx(0.1) and rows["f_local/e"]["target_reachable"]
    assert rows["f_spark/k"]["target_s"] == pytest.approx(9.0) and not rows["f_spark/k"]["target_reachable"]
