"""The Databricks Asset Bundle (databricks.yml + resources/*.yml), checked without a workspace.

Each target's config is resolved the way ``databricks bundle validate`` resolves it (``${var.*}``
with the target's values, the ``${bundle.*}`` / ``${workspace.*}`` names the CLI fills in; any other
reference fails), every job is loaded with the PyPI ``databricks-bundles`` models (which refuse an
unknown field at every level), the parts those models do not cover are checked against the keys of
the CLI's bundle schema, and every task's parameters are parsed by the job's own argument parser.
The last test runs the jobs' task parameters on the embedded engine: the split retrain (train, then
encode with ``--mode full``) aligns to the table and is stopped by its churn gate.
"""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
import yaml
from databricks.bundles.jobs import Job
from packaging.specifiers import SpecifierSet

from jobs.config import JobConfig
from jobs.tokenize_catalog import parse_args

ROOT = helpers.ROOT
TARGETS = ("dev", "prod")
SCRIPT = ROOT / "jobs" / "tokenize_catalog.py"

# Keys of the CLI's bundle schema (github.com/databricks/cli, bundle/schema/jsonschema.json) for the
# parts that databricks-bundles has no model of; every one of these objects refuses other keys.
ROOT_KEYS = {"artifacts", "bundle", "environments", "experimental", "include", "permissions", "presets", "python",
             "resources", "run_as", "scripts", "sync", "targets", "variables", "workspace"}
BUNDLE_KEYS = {"cluster_id", "compute_id", "databricks_cli_version", "deployment", "engine", "git", "name", "uuid"}
ARTIFACT_KEYS = {"build", "dynamic_version", "executable", "files", "path", "type"}
VARIABLE_KEYS = {"default", "description", "lookup", "type"}
TARGET_KEYS = {"artifacts", "bundle", "cluster_id", "compute_id", "default", "git", "mode", "permissions", "presets",
               "resources", "run_as", "sync", "variables", "workspace"}
WORKSPACE_KEYS = {"account_id", "artifact_path", "auth_type", "azure_client_id", "azure_environment",
                  "azure_login_app_id", "azure_tenant_id", "azure_use_msi", "azure_workspace_resource_id", "client_id",
                  "experimental_is_unified_host", "file_path", "google_service_account", "host", "profile",
                  "resource_path", "root_path", "state_path", "workspace_id"}
# What the CLI fills in itself; values as a deploy by someone@example.com would see them.
USER = "someone@example.com"
BUILTINS = {"workspace.current_user.userName": USER, "workspace.current_user.short_name": "someone"}

# Apache Spark of each Databricks Runtime (docs.databricks.com, "Databricks Runtime release notes
# versions and compatibility"). A runtime missing here fails the test: add it with its Spark version.
RUNTIME_SPARK = {"17.3.x": "4.0.0", "18.x": "4.1.0", "19.x": "4.2.0"}
# GPU node families: AWS g4dn/g5/g6/g6e/p3/p4d/p5, Azure NC/ND/NV, GCP a2/a3/g2.
GPU_NODE = re.compile(r"^(g4dn|g5|g6e?|p3|p4de?|p5e?)\.|^Standard_N[CDV]|^(a2|a3|g2)-")
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
REF = re.compile(r"\$\{([^}]*)\}")


class BundleError(ValueError):
    """The bundle config is one the CLI would refuse (an unknown key, an unresolved reference)."""


# --- loading and resolving, as `databricks bundle validate -t TARGET` does --------------------------

@dataclass
class Bundle:
    config: dict[str, Any]  # databricks.yml with the included files' resources merged in
    job_files: dict[str, Path]  # job key -> the file that defines it (relative paths start there)


def load_bundle(path: Path = ROOT / "databricks.yml") -> Bundle:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    job_files = {key: path for key in config.get("resources", {}).get("jobs", {})}
    for pattern in config.get("include", []):
        files = sorted(path.parent.glob(pattern))
        if not files:
            raise BundleError(f"include {pattern!r} matches no file")
        for file in files:
            part = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            unknown(part, ROOT_KEYS - {"bundle", "include"}, str(file.relative_to(ROOT)))
            if set(part) - {"resources"}:
                raise BundleError(f"{file.name}: this test merges only 'resources' from included files")
            for key, job in part.get("resources", {}).get("jobs", {}).items():
                if key in job_files:
                    raise BundleError(f"job {key!r} is defined in {job_files[key].name} and in {file.name}")
                config.setdefault("resources", {}).setdefault("jobs", {})[key] = job
                job_files[key] = file
    return Bundle(config, job_files)


