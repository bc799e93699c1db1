"""The real CLIs as a user meets them (subprocesses): wrong invocations exit 2 with an
``error:`` line, no traceback, within seconds and without starting Ray; ``--help`` answers
fast; ``--print-config`` and ``--dry-run`` start nothing either.

"Ray never started" is checked, not assumed: every subprocess gets its own ``RAY_TMPDIR``,
and Ray creates ``<RAY_TMPDIR>/ray/session_*`` the moment it starts a local instance.

Time bounds are on the CPU time the command used (user + system, from ``getrusage`` of the
waited-for child): the test machines are shared, and wall time there measures the neighbours
(importing torch took 4 s alone and 25 s next to other test runs). Wall time keeps a generous
bound against hangs.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, TINY

from prn_ray import demo_data
from prn_ray.cli import EXIT_MEANINGS
from prn_ray.config import StorageConfig

pytestmark = pytest.mark.timeout(600)

ERROR_SECONDS = 10  # CPU seconds: the bound for a wrong invocation
HELP_SECONDS = 1.0  # CPU seconds: the bound for --help (measured 0.06-0.09 s)
WALL_SECONDS = 120  # against hangs only
SCRIPTS = ["jobs/train_all.py", "jobs/score.py", "jobs/evaluate.py", "jobs/demo.py",
           "jobs/make_manifest.py", "jobs/make_demo_data.py", "jobs/export.py",
           "jobs/predict.py", "jobs/models.py", "tune/search.py"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny demo tree, a malformed YAML file and output folders."""
    root = tmp_path_factory.mktemp("cli")
    demo_data.make_dataset(str(root / "data"), products=["fabric"], n_train=6, n_good_test=2,
                           n_defect_test=6, image_size=32)
    (root / "bad.yaml").write_text("train:\n  epochs: [1\n")
    return root


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(cmd: list[str], cwd) -> tuple[subprocess.CompletedProcess, float]:
    """The finished process and the CPU seconds it used (wall time bounded by the timeout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PRN_RAY_DEBUG")}
    env["PYTHONPATH"] = str(REPO)
    env["RAY_TMPDIR"] = str(cwd / "raytmp")
    before = cpu_seconds()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          timeout=WALL_SECONDS, cwd=cwd,
                          env=env)
    return proc, cpu_seconds() - before


def job(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


def sets(world) -> list[str]:
    return ["--config", str(TINY), "--set", f"data.root={world}/data",
            "--set", f"storage.runs_uri={world}/runs", "--set", f"storage.models_uri={world}/m"]


# (name, command builder, expected text in the error) -- ≥ 15 wrong invocations.
CASES = [
    ("unknown key", lambda w: job("jobs/train_all.py", *sets(w), "--set", "train.epoch=5"),
     ["unknown key train.epoch (did you mean train.epochs?)"]),
    ("wrong type", lambda w: job("jobs/train_all.py", *sets(w), "--set", "train.epochs=abc"),
     ["train.epochs: expected an integer"]),
    ("ranges, all at once", lambda w: job(
        "jobs/train_all.py", *sets(w), "--set", "train.epochs=-5", "--set", "data.image_size=0",
        "--set", "train.batch_size=0", "--set", "model.prototype_ratio=5", "--set", "train.lr=-1",
        "--set", "data.val_normal_fraction=1.5", "--set", "model.attention_patch_sizes=[3,0]",
        "--set", "train.selection_metric=nonsense"),
     ["8 problems in the config", "train.epochs must be >= 1, got -5",
      "data.image_size must be >= 32, got 0", "train.batch_size must be >= 1, got 0",
      "model.prototype_ratio must be > 0 and <= 1, got 5.0", "train.lr must be > 0, got -1.0",
      "data.val_normal_fraction must be > 0 and < 1, got 1.5",
      "model.attention_patch_sizes items must be >= 1, got [3, 0]",
      "train.selection_metric must be one of"]),
    ("unknown backbone", lambda w: job("jobs/train_all.py", *sets(w),
                                       "--set", "model.backbone=resnet999"),
     ["model.backbone 'resnet999' is not a timm model"]),
    ("missing weights file", lambda w: job("jobs/train_all.py", *sets(w),
                                           "--set", f"model.weights={w}/nope.safetensors"),
     ["model.weights: no such file"]),
    ("missing data", lambda w: job("jobs/train_all.py", *sets(w),
                                   "--set", "data.root=/nonexistent/prn-ray"),
     ["no files under"]),
    ("missing config", lambda w: job("jobs/train_all.py", "--config", "/nonexistent/prn.yaml"),
     ["config /nonexistent/prn.yaml"]),
    ("malformed YAML", lambda w: job("jobs/train_all.py", "--config", f"{w}/bad.yaml"),
     ["config {w}/bad.yaml, line 3, column 1: not valid YAML"]),
    ("empty --products", lambda w: job("jobs/train_all.py", *sets(w), "--products", ""),
     ["argument --products: expected comma-separated names"]),
    ("mistyped --use-tuned", lambda w: job("jobs/train_all.py", *sets(w),
                                           "--use-tuned", "study-typo"),
     ["--use-tuned study-typo: no best.json for fabric"]),
    ("mistyped --run-id", lambda w: job("jobs/train_all.py", *sets(w), "--run-id", "train-typo"),
     ["--run-id train-typo: no training run"]),
    ("tune without data", lambda w: job("tune/search.py", "--config", str(TINY),
                                        "--set", "tune.num_samples=2"),
     ["no data: set data.root"]),
    ("tune --samples 0", lambda w: job("tune/search.py", *sets(w), "--samples", "0"),
     ["--samples must be >= 1"]),
    ("tune --budget-s too small", lambda w: job("tune/search.py", *sets(w), "--budget-s", "90",
                                                "--samples", "4"),
     ["--budget-s / tune.budget_s: a study budget of 90s", "give at least"]),
    ("evaluate wrong type", lambda w: job("jobs/evaluate.py", *sets(w), "--set", "train.lr=fast"),
     ["train.lr: expected a number"]),
    ("evaluate missing manifest", lambda w: job("jobs/evaluate.py", *sets(w), "--set",
                                                "data.manifest=/nonexistent/m.parquet",
                                                "--set", "data.root="),
     ["manifest /nonexistent/m.parquet does not exist"]),
    ("evaluate --scores missing data", lambda w: job("jobs/evaluate.py", *sets(w), "--set",
                                                     "data.root=/nonexistent/prn-ray",
                                                     "--scores", f"{w}/scores"),
     ["no files under"]),
    ("evaluate --date without --scores", lambda w: job("jobs/evaluate.py", *sets(w),
                                                       "--date", "2026-01-01"),
     ["--date selects partitions of --scores"]),
    ("score unknown key", lambda w: job("jobs/score.py", *sets(w), "--input", "x",
                                        "--set", "score.nope=1"),
     ["unknown key score.nope"]),
    ("score missing input", lambda w: job("jobs/score.py", *sets(w),
                                          "--input", "/nonexistent/incoming"),
     ["--input /nonexistent/incoming: no such folder"]),
    ("score bad date", lambda w: job("jobs/score.py", *sets(w), "--input", f"{w}/data",
                                     "--date", "2026-13-01"),
     ["--date 2026-13-01: month must be in 1..12"]),
    ("score without --input", lambda w: job("jobs/score.py", *sets(w)),
     ["the following arguments are required: --input"]),
    ("demo bad choice", lambda w: job("jobs/demo.py", "--set", "train.use_gpu=maybe"),
     ["train.use_gpu must be one of auto, true, false, got 'maybe'"]),
    ("make_manifest missing root", lambda w: job("jobs/make_manifest.py", "mvtec", "--root",
                                                 "/nonexistent/mvtec", "--out", f"{w}/m.csv"),
     ["no files under"]),
    ("export unknown product", lambda w: job("jobs/export.py", *sets(w), "--product", "nope",
                                             "--format", "torchscript", "--out", f"{w}/x"),
     ["no model registered for product 'nope'"]),
    ("export unknown format", lambda w: job("jobs/export.py", *sets(w), "--product", "fabric",
                                            "--format", "tflite", "--out", f"{w}/x"),
     ["invalid choice: 'tflite'"]),
    ("predict missing input", lambda w: job("jobs/predict.py", *sets(w), "--product", "fabric",
                                            "--input", f"{w}/nothing-here", "--out", f"{w}/p"),
     ["no such file or folder"]),
    ("models bad key", lambda w: job("jobs/models.py", *sets(w), "--set", "storage.model_uri=x"),
     ["did you mean storage.models_uri?"]),
    ("prn-ray unknown command", lambda w: [sys.executable, "-m", "prn_ray.commands", "trian"],
     ["unknown command 'trian' (did you mean train?)"]),
]


@pytest.mark.parametrize("name,command,messages", CASES, ids=[c[0] for c in CASES])
def test_wrong_invocation_exits_2_with_one_line_before_ray(name, command, messages, world,
                                                           tmp_path):
    proc, seconds = run_cli(command(world), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "raytmp").exists(), "a Ray session was started"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for message in messages:
        assert message.replace("{w}", str(world)) in proc.stderr, proc.stderr[-2000:]
    assert seconds < ERROR_SECONDS, f"{name}: {seconds:.1f} CPU s"


def test_debug_env_shows_the_traceback(world, tmp_path):
    env_cmd = job("jobs/train_all.py", *sets(world), "--set", "train.epochs=0")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PRN_RAY_DEBUG": "1",
           "RAY_TMPDIR": str(tmp_path / "raytmp")}
    proc = subprocess.run(env_cmd, check=False, capture_output=True, text=True,
                          timeout=WALL_SECONDS, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "ConfigError: train.epochs must be >= 1, got 0" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_names_the_exit_codes(script, tmp_path):
    proc, seconds = run_cli(job(script, "--help"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps the epilog
    for code, meaning in EXIT_MEANINGS.items():  # the one table, every code
        assert f"{int(code)} {' '.join(meaning.split())}" in text, (code, text[-600:])
    assert seconds < HELP_SECONDS, f"{script} --help took {seconds:.2f} CPU s"


def test_prn_ray_help_lists_every_command_fast(tmp_path):
    from prn_ray.commands import COMMANDS

    proc, seconds = run_cli([sys.executable, "-m", "prn_ray.commands", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(f"  {name} " in proc.stdout for name in COMMANDS)
    assert seconds < HELP_SECONDS, f"prn-ray --help took {seconds:.2f} CPU s"
    proc, _ = run_cli([sys.executable, "-m", "prn_ray.commands", "train", "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: prn-ray train")


def test_cli_modules_do_not_import_heavy_libraries():
    """What ``--help`` loads: the CLI helpers and every command module, nothing heavy."""
    from prn_ray.commands import COMMANDS

    code = ("import sys, importlib\nimport prn_ray.cli\n"
            f"for m in {sorted(m for m, _ in COMMANDS.values())!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(n for n in ('torch', 'ray', 'pandas', 'pyarrow', 'timm', 'cv2')"
            " if n in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=WALL_SECONDS, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_demo_help_names_its_real_default_config(tmp_path):
    proc, _ = run_cli(job("jobs/demo.py", "--help"), tmp_path)
    assert "YAML config (default: configs/demo.yaml)" in " ".join(proc.stdout.split())


def test_print_config_applies_set_and_accepts_booleans(world, tmp_path):
    proc, _ = run_cli(job("jobs/train_all.py", "--config", str(TINY), "--set",
                          "train.use_gpu=true", "--set", "train.epochs=7", "--print-config"),
                      tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["use_gpu"] == "true" and printed["train"]["epochs"] == 7
    assert printed["model"]["backbone"] == "tf_efficientnet_lite0"  # from configs/tiny.yaml
    assert not (tmp_path / "raytmp").exists()


def test_train_and_tune_dry_runs_print_the_plan_without_ray(world, tmp_path):
    proc, _ = run_cli(job("jobs/train_all.py", *sets(world), "--dry-run"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "dry run: train 1 product(s): fabric" in proc.stdout
    header = next(line for line in lines if line.startswith("product"))
    row = next(line for line in lines if line.startswith("fabric")).split()
    counts = dict(zip(header.replace(" normal", "_normal").replace(" anomaly", "_anomaly")
                      .split()[1:], map(int, row[1:])))
    assert counts["test_normal"] == 2 and sum(counts.values()) == 6 + 2 + 6
    seen = counts.get("seen_anomaly", 0) + counts.get("val_anomaly", 0)
    assert f"fabric: {seen} seen anomalies ({seen} with masks, 0 with image labels only)" \
        in proc.stdout
    assert f"models -> {world}/m/<product>/<version>" in proc.stdout
    proc, _ = run_cli(job("tune/search.py", *sets(world), "--dry-run", "--samples", "3"),
                      tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 trial(s) per product" in proc.stdout and f"{world}/runs/tune/study-" in proc.stdout
    assert not (tmp_path / "raytmp").exists()


def test_score_dry_run_lists_images_and_models(world, tmp_path):
    tests = sorted((world / "data" / "fabric" / "test").rglob("*.png"))
    manifest = tmp_path / "incoming.csv"
    manifest.write_text("product,image_uri\n" + "".join(f"fabric,{p}\n" for p in tests))
    proc, _ = run_cli(job("jobs/score.py", *sets(world), "--input", str(manifest),
                          "--date", "2026-11-30", "--dry-run"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"dry run: score {len(tests)} image(s) of 1 product(s)" in proc.stdout
    assert "NO MODEL" in proc.stdout  # nothing registered under storage.models_uri
    assert "date=2026-11-30/product=<product>/" in proc.stdout
    assert not (tmp_path / "raytmp").exists()


def test_make_manifest_endpoint_url_after_the_layout(s3_endpoint, s3_bucket, tmp_path):
    """--endpoint-url after the subcommand is the one used (a wrong one before it is
    overridden); the subprocess has no AWS_ENDPOINT_URL to fall back on."""
    demo_data.make_dataset(f"{s3_bucket}/mv", StorageConfig(endpoint_url=s3_endpoint),
                           products=["fabric"], n_train=2, n_good_test=1, n_defect_test=2,
                           image_size=32)
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["PYTHONPATH"] = str(REPO)
    out = tmp_path / "mv.csv"
    proc = subprocess.run(
        job("jobs/make_manifest.py", "--endpoint-url", "http://127.0.0.1:9", "mvtec",
            "--root", f"{s3_bucket}/mv", "--out", str(out), "--endpoint-url", s3_endpoint),
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 images" in proc.stdout and out.is_file()
