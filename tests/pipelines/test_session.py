"""EngineSession.materialize: compute a small, expensive frame once (the encode stage's output)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipelines.session import EngineSession, first_line, start_session

pytestmark = pytest.mark.spark


def counted_range(spark, n: int, calls: Path):  # noqa: ANN001, ANN201 - a Spark DataFrame
    """spark.range(n) through a Python UDF that appends its batch sizes to ``calls``."""

    def logged(batches):  # noqa: ANN001, ANN202 - mapInArrow function
        for b in batches:
            with open(calls, "a") as fh:
                fh.write(f"{b.num_rows}\n")
            yield b

    return spark.range(n).repartition(3).mapInArrow(logged, "id bigint")


def rows_computed(calls: Path) -> int:
    return sum(map(int, calls.read_text().split()))


def test_embedded_engine_computes_once_and_cleans_up_at_stop(tmp_path) -> None:
    calls = tmp_path / "calls.txt"
    es = start_session("local")  # a second embedded server in this process (the fixture's is the first)
    scratch = Path(es._scratch)
    try:
        kept = es.materialize(counted_range(es.spark, 500, calls))
        assert kept is not None and rows_computed(calls) == 500
        assert kept.count() == 500 and kept.where("id % 2 = 0").count() == 250
        assert sorted(r.id for r in kept.collect()) == list(range(500))
        assert rows_computed(calls) == 500  # later actions read the kept rows; the UDF did not run again
        assert any(scratch.iterdir())
    finally:
        es.stop()
    assert not scratch.exists()


def test_embedded_engine_splits_a_frame_into_parts_computed_once(tmp_path, spark, monkeypatch) -> None:
    """Each part is its own folder of the scratch directory: the rows of that part only, read without
    computing the frame again, in row groups of at most MATERIALIZED_ROW_GROUP_ROWS (what an open file
    buffers); a part without rows is an empty frame of the same columns."""
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from pipelines import session

    monkeypatch.setattr(session, "MATERIALIZED_ROW_GROUP_ROWS", 40)
    calls = tmp_path / "calls.txt"
    es = start_session("local")
    try:
        frame = counted_range(es.spark, 300, calls)
        parts = es.materialize_split(frame, F.when(F.col("id") < 100, 0).otherwise(2), 3)
        assert parts is not None and len(parts) == 3 and rows_computed(calls) == 300
        assert sorted(r.id for r in parts[0].collect()) == list(range(100))
        assert sorted(r.id for r in parts[2].collect()) == list(range(100, 300))
        assert parts[1].count() == 0 and parts[1].columns == parts[0].columns == frame.columns
        assert all(f"csid_part={p}" in "".join(parts[p].inputFiles()) for p in (0, 2))
        groups = [pq.ParquetFile(f.removeprefix("file://")).metadata for f in parts[2].inputFiles()]
        assert sum(g.num_rows for g in groups) == 200 and max(g.row_group(i).num_rows for g in groups
                                                              for i in range(g.num_row_groups)) <= 40
        assert rows_computed(calls) == 300
        assert es.materialize_split(frame, F.lit(0), 2) is None  # two parts: the caller filters twice
    finally:
        es.stop()
    classic_like = EngineSession(spark, "remote", True, _owns_session=False)
    assert classic_like.materialize_split(spark.range(3), F.lit(0), 1) is None  # filter a materialised frame


class _Refusing:
    """A stand-in DataFrame whose localCheckpoint fails with ``message``."""

    def __init__(self, message: str) -> None:
        self.message = message

    def localCheckpoint(self, eager: bool = True):  # noqa: N802, ANN201 - the pyspark name
        raise RuntimeError(self.message)


def test_engines_that_cannot_checkpoint_get_none_and_a_warning(spark, caplog) -> None:
    classic_like = EngineSession(spark, "remote", True, _owns_session=False)
    with caplog.at_level(logging.WARNING):
        got = classic_like.materialize(_Refusing("checkpoint object-store path is not configured"))  # type: ignore[arg-type]
    assert got is None
    assert "cannot materialise intermediate results" in caplog.text and "extra pass" in caplog.text


def test_a_failing_computation_is_not_mistaken_for_a_missing_feature(spark) -> None:
    classic_like = EngineSession(spark, "remote", True, _owns_session=False)
    with pytest.raises(RuntimeError, match="boom"):
        classic_like.materialize(_Refusing("boom: injected failure"))  # type: ignore[arg-type]


_IDLE = """
import json, os, sys, time
from contextlib import nullcontext
from pipelines.session import start_session
es = start_session("local")
es.spark.range(1).count()  # the engine's session exists from the first request on
with (es.kept_alive() if sys.argv[1] == "kept" else nullcontext()):
    time.sleep(6)  # the driver trains; the engine sees no request
try:
    print(json.dumps({"rows": es.spark.range(3).count()}))
except Exception as e:
    print(json.dumps({"error": str(e).splitlines()[0][:300]}))