def unknown(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(mapping) - allowed)
    if extra:
        raise BundleError(f"{where}: unknown key(s) {extra}; the bundle schema allows {sorted(allowed)}")


def check_structure(config: dict[str, Any]) -> None:
    """The strict key check for what databricks-bundles' models do not load (everything but the jobs)."""
    unknown(config, ROOT_KEYS, "databricks.yml")
    unknown(config.get("bundle", {}), BUNDLE_KEYS, "bundle")
    if "name" not in config.get("bundle", {}):
        raise BundleError("bundle: 'name' is required")
    for name, artifact in config.get("artifacts", {}).items():
        unknown(artifact, ARTIFACT_KEYS, f"artifacts.{name}")
    for name, variable in config.get("variables", {}).items():
        unknown(variable, VARIABLE_KEYS, f"variables.{name}")
    for name, target in config.get("targets", {}).items():
        unknown(target, TARGET_KEYS, f"targets.{name}")
        unknown(target.get("workspace", {}), WORKSPACE_KEYS, f"targets.{name}.workspace")
        if target.get("mode") not in (None, "development", "production"):
            raise BundleError(f"targets.{name}.mode: {target['mode']!r} is neither development nor production")
        if "resources" in target:
            raise BundleError(f"targets.{name}.resources: this test does not merge target overrides of resources")
    unknown(config.get("resources", {}), {"jobs"}, "resources (this test checks jobs only)")


def resolve(bundle: Bundle, target: str) -> dict[str, Any]:
    """The config as target ``target`` deploys it: variables set, every ``${...}`` substituted."""
    config = bundle.config
    check_structure(config)
    values = {name: spec.get("default") for name, spec in config.get("variables", {}).items()}
    for name, value in config["targets"][target].get("variables", {}).items():
        if name not in values:
            raise BundleError(f"targets.{target}.variables.{name}: no such variable is declared")
        values[name] = value
    names = {"bundle.name": config["bundle"]["name"], "bundle.target": target, **BUILTINS}

    def lookup(ref: str, where: str, seen: tuple[str, ...]) -> Any:
        if ref in names:
            return names[ref]
        if ref.startswith("var.") and ref[4:] in values:
            if ref in seen:
                raise BundleError(f"{where}: variables refer to each other in a cycle: {' -> '.join(seen + (ref,))}")
            if values[ref[4:]] is None:
                raise BundleError(f"{where}: variable {ref[4:]!r} has no value for target {target!r}")
            return substitute(values[ref[4:]], f"variables.{ref[4:]}", seen + (ref,))
        raise BundleError(f"{where}: unresolved reference ${{{ref}}}")

    def substitute(node: Any, where: str, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(node, dict):
            return {k: substitute(v, f"{where}.{k}", seen) for k, v in node.items()}
        if isinstance(node, list):
            return [substitute(v, f"{where}[{i}]", seen) for i, v in enumerate(node)]
        if not isinstance(node, str):
            return node
        whole = REF.fullmatch(node)
        if whole:  # the value itself, with its type (an int stays an int)
            return lookup(whole.group(1), where, seen)
        return REF.sub(lambda m: str(lookup(m.group(1), where, seen)), node)

    resolved = {key: substitute(value, key) for key, value in config.items() if key not in ("variables", "targets")}
    resolved["target"] = substitute(config["targets"][target], f"targets.{target}")
    resolved["variables"] = {name: lookup(f"var.{name}", f"variables.{name}", ()) for name in values}
    return resolved


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle()


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest, bundle: Bundle) -> dict[str, Any]:
    return resolve(bundle, request.param)


def tasks(config: dict[str, Any], job: str) -> dict[str, dict[str, Any]]:
    return {task["task_key"]: task for task in config["resources"]["jobs"][job]["tasks"]}


