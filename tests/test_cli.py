"""``margin-regs``: end to end on a tiny setting, and its errors."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import margin_regs
from margin_regs.experiments import cli, recipes

TINY = ["--train-size", "64", "--epochs", "2", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", *TINY, "--seeds", "2", "--regularizers", "vanilla,spectral"]
    argv += ["--coeff", "spectral=0.5", "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(argv)
    return code, stdout.getvalue(), out


def test_compare_prints_one_table(two_seeds):
    code, stdout, _ = two_seeds
    assert code == 0
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.split()}
    assert "test acc %" in rows["regularizer"] and "σ_max" in rows["regularizer"]
    assert rows["vanilla"].rstrip().endswith("1.00×")
    assert rows["spectral"].split()[1] == "0.5"


def test_results_json_has_every_field_and_consistent_summary(two_seeds):
    _, _, out = two_seeds
    with open(out / "results.json") as f:
        results = json.load(f)
    assert {"config", "machine", "regularizers", "summary", "runs"} <= set(results)
    assert results["config"]["seeds"] == 2 and results["config"]["epochs"] == 2
    assert results["regularizers"]["spectral"]["coeff"] == 0.5
    assert results["regularizers"]["spectral"]["reference"].startswith("Yoshida")
    runs = results["runs"]
    assert [(r["regularizer"], r["seed"]) for r in runs] == [
        ("vanilla", 0),
        ("vanilla", 1),
        ("spectral", 0),
        ("spectral", 1),
    ]
    for run in runs:
        for key in (
            "train_loss",
            "train_acc",
            "val_acc",
            "test_loss",
            "test_acc",
            "seconds",
        ):
            assert len(run["history"][key]) == 2, key
        assert set(run["history"]["sigma_max"]) == set(run["final"]["sigma_max"])
        assert set(run["singular_values"]) == set(run["final"]["sigma_max"])
        assert run["early_stopping"]["enabled"] is False
        assert len(run["input_margins"]) == results["config"]["test_size"]
    summary = results["summary"]
    for name in ("vanilla", "spectral"):
        accs = [r["final"]["test_acc"] for r in runs if r["regularizer"] == name]
        assert summary[name]["test_acc_mean"] == pytest.approx(np.mean(accs))
        assert summary[name]["test_acc_std"] == pytest.approx(np.std(accs))
        for key in (
            "yoshida_gap",
            "sigma_max",
            "stable_rank",
            "median_output_margin",
            "median_input_margin",
            "relative_time",
        ):
            assert summary[name][key] is not None, (name, key)
    assert summary["vanilla"]["relative_time_clock"] == "interleaved_seconds_per_epoch"
    assert summary["vanilla"]["relative_time"] == 1.0
    # What the recipe claims: spectral lowers every layer's top σ on the same seeds.
    for layer, sigma in summary["vanilla"]["sigma_max"].items():
        assert summary["spectral"]["sigma_max"][layer] < sigma


def test_compare_writes_the_plots(two_seeds):
    import matplotlib.image

    _, _, out = two_seeds
    for name in ("singular_spectra.png", "input_margins.png", "accuracy_curves.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something was drawn


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--regularizers", "vanilla,nope"], "unknown 'nope'"),
        (["compare", "--regularizers", "vanilla,vanilla"], "repeated"),
        (["compare", "--epochs", "0"], "expected a positive integer, got 0"),
        (["compare", "--lr", "-1"], "expected a positive number"),
        (["compare", "--model", "vgg"], "invalid choice: 'vgg'"),
        (["compare", "--coeff", "spectral"], "expected NAME=VALUE"),
        (
            ["compare", "--coeff", "jacobian=1", "--regularizers", "vanilla"],
            "not among",
        ),
        (["compare", "--coeff", "vanilla=1"], "has no hyperparameter"),
        (["compare", "--coeff", "spectral=-1"], "must be a finite number ≥ 0"),
        (["compare", "--coeff", "dropout=1", "--regularizers", "dropout"], "in [0, 1)"),
        (
            [
                "compare",
                "--coeff",
                "early_stopping=2.5",
                "--regularizers",
                "early_stopping",
            ],
            "patience must be a whole number",
        ),
        (["compare", "--dataset", "/no/such/place"], "no such file or folder"),
        (["compare", "--train-size", "100000"], "--train-size: train_size=100000"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option_and_regularizer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--model", "--train-size", "--epochs", "--batch-size"):
        assert option in text
    for option in ("--seeds", "--regularizers", "--coeff", "--patience", "--out"):
        assert option in text
    for name, recipe in recipes.RECIPES.items():
        assert f"  {name}" in text
        assert recipe.reference.split()[0] in text


def test_bench_is_handed_to_the_harness(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--help"])
    assert info.value.code == 0
    assert "--quick" in capsys.readouterr().out


# A child interpreter in which the experiments extra's modules cannot be imported.
WITHOUT_EXTRAS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import margin_regs
from margin_regs.experiments import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _without_extras(*argv):
    blocked = (*cli.EXTRA_MODULES, "pandas")
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS.format(blocked=blocked), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_core_install_names_the_extra_and_prints_the_version():
    result = _without_extras("compare", "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "margin-regs compare needs the experiments extra (missing: "
        + ", ".join(cli.EXTRA_MODULES)
        + "): pip install 'margin_regs[experiments]'"
    ]
    assert "Traceback" not in result.stderr
    version = _without_extras("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"margin-regs {margin_regs.__version__}"


def test_the_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "margin_regs.experiments.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"margin-regs {margin_regs.__version__}"
