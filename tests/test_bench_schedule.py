"""benchmarks.bench_schedule: whole schedules in alternating rounds, their epoch clocks and paired ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_schedule

# seconds of each epoch a fake run reports, per variant and round: MAE's clock drifts, SG-MAE's refresh shows
EPOCHS = {("mae", 0): [10.0, 10.0, 10.0], ("mae", 1): [12.0, 12.0, 12.0]}
EPOCHS |= {("sgmae", 0): [10.0, 14.0, 12.0], ("sgmae", 1): [12.0, 16.8, 14.4]}


def test_rounds_alternate_and_ratios_pair_each_round(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    order = []

    def fake_run(command: list[str], log: Path) -> None:
        folder = Path(command[command.index("--output_dir") + 1])
        name, _, round_index = folder.name.partition("-round")
        assert command[command.index("--num_train_epochs") + 1] == "3" and "--max_train_samples" in command
        assert ("random" in command) == (name == "mae") and command[command.index("--seed") + 1] == "1"
        order.append(name)
        total = 0.0
        for epoch, seconds in enumerate(EPOCHS[name, int(round_index)], start=1):
            total += seconds
            (folder / f"checkpoint-{epoch}").mkdir(parents=True)
            state = {"epoch": epoch, "train_seconds": total}
            (folder / f"checkpoint-{epoch}/trainer_state.json").write_text(json.dumps(state))

    monkeypatch.setattr(bench_schedule, "run", fake_run)
    output = tmp_path / "schedule.json"
    monkeypatch.setattr("sys.argv", [
        "bench_schedule.py", "--dataset_name", "data", "--epochs", "3", "--max_train_samples", "64",
        "--variants", "mae:--mask_strategy random,sgmae:--mask_strategy self_guided", "--seeds", "1,0",
        "--runs_dir", str(tmp_path / "runs"), "--rounds", "2", "--output", str(output),
        "--eval_epochs", "1,3",  # compare_masking.py's evaluation arguments are accepted
    ])  # fmt: skip
    bench_schedule.main()
    assert order == ["mae", "sgmae", "sgmae", "mae"]
    report = json.loads(output.read_text())
    mae, sgmae = report["rows"]
    assert report["reference"] == "mae" and report["commit"]
    assert mae["ratio_to_reference_per_round"] == [1.0, 1.0]
    assert sgmae["ratio_to_reference_per_round"] == pytest.approx([1.2, 1.2])  # 36 / 30 and 43.2 / 36
    assert sgmae["total_s_median"] == pytest.approx((36 + 43.2) / 2)
    assert sgmae["epoch_s_median"] == pytest.approx([11.0, 15.4, 13.2])
    assert report["epoch_s"]["sgmae"][1] == pytest.approx(EPOCHS["sgmae", 1])
    assert not list((tmp_path / "runs/bench_schedule").iterdir())  # each run's checkpoints are removed


def test_rounds_must_be_positive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.argv", ["bench_schedule.py", "--dataset_name", "data", "--rounds", "0",
                                     "--output", str(tmp_path / "out.json")])  # fmt: skip
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        bench_schedule.main()