sys.stdout.flush()
os._exit(0)  # a client whose session the server dropped can keep the interpreter from exiting
"""


@pytest.mark.parametrize("kept", [True, False], ids=["kept-alive", "idle"])
def test_a_session_outlives_a_long_training_only_when_kept_alive(tmp_path, kept) -> None:
    """Sail drops a session idle for SAIL_SPARK__SESSION_TIMEOUT_SECS (900 s by default): a training longer than
    that used to leave the job with a dead session at encode. Here the timeout is 2 s and the idle time 6 s."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "SAIL_SPARK__SESSION_TIMEOUT_SECS": "2", "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", _IDLE, "kept" if kept else "idle"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if kept:
        assert result == {"rows": 3}
    else:  # the control: without the keep-alive the session really is gone
        assert "error" in result and "not running" in result["error"], result


_HINTED = """
from pyspark.sql import functions as F
from pipelines.session import start_session
es = start_session("local")
print(es.spark.range(10).join(F.broadcast(es.spark.range(3)), "id").count())
es.stop()
"""


@pytest.mark.parametrize("rust_log", ["", "info"], ids=["default", "user-set"])
def test_the_embedded_engine_logs_its_warnings_not_the_jobs_hints(tmp_path, rust_log) -> None:
    """The job's stages hint broadcasts, which the embedded engine plans without: by default it must not
    print a warning per hint on every run (nor INFO lines on its start and stop); a RUST_LOG the user sets
    is theirs."""
    import subprocess
    import sys

    import helpers

    out = subprocess.run([sys.executable, "-c", _HINTED], env=helpers.subprocess_env(RUST_LOG=rust_log),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3"]
    if rust_log:  # the user's filter: Sail's INFO lines are there
        assert "Starting the Spark Connect server" in out.stderr
    else:
        assert "Hint operation" not in out.stderr and " INFO " not in out.stderr, out.stderr[-2000:]


class _FakeClassic:
    """Just what tune_local_delta reads and writes of a classic session."""

    def __init__(self, master: str, user_conf: dict[str, str], cores: int = 2) -> None:
        from types import SimpleNamespace

        self.set: dict[str, str] = {}
        self.sparkContext = SimpleNamespace(master=master, defaultParallelism=cores,
                                            getConf=lambda: SimpleNamespace(contains=user_conf.__contains__))
        self.conf = SimpleNamespace(set=self.set.__setitem__)


@pytest.mark.parametrize(("master", "user_conf", "expected"), [
    ("local[*]", {}, {"spark.databricks.delta.snapshotPartitions": "2"}),
    ("local[2]", {}, {"spark.databricks.delta.snapshotPartitions": "2"}),
    ("local[*]", {"spark.databricks.delta.snapshotPartitions": "8"}, {}),  # the user's --conf wins
    ("yarn", {}, {}),  # a cluster keeps Delta's default
    ("spark://head:7077", {}, {}),
])
def test_local_classic_sessions_replay_delta_logs_in_one_task_per_core(master, user_conf, expected,
                                                                       monkeypatch) -> None:
    from pipelines.session import tune_local_delta

    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    fake = _FakeClassic(master, user_conf)
    tune_local_delta(fake)  # type: ignore[arg-type]
    assert fake.set == expected


def test_databricks_and_sessions_without_a_spark_context_keep_deltas_default(spark, monkeypatch) -> None:
    from pipelines.session import tune_local_delta

    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")  # Databricks' single-node clusters run local[*, 4]
    fake = _FakeClassic("local[*, 4]", {})
    tune_local_delta(fake)  # type: ignore[arg-type]
    assert fake.set == {}
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION")
    tune_local_delta(spark)  # a Spark Connect session: reading its sparkContext raises; nothing is set, no error
    assert spark.conf.get("spark.databricks.delta.snapshotPartitions", None) is None


@pytest.mark.parametrize(("engine", "master", "databricks", "expected"), [
    ("local", None, False, True),  # the embedded engine runs in this process
    ("local", None, True, False),
    ("spark", "local[*]", False, True),
    ("spark", "local[*, 4]", True, False),  # a Databricks single-node cluster: its UDFs run sandboxed
    ("spark", "yarn", False, False),
    ("spark", "spark://head:7077", False, False),
    ("remote", None, False, False),
])
def test_which_sessions_run_their_tasks_on_this_machine(engine, master, databricks, expected, monkeypatch) -> None:
    if databricks:
        monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    else:
        monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    session = _FakeClassic(master, {}, cores=6) if master else object()
    es = EngineSession(session, engine, True, _owns_session=False)  # type: ignore[arg-type]
    assert es.on_this_machine() is expected
    assert es.parallelism() == (6 if engine == "spark" else os.cpu_count())


def test_an_errors_first_line_never_fails_on_its_message() -> None:
    # Error text shown in warnings and job failures: the first line, cut to the limit; an empty or blank message
    # (which str.splitlines() turns into no line at all) gives the error's type instead of an IndexError.
    assert first_line(RuntimeError("  engine failed: x\nat line 2\n")) == "engine failed: x"
    assert first_line(ValueError("y" * 300), 200) == "y" * 200
    assert first_line(ValueError("\n  \n")) == "ValueError" and first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