def cluster(config: dict[str, Any], job: str, task: dict[str, Any]) -> dict[str, Any]:
    (spec,) = [c["new_cluster"] for c in config["resources"]["jobs"][job]["job_clusters"]
               if c["job_cluster_key"] == task["job_cluster_key"]]
    return spec


def parse_task(task: dict[str, Any], monkeypatch: pytest.MonkeyPatch | None = None) -> JobConfig:
    """The task's parameters through the job's own parser; with ``monkeypatch``, on a machine with one GPU."""
    if monkeypatch is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return parse_args(list(task["spark_python_task"]["parameters"]))


def quartz_days(cron: str) -> set[str]:
    """Days of the week a Quartz cron expression ('s m h day-of-month month day-of-week') fires on."""
    day_of_month, field = cron.split()[3], cron.split()[5]
    if field == "?":
        assert day_of_month == "*", f"{cron}: only every-day or day-of-week schedules are handled"
        return set(DAYS)
    days: set[str] = set()
    for part in field.upper().split(","):
        first, _, last = part.partition("-")
        start, stop = DAYS.index(first), DAYS.index(last or first)
        days |= set(DAYS[start:stop + 1])
    return days


# --- the config as the CLI and the job see it ------------------------------------------------------

def test_every_job_loads_with_the_databricks_bundles_models(bundle: Bundle, target: dict[str, Any]) -> None:
    jobs = {key: Job.from_dict(copy.deepcopy(spec)) for key, spec in target["resources"]["jobs"].items()}
    assert set(jobs) == {"retrain", "daily"}
    for key, job in jobs.items():
        assert job.max_concurrent_runs == 1, f"{key}: one run at a time per output (README, 'Killed runs')"
        for task, spec in zip(job.tasks, target["resources"]["jobs"][key]["tasks"]):
            assert task.spark_python_task is not None, f"{key}.{task.task_key}: the job script, for its exit code"
            params = spec["spark_python_task"]["parameters"]
            assert all(isinstance(p, str) for p in params), f"{key}.{task.task_key}: parameters are strings: {params}"
            script = bundle.job_files[key].parent / task.spark_python_task.python_file
            assert script.resolve() == SCRIPT, f"{key}.{task.task_key}: {script} is not the job script"
            wheels = [lib.whl for lib in task.libraries if lib.whl]
            assert [(bundle.job_files[key].parent / w).resolve() for w in wheels] == [ROOT / "dist" / "*.whl"], (
                f"{key}.{task.task_key}: install the artifact's wheel (dist/*.whl) on its cluster")


@pytest.mark.parametrize(("path", "key", "typo"), [
    ((), "max_concurrent_runs", "max_concurent_runs"),
    (("tasks", 1), "depends_on", "depend_on"),
    (("tasks", 0, "spark_python_task"), "parameters", "parameter"),
    (("job_clusters", 0, "new_cluster"), "node_type_id", "node_type"),
    (("schedule",), "quartz_cron_expression", "quartz_cron"),
])
def test_a_misspelled_job_key_is_refused(target: dict[str, Any], path: tuple[Any, ...], key: str, typo: str) -> None:
    job = copy.deepcopy(target["resources"]["jobs"]["retrain"])
    node = job
    for step in path:
        node = node[step]
    node[typo] = node.pop(key)
    with pytest.raises(ValueError, match=f"Unexpected field '{typo}'"):
        Job.from_dict(job)


@pytest.mark.parametrize(("path", "key", "typo"), [
    ((), "variables", "variable"),
    (("bundle",), "name", "nmae"),
    (("artifacts", "catalog_semantic_ids"), "build", "biuld"),
    (("variables", "catalog"), "default", "defualt"),
    (("targets", "prod"), "mode", "mod"),
    (("targets", "prod", "workspace"), "root_path", "rootpath"),
])
def test_a_misspelled_bundle_key_is_refused(bundle: Bundle, path: tuple[str, ...], key: str, typo: str) -> None:
    config = copy.deepcopy(bundle.config)
    node = config
    for step in path:
        node = node[step]
    node[typo] = node.pop(key)
    with pytest.raises(BundleError, match=f"unknown key\\(s\\) \\['{typo}'\\]"):
        resolve(Bundle(config, bundle.job_files), "prod")


