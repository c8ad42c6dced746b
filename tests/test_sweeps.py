"""Hydra multirun: a 2 × 2 grid gives four job directories, collected into one table."""

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from scproto.sweeps import collect_sweep, parse_override, read_sweep
from scproto.train import CONFIG_DIR
from tests.conftest import run_train_cli


def test_overrides_parse_to_typed_values():
    assert parse_override("sinkhorn.epsilon=0.05") == ("sinkhorn.epsilon", 0.05)
    assert parse_override("+trainer.fast_dev_run=true") == ("trainer.fast_dev_run", True)
    assert parse_override("data.query_studies=[a,b]") == ("data.query_studies", ["a", "b"])


def test_two_by_two_multirun_gives_four_jobs_and_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    run_train_cli(
        "-m",
        "debug=default",
        "loss.lambda_prop=0,3",
        "sinkhorn.epsilon=0.02,0.05",
        "trainer.fast_dev_run=true",
        "trainer.enable_progress_bar=false",
        "query.epochs=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        assert (sweep / job / "metrics.json").is_file()
        assert (sweep / job / "checkpoints/last.ckpt").is_file()

    table = collect_sweep(sweep, tmp_path / "collected")
    _, swept = read_sweep(sweep)
    assert swept == ["loss.lambda_prop", "sinkhorn.epsilon"]
    pairs = set(zip(table["loss.lambda_prop"], table["sinkhorn.epsilon"], strict=True))
    assert pairs == {(0, 0.02), (0, 0.05), (3, 0.02), (3, 0.05)}
    assert (table["status"] == "done").all() and table["train/loss"].notna().all()
    # the job's own record agrees with the table
    settings = yaml.safe_load((sweep / "3/.hydra/config.yaml").read_text())
    row = table.set_index("job").loc["3"]
    assert row["loss.lambda_prop"] == settings["loss"]["lambda_prop"]
    assert row["sinkhorn.epsilon"] == settings["sinkhorn"]["epsilon"]
    written = pd.read_csv(tmp_path / "collected/sweep.csv")
    assert len(written) == 4
    markdown = (tmp_path / "collected/sweep.md").read_text()
    assert "| job | loss.lambda_prop | sinkhorn.epsilon |" in markdown
    assert (tmp_path / "collected/sweep.png").stat().st_size > 10_000


def test_a_job_without_metrics_is_listed_not_dropped(tmp_path):
    for job, metrics in (("0", '{"scib/total": 0.5}'), ("1", None)):
        hydra_dir = tmp_path / job / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text(f"- model.n_prototypes={100 * (int(job) + 1)}\n")
        if metrics:
            (tmp_path / job / "metrics.json").write_text(metrics)
    table, swept = read_sweep(tmp_path)
    assert swept == ["model.n_prototypes"]
    assert list(table["status"]) == ["done", "no metrics.json"]


def test_empty_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no job directories"):
        read_sweep(tmp_path)


@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_hparams_search_configs_compose(search):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper") if search == "optuna" else None
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"hparams_search={search}"], return_hydra_config=True
        )
    assert cfg.optimized_metric == "scib/total" and cfg.eval.enabled
    params = cfg.hydra.sweeper.params
    assert {"loss.lambda_prop", "sinkhorn.epsilon", "model.n_prototypes"} <= set(params)
    if search == "optuna":
        assert "OptunaSweeper" in cfg.hydra.sweeper._target_
        assert cfg.hydra.sweeper.direction == "maximize"


def test_the_optimized_metric_is_returned_or_named_when_missing(make_config):
    from scproto import ScProtoInputError
    from scproto.train import optimized_value, validate_config

    assert optimized_value({"scib/total": 0.7}, "scib/total") == 0.7
    assert optimized_value({"scib/total": 0.7}, None) is None
    with pytest.raises(ScProtoInputError, match="optimized_metric=scib/bio"):
        optimized_value({"scib/total": 0.7}, "scib/bio")
    with pytest.raises(ScProtoInputError, match="eval=none"):
        validate_config(make_config("optimized_metric=scib/total"))  # conftest sets eval=none
