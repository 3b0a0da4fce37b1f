"""benchmarks.compare_masking (its runs and report modules): variant parsing, per-variant config overrides, gathering
copied-back results, and the committed tables regenerated from their records."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from benchmarks import compare_masking, masking_report, masking_runs


def test_options_are_a_dataclass_checked_like_the_scripts(monkeypatch):
    args = parse(monkeypatch, "--seeds", "0,1", "--probe_pooling", "cls", "--evaluate_only")
    assert isinstance(args, masking_runs.CompareArguments) and args.seeds == "0,1" and args.evaluate_only
    assert args.runs_dir.endswith("compare_masking")  # the default: named after the output folder
    with pytest.raises(SystemExit, match=r"unknown argument\(s\): --learning_rate \(closest: --base_learning_rate"):
        parse(monkeypatch, "--learning_rate", "1e-3")


def parse(monkeypatch: pytest.MonkeyPatch, *arguments: str):
    monkeypatch.setattr("sys.argv", ["compare_masking.py", "--dataset_name", "data", *arguments])
    return compare_masking.parse_args()


def test_split_variants_keeps_the_commas_of_config_overrides() -> None:
    text = "mae:--mask_strategy random,hint:--config_overrides hint_ratio=0.15,mask_feature_layer=2,late:"
    assert masking_runs.split_variants(text) == [
        ("mae", "--mask_strategy random"),
        ("hint", "--config_overrides hint_ratio=0.15,mask_feature_layer=2"),
        ("late", ""),
    ]
    assert masking_runs.split_variants("a:--seed 1, b:") == [("a", "--seed 1"), ("b", "")]
    with pytest.raises(SystemExit, match="not name:extra-arguments"):
        masking_runs.split_variants("mae")


def test_a_variants_config_overrides_come_after_the_common_ones(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    args = parse(monkeypatch, "--config_overrides", "num_hidden_layers=4,hint_ratio=0.06")
    hinted = masking_runs.pretraining_command(
        args, "hint", "--config_overrides hint_ratio=0.15 --informed_masking_start 0.4", 0, tmp_path
    )
    plain = masking_runs.pretraining_command(args, "plain", "--mask_strategy random", 0, tmp_path)
    assert hinted[hinted.index("--config_overrides") + 1] == "num_hidden_layers=4,hint_ratio=0.06,hint_ratio=0.15"
    assert hinted.count("--config_overrides") == 1
    assert hinted[hinted.index("--informed_masking_start") + 1] == "0.4"
    assert plain[plain.index("--config_overrides") + 1] == "num_hidden_layers=4,hint_ratio=0.06"
    equals = masking_runs.pretraining_command(args, "equals", "--config_overrides=hint_ratio=0.2", 0, tmp_path)
    assert equals[-2:] == ["--config_overrides", "num_hidden_layers=4,hint_ratio=0.06,hint_ratio=0.2"]
    with pytest.raises(SystemExit, match="without a value"):
        masking_runs.pretraining_command(args, "broken", "--config_overrides", 0, tmp_path)


def write_checkpoint(run_dir: Path, epoch: int, top1: float | None, analysis: dict | None = None) -> Path:
    """A checkpoint folder as run_pretraining.py writes it, with the evaluation files the benchmark reads."""
    checkpoint = run_dir / f"checkpoint-{10 * epoch}"
    (checkpoint / "eval-frozen").mkdir(parents=True)
    state = {"epoch": epoch, "step": 10 * epoch, "train_seconds": 90 * epoch}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    if top1 is not None:
        written = {f"{pooling}_{protocol}_top1": top1 for protocol, pooling in masking_report.POOLED}
        (checkpoint / "eval-frozen/eval_results.json").write_text(json.dumps(written))
    if analysis is not None:
        (checkpoint / "analysis").mkdir()
        (checkpoint / "analysis/analysis.json").write_text(json.dumps(analysis))
    return checkpoint


def test_collect_only_gathers_written_results_and_later_sittings_keep_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_subprocess(command, log):
        raise AssertionError(f"--collect_only ran {command}")

    monkeypatch.setattr(masking_runs, "run", no_subprocess)
    monkeypatch.setattr(masking_runs, "start", no_subprocess)
    runs, output = tmp_path / "runs", tmp_path / "out"
    analysis = {"feature_variance": 0.5, "attention_distance": [3.0, 5.0], "exploitation_rate_mask": [0.4, 0.6]}
    analysis |= {"reconstruction_loss": 0.7, "bipartition_gap": 0.2, "object_part_fraction": 0.3}
    analysis |= {"half_cut_share": 0.8, "object_centre_share": 0.29, "position_share": [0.2, 0.6]}
    for seed, (variant, top1) in itertools.product((0, 1), (("mae", 0.40), ("sgmae", 0.42))):
        missing = variant == "sgmae" and seed == 1
        found = None if missing else top1 + seed / 100
        write_checkpoint(
            runs / f"{variant}-seed{seed}", 1, found, analysis if variant == "mae" and seed == 0 else None
        )
    arguments = ["compare_masking.py", "--dataset_name", "data", "--collect_only", "--seeds", "0,1", "--epochs", "1",
                 "--output_dir", str(output), "--runs_dir", str(runs)]  # fmt: skip
    monkeypatch.setattr("sys.argv", arguments)
    compare_masking.main()
    written = json.loads((output / "compare_masking.json").read_text())
    mae, sgmae, mae_1 = written["records"]  # the one not evaluated is left for a later sitting
    assert (mae["variant"], mae["knn_mean"], mae["linear_probe_cls"], mae["train_minutes"]) == ("mae", 40.0, 40.0, 1.5)
    assert (mae["attention_distance_last"], mae["exploitation_mask_share"]) == (5.0, 0.5)
    assert mae["object_part_fraction"] == 0.3
    assert (mae["half_cut_share"], mae["object_centre_share"], mae["position_share_last"]) == (0.8, 0.29, 0.6)
    assert sgmae["half_cut_share"] is None and sgmae["position_share_last"] is None
    assert sgmae["knn_cls"] == pytest.approx(42.0) and sgmae["feature_variance"] is None
    assert (mae_1["seed"], mae_1["knn_cls"]) == (1, pytest.approx(41.0))
    # the summary: mean and spread over the seeds that have a value, and the difference from the first variant
    mae_row, sgmae_row = written["summary"]["rows"]
    assert mae_row["linear_probe_mean"] == pytest.approx({"mean": 40.5, "min": 40.0, "max": 41.0})
    assert sgmae_row["linear_probe_mean"] == pytest.approx({"mean": 42.0, "min": 42.0, "max": 42.0})
    assert sgmae_row["delta_knn_mean"] == pytest.approx(2.0)  # paired: seed 0 only, the seed both have
    assert mae_row["feature_variance"] == pytest.approx({"mean": 0.5, "min": 0.5, "max": 0.5})
    assert sgmae_row["feature_variance"] is None
    reached = written["summary"]["reached"]
    assert list(reached) == ["linear_probe_mean", "linear_probe_cls"]  # the headline pooling first
    assert reached["linear_probe_cls"]["sgmae"] == pytest.approx(
        {"epoch": 1, "epoch_ratio": 1.0, "train_minutes": 1.5, "time_ratio": 1.0}
    )
    assert (output / "compare_masking.png").stat().st_size > 0
    report = (output / "compare_masking.md").read_text()  # the docs' tables, headline (mean) pooling first
    assert (
        "| mae | 1 | 40.50 [40.00, 41.00] | 40.50 [40.00, 41.00] | 40.50 [40.00, 41.00] | 40.50 [40.00, 41.00] | "
        "- | 0.300 | 0.80 | 0.60 | 5.0 | 0.500 |" in report
    )
    assert "| sgmae | 1 | 42.00 [42.00, 42.00] (+2.00) | 42.00 [42.00, 42.00] (+2.00) | " in report
    assert "| mae | 1 | 1 | 41.00 | 41.00 | 41.00 | 41.00 | - | - | 1.5 |" in report
    assert "- sgmae: epoch 1 (1.00x the epochs, 1.00x the minutes)" in report
    assert "| sgmae | mean | 1 of 1 epochs (1) | none | epoch 1, 1.00x the epochs (not met) |" in report

    # a later sitting: the checkpoints are gone, the records stay, and the missing evaluation is added
    shutil.rmtree(runs)
    write_checkpoint(runs / "sgmae-seed1", 1, 0.45)
    compare_masking.main()
    records = json.loads((output / "compare_masking.json").read_text())["records"]
    assert records[:3] == written["records"]
    assert (records[3]["variant"], records[3]["seed"], records[3]["knn_mean"]) == ("sgmae", 1, 45.0)

    monkeypatch.setattr("sys.argv", [*arguments, "--batch_size", "64"])
    with pytest.raises(SystemExit, match="holds a comparison with other settings \\(batch_size\\)"):
        compare_masking.main()


def test_checkpoints_are_evaluated_while_the_run_goes_on_and_the_run_leaves_time_for_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A sitting: pre-training gets the sitting's minutes less the evaluation reserve; each evaluation epoch is
    evaluated as soon as its checkpoint appears, while the (here simulated) run is still going."""
    runs, output = tmp_path / "runs", tmp_path / "out"
    started, evaluated_while_running = [], []

    def fake_start(command, log):
        started.append(command)
        run_dir = Path(command[command.index("--output_dir") + 1])
        write_checkpoint(run_dir, 1, None)  # epoch 1 is written at once; epoch 2 after the first poll
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])

    def fake_run(command, log):
        checkpoint = Path(command[command.index("--model_name_or_path") + 1])
        evaluated_while_running.append((checkpoint.name, started and not (checkpoint.parent / "done").exists()))
        written = {f"{pooling}_{protocol}_top1": 0.5 for protocol, pooling in masking_report.POOLED}
        (checkpoint / "eval-frozen/eval_results.json").write_text(json.dumps(written))
        if checkpoint.name == "checkpoint-10":
            write_checkpoint(checkpoint.parent, 2, None)
            (checkpoint.parent / "done").touch()

    monkeypatch.setattr(masking_runs, "start", fake_start)
    monkeypatch.setattr(masking_runs, "run", fake_run)
    monkeypatch.setattr(masking_runs, "run_analysis", lambda args, checkpoint: {})
    monkeypatch.setattr(masking_runs, "POLL_SECONDS", 0.2)
    monkeypatch.setattr(
        "sys.argv",
        ["compare_masking.py", "--dataset_name", "data", "--variants", "mae:--mask_strategy random", "--epochs", "2",
         "--output_dir", str(output), "--runs_dir", str(runs), "--stop_after_minutes", "30"],
    )  # fmt: skip
    compare_masking.main()
    (command,) = started
    minutes = float(command[command.index("--stop_after_minutes") + 1])
    assert 30 - 8 - 1 < minutes <= 30 - 8  # --evaluation_minutes' default: 8
    assert evaluated_while_running[0] == ("checkpoint-10", True)
    records = json.loads((output / "compare_masking.json").read_text())["records"]
    assert [(record["epoch"], record["knn_mean"]) for record in records] == [(1, 50.0), (2, 50.0)]
    assert (runs / "mae-seed0").is_dir() and not (output / "mae-seed0").exists()


