"""benchmarks/compare_masking.py: variant parsing, per-variant config overrides and gathering copied-back results."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("compare_masking", REPO_ROOT / "benchmarks/compare_masking.py")
compare_masking = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_masking)


def parse(monkeypatch: pytest.MonkeyPatch, *arguments: str):
    monkeypatch.setattr("sys.argv", ["compare_masking.py", "--dataset_name", "data", *arguments])
    return compare_masking.parse_args()


def test_split_variants_keeps_the_commas_of_config_overrides() -> None:
    text = "mae:--mask_strategy random,hint:--config_overrides hint_ratio=0.15,mask_feature_layer=2,late:"
    assert compare_masking.split_variants(text) == [
        ("mae", "--mask_strategy random"),
        ("hint", "--config_overrides hint_ratio=0.15,mask_feature_layer=2"),
        ("late", ""),
    ]
    assert compare_masking.split_variants("a:--seed 1, b:") == [("a", "--seed 1"), ("b", "")]
    with pytest.raises(SystemExit, match="not name:extra-arguments"):
        compare_masking.split_variants("mae")


def test_a_variants_config_overrides_come_after_the_common_ones(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    commands = []
    monkeypatch.setattr(compare_masking, "run", lambda command, log: commands.append(command))
    args = parse(monkeypatch, "--config_overrides", "num_hidden_layers=4,hint_ratio=0.06")
    compare_masking.pretrain(
        args, "hint", "--config_overrides hint_ratio=0.15 --informed_masking_start 0.4", 0, tmp_path
    )
    compare_masking.pretrain(args, "plain", "--mask_strategy random", 0, tmp_path)
    hinted, plain = commands
    assert hinted[hinted.index("--config_overrides") + 1] == "num_hidden_layers=4,hint_ratio=0.06,hint_ratio=0.15"
    assert hinted.count("--config_overrides") == 1
    assert hinted[hinted.index("--informed_masking_start") + 1] == "0.4"
    assert plain[plain.index("--config_overrides") + 1] == "num_hidden_layers=4,hint_ratio=0.06"
    compare_masking.pretrain(args, "equals", "--config_overrides=hint_ratio=0.2", 0, tmp_path)
    assert commands[-1][-2:] == ["--config_overrides", "num_hidden_layers=4,hint_ratio=0.06,hint_ratio=0.2"]
    with pytest.raises(SystemExit, match="without a value"):
        compare_masking.pretrain(args, "broken", "--config_overrides", 0, tmp_path)


def test_collect_only_gathers_written_results_and_records_missing_ones_as_null(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_subprocess(command, log):
        raise AssertionError(f"--collect_only ran {command}")

    monkeypatch.setattr(compare_masking, "run", no_subprocess)
    for seed, (variant, top1) in itertools.product((0, 1), (("mae", 0.40), ("sgmae", 0.42))):
        checkpoint = tmp_path / f"{variant}-seed{seed}/checkpoint-10"
        (checkpoint / "eval-frozen").mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": 1, "step": 10, "train_seconds": 90}))
        written = {f"{pooling}_{protocol}_top1": top1 + seed / 100 for protocol, pooling in compare_masking.POOLED}
        if variant == "mae" or seed == 0:
            (checkpoint / "eval-frozen/eval_results.json").write_text(json.dumps(written))
    analysis = {"feature_variance": 0.5, "attention_distance": [3.0, 5.0], "exploitation_rate_mask": [0.4, 0.6]}
    analysis |= {"reconstruction_loss": 0.7, "bipartition_gap": 0.2}
    (tmp_path / "mae-seed0/checkpoint-10/analysis").mkdir()
    (tmp_path / "mae-seed0/checkpoint-10/analysis/analysis.json").write_text(json.dumps(analysis))
    monkeypatch.setattr(
        "sys.argv",
        ["compare_masking.py", "--dataset_name", "data", "--collect_only", "--seeds", "0,1",
         "--epochs", "1", "--output_dir", str(tmp_path)],
    )  # fmt: skip
    compare_masking.main()
    written = json.loads((tmp_path / "compare_masking.json").read_text())
    mae, sgmae, mae_1, sgmae_1 = written["records"]
    assert (mae["variant"], mae["knn_mean"], mae["linear_probe_cls"], mae["train_minutes"]) == ("mae", 40.0, 40.0, 1.5)
    assert (mae["attention_distance_last"], mae["exploitation_mask_share"]) == (5.0, 0.5)
    assert sgmae["knn_cls"] == pytest.approx(42.0) and sgmae["feature_variance"] is None
    assert sgmae_1["knn_cls"] is None and mae_1["knn_cls"] == pytest.approx(41.0)
    # the summary: mean and spread over the seeds that have a value, and the difference from the first variant
    mae_row, sgmae_row = written["summary"]["rows"]
    assert mae_row["linear_probe_mean"] == pytest.approx({"mean": 40.5, "min": 40.0, "max": 41.0})
    assert sgmae_row["linear_probe_mean"] == pytest.approx({"mean": 42.0, "min": 42.0, "max": 42.0})
    assert sgmae_row["delta_knn_mean"] == pytest.approx(1.5)
    assert written["summary"]["reached"]["sgmae"] == pytest.approx(
        {"epoch": 1, "train_minutes": 1.5, "time_ratio": 1.0}
    )
    assert (tmp_path / "compare_masking.png").stat().st_size > 0


def test_the_pretraining_command_is_one_run_pretraining_accepts(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    commands = []
    monkeypatch.setattr(compare_masking, "run", lambda command, log: commands.append(command))
    args = parse(monkeypatch, "--dataset_config_name", "112px", "--input_path", "decode_once")
    compare_masking.pretrain(args, "sgmae", "--mask_strategy self_guided", 0, tmp_path)
    spec = importlib.util.spec_from_file_location("run_pretraining", REPO_ROOT / "run_pretraining.py")
    run_pretraining = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_pretraining", run_pretraining)  # dataclasses look their module up
    spec.loader.exec_module(run_pretraining)
    monkeypatch.setattr("sys.argv", commands[0][1:])
    model_args, data_args, pretraining_args = run_pretraining.parse_args()
    assert (data_args.dataset_config_name, pretraining_args.input_path) == ("112px", "decode_once")
    assert (pretraining_args.save_total_limit, model_args.mask_strategy) == (0, "self_guided")


def test_parallel_runs_below_one_is_refused(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--parallel_runs", "0")
    assert "--parallel_runs must be at least 1" in capsys.readouterr().err