@pytest.mark.parametrize(("text", "message"), [
    ("${var.catalgo}", r"unresolved reference \$\{var.catalgo\}"),
    ("${workspace.current_user.name}", r"unresolved reference \$\{workspace.current_user.name\}"),
    ("models:/${var.model_name}@${var.alias}", r"unresolved reference \$\{var.alias\}"),
])
def test_an_unresolved_reference_is_refused(bundle: Bundle, text: str, message: str) -> None:
    config = copy.deepcopy(bundle.config)
    config["resources"]["jobs"]["daily"]["tasks"][0]["spark_python_task"]["parameters"][-1] = text
    with pytest.raises(BundleError, match=message):
        resolve(Bundle(config, bundle.job_files), "dev")


def test_retrain_trains_on_a_gpu_then_encodes_full_with_the_churn_gate_on_cpus(
        target: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    v, steps = target["variables"], tasks(target, "retrain")
    assert list(steps) == ["train", "encode"]
    train, encode = steps["train"], steps["encode"]
    model = f"{v['catalog']}.{v['schema']}.catalog_semantic_ids"  # Unity Catalog: catalog.schema.model

    t = parse_task(train, monkeypatch)
    assert (t.stages, t.engine, t.train_config.device, t.align) == (("validate", "train"), "spark", "cuda",
                                                                    "warm-start")
    assert not t.encodes  # so --max-id-churn would gate nothing here
    gpu = cluster(target, "retrain", train)
    assert gpu["spark_version"].endswith("-gpu-ml-scala2.13") and GPU_NODE.match(gpu["node_type_id"]), gpu
    assert gpu["num_workers"] == 0  # training runs in the driver: one GPU node

    e = parse_task(encode)
    assert encode["depends_on"] == [{"task_key": "train"}] and encode.get("run_if", "ALL_SUCCESS") == "ALL_SUCCESS"
    assert (e.stages, e.engine, e.model, e.mode) == (("validate", "encode", "report"), "spark",
                                                     f"models:/{model}@candidate", "full")
    assert e.max_id_churn == float(v["max_id_churn"]) < 1  # 1 would turn the gate off
    cpu = cluster(target, "retrain", encode)
    assert cpu["spark_version"].endswith("-cpu-ml-scala2.13") and not GPU_NODE.match(cpu["node_type_id"]), cpu
    assert cpu["num_workers"] >= 1

    # Training aligns to the table the encode task publishes to: the same output, input and model.
    for c in (t, e):
        assert (c.input, c.input_format, c.output, c.output_table_prefix, c.model_name, c.experiment) == (
            v["input_table"], "table", None, f"{v['catalog']}.{v['schema']}", model, v["experiment"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: nothing to refuse")
def test_the_train_task_fails_at_start_on_a_node_without_a_gpu(target: dict[str, Any], capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_task(tasks(target, "retrain")["train"])
    assert stop.value.code == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err


def test_daily_encodes_new_items_with_the_champion_on_cpus(target: dict[str, Any]) -> None:
    v, (daily,) = target["variables"], tasks(target, "daily").values()
    d = parse_task(daily)
    model = f"{v['catalog']}.{v['schema']}.catalog_semantic_ids"
    assert (d.stages, d.engine, d.model, d.mode) == (("validate", "encode", "report"), "spark",
                                                     f"models:/{model}@champion", "incremental")
    assert (d.input, d.input_format, d.output_table_prefix, d.model_name) == (
        v["input_table"], "table", f"{v['catalog']}.{v['schema']}", model)
    cpu = cluster(target, "daily", daily)
    assert cpu == cluster(target, "retrain", tasks(target, "retrain")["encode"])  # the retrain's encode cluster


def test_every_cluster_runs_one_ml_runtime_whose_spark_setup_py_allows(target: dict[str, Any]) -> None:
    specs = [c["new_cluster"] for job in target["resources"]["jobs"].values() for c in job["job_clusters"]]
    runtimes = {re.sub(r"-(cpu|gpu)-ml-scala2\.13$", "", s["spark_version"]) for s in specs}
    assert len(runtimes) == 1, f"the GPU and CPU clusters must run one runtime (one MLflow, one torch): {runtimes}"
    (runtime,) = runtimes
    assert runtime in RUNTIME_SPARK, f"Databricks Runtime {runtime}: add its Apache Spark version to RUNTIME_SPARK"
    pyspark = re.search(r'"pyspark\[connect\]([^"]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    assert pyspark, "setup.py names no pyspark[connect] range"
    assert RUNTIME_SPARK[runtime] in SpecifierSet(pyspark.group(1)), (
        f"Databricks Runtime {runtime} runs Spark {RUNTIME_SPARK[runtime]}, outside setup.py's pyspark{pyspark[1]}")
    for spec in specs:
        assert spec["data_security_mode"] == "SINGLE_USER", "ML runtimes on Unity Catalog need dedicated access mode"
        assert spec["spark_env_vars"] == {"MLFLOW_TRACKING_URI": "databricks", "MLFLOW_REGISTRY_URI": "databricks-uc"}


def test_python_packages_the_ml_runtime_lacks_are_pinned_as_in_requirements(target: dict[str, Any]) -> None:
    pins = dict(line.split("#")[0].strip().split("==") for line in
                (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()
                if "==" in line.split("#")[0])
    for job in target["resources"]["jobs"].values():
        for task in job["tasks"]:
            packages = [lib["pypi"]["package"] for lib in task["libraries"] if "pypi" in lib]
            assert packages == [f"xxhash=={pins['xxhash']}"], (task["task_key"], packages)


def test_targets_keep_dev_apart_from_prod(bundle: Bundle) -> None:
    dev, prod = resolve(bundle, "dev"), resolve(bundle, "prod")
    assert (dev["target"]["mode"], prod["target"]["mode"]) == ("development", "production")
    assert dev["target"].get("default") is True
    for name in ("output_prefix", "model_name", "experiment"):  # a dev run never moves prod's IDs or @champion
        assert dev["variables"][name] != prod["variables"][name], name
    assert dev["variables"]["experiment"] == f"/Users/{USER}/catalog-semantic-ids-dev"
    assert prod["target"]["workspace"]["root_path"] == "/Workspace/Shared/.bundle/catalog-semantic-ids/prod"
    for config in (dev, prod):
        assert config["variables"]["experiment"].startswith("/"), "Databricks experiments are workspace paths"


def test_daily_runs_never_fall_on_the_retrain_day(target: dict[str, Any]) -> None:
    # One writer at a time per table: a daily run meeting a retrain's encode task would lose (exit 4).
    jobs = target["resources"]["jobs"]
    retrain, daily = (quartz_days(jobs[k]["schedule"]["quartz_cron_expression"]) for k in ("retrain", "daily"))
    assert retrain and daily and not retrain & daily, (retrain, daily)
    assert len(daily) == 6 and len(retrain) == 1


def test_the_artifact_build_makes_the_wheel_the_tasks_install(bundle: Bundle, tmp_path: Path) -> None:
    for name in ("setup.py", "README.md", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    for package in ("rqvae", "pipelines", "jobs"):
        subprocess.run(["cp", "-r", str(ROOT / package), str(tmp_path / package)], check=True)
    (artifact,) = bundle.config["artifacts"].values()
    assert artifact["type"] == "whl" and "files" not in artifact  # the CLI then uploads <path>/dist/*.whl
    build = subprocess.run(shlex.split(artifact["build"].replace("python ", f"{sys.executable} ", 1)),
                           cwd=tmp_path / artifact["path"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / artifact["path"] / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "tokenize-catalog = jobs.tokenize_catalog:main" in whl.read(entry_points).decode()
    assert {"jobs/tokenize_catalog.py", "jobs/runner.py", "pipelines/encode.py", "rqvae/__init__.py"} <= names


# --- the tasks' parameters, run on the embedded engine ---------------------------------------------

def on_this_machine(task: dict[str, Any], catalog: Path, out: Path, work: Path, *extra: str) -> list[str]:
    """The task's parameters with the Databricks-only ones swapped for local ones (embedded engine, a
    Delta path in and out, CPU training); every other flag as the bundle passes it."""
    swap = {"--engine": "local", "--input": str(catalog), "--input-format": "delta", "--work-dir": str(work),
            "--device": "cpu"}
    params = list(task["spark_python_task"]["parameters"])
    argv: list[str] = []
    for flag, value in zip(params[::2], params[1::2]):
        if flag != "--output-table-prefix":
            argv += [flag, swap.get(flag, value)]
    return [*argv, "--output", str(out), *extra]


@pytest.mark.spark
@pytest.mark.usefixtures("job_isolation")
def test_the_split_retrain_aligns_and_is_stopped_by_its_churn_gate(bundle: Bundle, tmp_path: Path) -> None:
    import pipelines.registry as registry
    from pipelines.demo import write_demo_catalog
    from pipelines.schema import SEMANTIC_IDS_TABLE
    from rqvae.synthetic import CatalogSpec

    config = resolve(bundle, "prod")
    retrain, daily = tasks(config, "retrain"), tasks(config, "daily")["encode"]
    model = config["variables"]["model_name"]
    catalog, out, work = tmp_path / "catalog", tmp_path / "tables", tmp_path / "work"
    write_demo_catalog(catalog, CatalogSpec(n_items=600, dim=16, seed=3))
    small = ["--sample-size", "600", *helpers.SMALL_MODEL, *helpers.GATE_OFF]
    sids = out / SEMANTIC_IDS_TABLE

    def run(task: dict[str, Any], *extra: str) -> tuple[int, str, str]:
        return helpers.run_main(on_this_machine(task, catalog, out, work, *extra))

    def published() -> dict[str, str]:
        return {r["item_id"]: r["semantic_id"] for r in helpers.read_delta(sids).to_pylist() if r["active"]}

    # Generation 1: train (registers @candidate), then encode with @candidate --mode full, which moves @champion.
    registry.configure_tracking(work)
    rc, _, err = run(retrain["train"], *small)
    assert rc == 0, err[-3000:]
    assert registry.alias_version(model, registry.CHAMPION) is None
    rc, out1, err = run(retrain["encode"])
    assert rc == 0, err[-3000:]
    assert "mode: full, because no semantic-ID table yet" in out1
    assert registry.alias_version(model, registry.CHAMPION) == "1"
    first = published()
    assert len(first) == 600
    rc, out2, err = run(daily)
    assert rc == 0, err[-3000:]
    assert "mode: incremental" in out2 and published() == first

    # A retrain: the train task finds the table through the shared output and warm-starts from its model.
    rc, out3, err = run(retrain["train"], *small, "--seed", "1")
    assert rc == 0, err[-3000:]
    assert f"warm start from models:/{model}/1 (the table's generation 1)" in out3
    assert "sampled items whose nearest codes keep their prefix (levels 1..L)" in out3
    # Between the two tasks the daily run still uses the table's model: @champion has not moved.
    assert registry.alias_version(model, registry.CHAMPION) == "1"
    rc, out_between, err = run(daily)
    assert rc == 0 and "mode: incremental" in out_between, err[-2000:]

    # A retrain whose codes move most IDs (no alignment): the encode task's churn gate stops it.
    rc, _, err = run(retrain["train"], *small, "--seed", "2", "--align", "none")
    assert rc == 0, err[-3000:]
    before = helpers.read_delta(sids).num_rows, published()
    rc, out4, err = run(retrain["encode"])
    assert rc == 3, out4[-2000:] + err[-2000:]
    assert f"is above --max-id-churn {config['variables']['max_id_churn']}" in err and "nothing was written" in err
    assert (helpers.read_delta(sids).num_rows, published()) == before
    # @champion stays on the published generation's model, so the daily runs go on as before.
    assert registry.alias_version(model, registry.CHAMPION) == "1"
    assert registry.alias_version(model, registry.CANDIDATE) == "3"
    rc, out5, err = run(daily)
    assert rc == 0, err[-3000:]
    assert "mode: incremental" in out5 and published() == first