def test_the_pretraining_command_is_one_run_pretraining_accepts(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    args = parse(monkeypatch, "--dataset_config_name", "112px", "--input_path", "decode_once")
    commands = [masking_runs.pretraining_command(args, "sgmae", "--mask_strategy self_guided", 0, tmp_path)]
    spec = importlib.util.spec_from_file_location("run_pretraining", REPO_ROOT / "run_pretraining.py")
    run_pretraining = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_pretraining", run_pretraining)  # dataclasses look their module up
    spec.loader.exec_module(run_pretraining)
    monkeypatch.setattr("sys.argv", commands[0][1:])
    model_args, data_args, pretraining_args = run_pretraining.parse_args()
    assert (data_args.dataset_config_name, pretraining_args.input_path) == ("112px", "decode_once")
    assert (pretraining_args.save_total_limit, model_args.mask_strategy) == (0, "self_guided")


def test_parallel_runs_below_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="error: --parallel_runs must be at least 1"):
        parse(monkeypatch, "--parallel_runs", "0")


def test_first_reaching_names_the_first_epoch_at_the_reference_final_probe() -> None:
    def row(variant: str, epoch: int, probe: float, minutes: float) -> dict:
        spread = {"mean": probe, "min": probe, "max": probe}
        return {"variant": variant, "epoch": epoch, "linear_probe_cls": spread, "train_minutes": {"mean": minutes}}

    rows = [row("mae", 10, 50.0, 10.0), row("mae", 20, 55.0, 20.0)]
    rows += [row("sgmae", 10, 55.5, 12.0), row("sgmae", 20, 58.0, 25.0), row("late", 10, 40.0, 9.0)]
    reached = masking_report.first_reaching(rows, "mae", "linear_probe_cls", {})
    assert reached["mae"] == {"epoch": 20, "epoch_ratio": 1.0, "train_minutes": 20.0, "time_ratio": 1.0}
    assert reached["sgmae"] == {"epoch": 10, "epoch_ratio": 0.5, "train_minutes": 12.0, "time_ratio": 0.6}
    assert reached["late"] is None


def test_measured_schedules_give_the_time_to_the_reference_final_probe(tmp_path) -> None:
    """Seconds up to the variant's epoch over the reference's up to its final epoch, each from its own file."""
    timings = []
    for name, variant, seconds in (("cached", "sgmae", [1.0, 3.0]), ("step", "sgmae_step", [2.0, 2.0])):
        rows = [{"variant": "mae", "epoch_s_median": [1.0, 1.0]}, {"variant": variant, "epoch_s_median": seconds}]
        timings.append(tmp_path / f"{name}.json")
        timings[-1].write_text(json.dumps({"reference": "mae", "rows": rows}))
    clocks = masking_report.schedule_clocks(",".join(map(str, timings)), epochs=2)
    assert clocks["sgmae"] == ([1.0, 4.0], [1.0, 2.0]) and clocks["sgmae_step"] == ([2.0, 4.0], [1.0, 2.0])

    def row(variant: str, epoch: int, probe: float) -> dict:
        spread = {"mean": probe, "min": probe, "max": probe}
        return {"variant": variant, "epoch": epoch, "linear_probe_cls": spread, "train_minutes": {"mean": 1.0}}

    rows = [row("mae", 1, 50.0), row("mae", 2, 55.0), row("sgmae", 1, 56.0), row("sgmae_step", 1, 55.0)]
    reached = masking_report.first_reaching(rows, "mae", "linear_probe_cls", clocks)
    assert [reached[name]["clock_ratio"] for name in ("mae", "sgmae", "sgmae_step")] == [1.0, 0.5, 1.0]
    for summary_row in rows:  # the curves against the measured time
        summary_row |= {key: summary_row["linear_probe_cls"] for key in masking_report.ACCURACIES}
    masking_report.plot({"reference": "mae", "rows": rows}, tmp_path / "curves.png", clocks)
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="does not time a 3-epoch schedule"):
        masking_report.schedule_clocks(str(timings[0]), epochs=3)


def test_a_missing_schedule_timing_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"error: --schedule_timings: no such file: .*absent\.json"):
        parse(monkeypatch, "--schedule_timings", str(tmp_path / "absent.json"))


def test_a_timing_of_another_schedule_is_refused_before_any_run(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    timing = tmp_path / "timing.json"
    timing.write_text(json.dumps({"reference": "mae", "rows": [{"variant": "mae", "epoch_s_median": [1.0, 1.0]}]}))
    arguments = ["--epochs", "3", "--schedule_timings", str(timing), "--output_dir", str(tmp_path / "out")]
    args = parse(monkeypatch, *arguments)
    with pytest.raises(SystemExit, match="does not time a 3-epoch schedule"):
        masking_runs.Records(args, [("mae", "--mask_strategy random", 0)])


def test_target_table_counts_the_epochs_ahead_by_a_point_and_behind_on_knn() -> None:
    rows = [{"variant": "mae", "epoch": epoch} for epoch in (10, 20)]
    rows += [
        {"variant": "sgmae", "epoch": 10, "delta_linear_probe_cls": 1.2, "delta_knn_cls": -0.3},
        {"variant": "sgmae", "epoch": 20, "delta_linear_probe_cls": 0.9, "delta_knn_cls": 0.0},
    ]
    reached = {"linear_probe_cls": {"sgmae": {"epoch": 10, "epoch_ratio": 0.5}}}
    lines = masking_report.target_table({"reference": "mae", "rows": rows, "reached": reached}, ["cls"])
    assert lines[-1] == "| sgmae | [CLS] | 1 of 2 epochs (10) | 10 | epoch 10, 0.50x the epochs (met) |"
    assert len(lines) == 5  # title, blank, header, rule, one row: the reference gets none
    reached["linear_probe_cls"]["sgmae"]["clock_ratio"] = 0.81
    lines = masking_report.target_table({"reference": "mae", "rows": rows, "reached": reached}, ["cls"])
    assert lines[-1].endswith("| epoch 10, 0.50x the epochs (met), 0.81x the measured time (not met) |")
    reached["linear_probe_cls"]["mae"] = {"epoch": 10, "epoch_ratio": 0.5}  # the reference levels off at epoch 10
    lines = masking_report.target_table({"reference": "mae", "rows": rows, "reached": reached}, ["cls"])
    assert lines[-1].endswith("0.81x the measured time (not met); mae itself: epoch 10 |")


def test_the_committed_tables_regenerate_byte_identical_from_their_records(monkeypatch, tmp_path) -> None:
    """The summary in the JSON and the Markdown tables come from the records alone: the report module and a
    --collect_only sitting of the comparison's own command regenerate them unchanged."""
    committed = REPO_ROOT / "benchmarks/results/imagenette196_cached/compare_masking.json"
    text, markdown = masking_report.regenerated(committed)
    assert text == committed.read_text()
    assert markdown == committed.with_suffix(".md").read_text()

    output = tmp_path / "imagenette196_cached"
    output.mkdir()
    shutil.copyfile(committed, output / "compare_masking.json")
    command = shlex.split(json.loads(committed.read_text())["command"])[2:]  # past `python benchmarks/...py`
    for option in ("--output_dir", "--runs_dir", "--stop_after_minutes", "--schedule_timings"):
        at = command.index(option)
        del command[at : at + 2]
    timings = masking_report.checked_out(json.loads(committed.read_text())["args"]["schedule_timings"])
    command += ["--output_dir", str(output), "--runs_dir", str(tmp_path / "runs"), "--collect_only"]
    monkeypatch.setattr("sys.argv", ["compare_masking", *command, "--schedule_timings", timings])
    compare_masking.main()
    assert (output / "compare_masking.md").read_text() == committed.with_suffix(".md").read_text()
