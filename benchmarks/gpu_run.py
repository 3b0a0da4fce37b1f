"""The scale answer in one lent accelerator call: MAE against SG-MAE with a ViT-S encoder on 196 patches, within
the call's limits, plus our ViT-B/16 step against transformers' ViTMAE.

    bash benchmarks/gpu_run.sh --prepare                      # on this machine: what travels, and the command
    bash benchmarks/gpu_run.sh --output "$OUT"                # on the lent machine (default: --preset vits)
    bash benchmarks/gpu_run.sh --smoke --data DIR --output D  # the same path on a CPU: tiny model, one epoch

In order, from the script's start (its budget, default 8 minutes, ends the call; everything stops 60 s before it):
1. versions first, then the missing packages from `.whl/` (`pip install --no-index`);
2. our ViT-B/16 training step against ViTMAE with SDPA, bf16, with MFU (`benchmarks.bench_model`, at most 60 s);
3. the comparison (`benchmarks.compare_masking`), every run at once on the device: the rate is estimated from the
   cost model (a ViT-S image ≈ 10.8 GFLOP, 0.95 M images a run) and then measured from the runs' own first epochs;
   if every seed cannot finish, the runs go on with seed 0 alone (it resumes from its checkpoints);
4. what comes back, in `--output`: gpu_run.json (versions, plan, speed from the runs' own epochs, the ViT-B step,
   the comparison's summary), compare_masking.md, compare_masking.png, gpu_run.log and records.tar.gz (every record,
   evaluation, analysis, panel and log; unpacked, `python -m benchmarks.compare_masking ... --collect_only` rebuilds
   the tables, as gpu_run.json's `collect_command` says).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.lent_machine import FILES_BACK, files_coming_back
from benchmarks.provenance import REPO, code_commit

STOP_BEFORE_END = 60  # seconds kept free at the end of the budget
PACKING_SECONDS = 20  # the report and the archive, after the runs stop
VIT_B_SECONDS = 60
IMAGENETTE_TRAIN = 9469
VITS = "image_size=112,patch_size=8,decoder_hidden_size=256,decoder_num_hidden_layers=4,decoder_num_attention_heads=8"
TINY = "image_size=112,patch_size=8,num_hidden_layers=4,decoder_num_hidden_layers=2"


@dataclass(frozen=True)
class Preset:
    """One comparison that fits a call: model, data scale, seeds, schedule and evaluations."""

    config_name: str
    config_overrides: str
    seeds: str
    epochs: int
    eval_epochs: str
    batch_size: int = 128
    extra: tuple[str, ...] = ()


PRESETS = {
    # ViT-S encoder (12 x 384, 6 heads), decoder 4 x 256, Imagenette 112 px / patch 8: the paper's 196 patches
    "vits": Preset(
        "configuration/models/sgmae-vit-small-patch16-224.json",
        VITS + ",decoder_intermediate_size=1024",
        "0,1",
        100,
        "25,50,75,100",
    ),
    # the CPU comparisons' 4 x 192 model and protocol, three seeds: its records extend those curves
    "tiny": Preset("configuration/models/sgmae-vit-tiny-patch4-cifar.json", TINY, "0,1,2", 30, "5,10,15,20,30"),
    # the same path on a CPU in a minute: one block each side, a few images, one epoch
    "smoke": Preset(
        "configuration/models/sgmae-vit-tiny-patch4-cifar.json",
        "num_hidden_layers=1,decoder_num_hidden_layers=1",
        "0",
        1,
        "1",
        batch_size=8,
        extra=(
            "--max_train_samples",
            "32",
            "--probe_train_samples",
            "32",
            "--probe_eval_samples",
            "16",
            "--probe_epochs",
            "1",
        ),
    ),
}


class Log:
    """Lines printed and kept in gpu_run.log, each with the seconds since the script's start."""

    def __init__(self, path: Path, started: float):
        self.path, self.started = path, started
        path.write_text("")

    def __call__(self, text: str) -> None:
        line = f"[{time.time() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


VERSIONS = """
import json, sys
from importlib import metadata
found = {"python": sys.version.split()[0]}
for name in ("torch", "transformers", "accelerate", "datasets", "evaluate", "pyarrow"):
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
try:
    import datasets, evaluate
except ImportError as error:
    found["import_error"] = str(error)
print(json.dumps(found))
"""


def versions() -> dict[str, str | None]:
    """Python and the packages the call uses as its subprocesses see them (None: not installed), and why
    `datasets` or `evaluate` does not import where it does not."""
    return json.loads(subprocess.run([sys.executable, "-c", VERSIONS], capture_output=True, text=True).stdout)


def install_missing(log: Log, site: Path) -> None:
    """`datasets` and `evaluate` from the carried wheels where this Python lacks them (no index, no network)."""
    manifest = REPO / ".whl" / "manifest.txt"
    if not manifest.is_file():
        log("no .whl/manifest.txt: nothing to install (bash benchmarks/gpu_run.sh --prepare makes it)")
        return
    names = manifest.read_text().split()
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--find-links", str(REPO / ".whl"), "--target", str(site), *names]
    result = subprocess.run(command, capture_output=True, text=True)
    log(f"installed from .whl: {' '.join(names)}" if result.returncode == 0 else f"pip: {result.stderr.strip()}")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


def model_config(preset: Preset):
    """The compared model's configuration: the preset's file with its overrides."""
    from modeling_sgmae import SGMAEConfig

    config = SGMAEConfig.from_json_file(str(REPO / preset.config_name))
    for assignment in preset.config_overrides.split(","):
        key, _, value = assignment.partition("=")
        setattr(config, key, type(getattr(config, key))(value))
    return config


def vit_b_step(log: Log, work: Path, smoke: bool) -> dict | None:
    """Our ViT-B/16 step against ViTMAE with SDPA (bf16 on a GPU), same weights and noise, in at most 60 s; None
    when it did not finish in time."""
    output = work / "bench_model_vitb.json"
    command = [sys.executable, "-m", "benchmarks.bench_model", "--layouts", "vit_mae,sgmae_random",
               "--output", str(output), "--skip_self_guided", "--skip_cached"]  # fmt: skip
    if smoke:
        command += ["--device", "cpu", "--configs", "smoke"]
    else:
        command += ["--device", "cuda", "--configs", "vitb", "--steps", "10", "--warmup", "3"]
    try:
        subprocess.run(command, check=True, timeout=VIT_B_SECONDS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        log(f"the ViT-B/16 step did not finish in {VIT_B_SECONDS} s; going on")
        return None
    except subprocess.CalledProcessError as error:
        log(f"the ViT-B/16 step failed: {error.stderr.decode().strip().splitlines()[-1]}")
        return None
    (measured,) = json.loads(output.read_text())["results"][0]["vs_vit_mae"]
    keys = ("images_per_s", "mfu", "speedup", "matmul_tflops", "loss_abs_difference_same_noise", "peak_memory_gib")
    found = {key: measured[key] for key in keys}
    log(f"ViT-B/16 step: {json.dumps(found)}")
    return found


def comparison_command(args: argparse.Namespace, preset: Preset, seeds: str, work: Path, minutes: float) -> list[str]:
    """`benchmarks.compare_masking` for the preset: every run at once, evaluations as checkpoints appear."""
    runs = len(seeds.split(",")) * 2
    command = [sys.executable, "-m", "benchmarks.compare_masking", "--dataset_name", args.data]
    if (Path(args.data) / "112px").is_dir():
        command += ["--dataset_config_name", "112px"]
    command += [
        "--config_name", preset.config_name, "--config_overrides", preset.config_overrides,
        "--variants", "mae:--mask_strategy random,sgmae:--mask_strategy self_guided", "--seeds", seeds,
        "--epochs", str(preset.epochs), "--eval_epochs", preset.eval_epochs, "--batch_size", str(preset.batch_size),
        "--base_learning_rate", "1e-3", "--input_path", "decode_once", "--probe_pooling", "cls",
        "--parallel_runs", str(runs), "--keep_checkpoints", "evaluated", "--num_workers", "2",
        "--evaluation_minutes", f"{args.evaluation_minutes:g}", "--stop_after_minutes", f"{minutes:.2f}",
        "--output_dir", str(work / "comparison"), "--runs_dir", str(work / "runs"), *preset.extra,
    ]  # fmt: skip
    return command


def run_states(runs: Path) -> dict[str, dict]:
    """Each run's newest checkpoint state (epoch, step, samples_seen, train_seconds: the loop's own clock)."""
    states = {}
    for folder in sorted(path for path in runs.glob("*-seed*") if path.is_dir()):
        found = [json.loads(path.read_text()) for path in folder.glob("checkpoint-*/trainer_state.json")]
        if found:
            states[folder.name] = max(found, key=lambda state: state["step"])
    return states


class Comparison:
    """The comparison's process group: started, measured in its first minute, cut to seed 0 when every seed
    cannot finish before `stop_at`, and stopped there at the latest."""

    def __init__(self, args: argparse.Namespace, preset: Preset, work: Path, log: Log, stop_at: float):
        self.args, self.preset, self.work, self.log, self.stop_at = args, preset, work, log, stop_at
        self.process: subprocess.Popen | None = None
        self.seeds, self.decisions = preset.seeds, []

    def start(self, seeds: str) -> None:
        self.seeds, self.started = seeds, time.time()
        minutes = (self.stop_at - time.time()) / 60
        command = comparison_command(self.args, self.preset, seeds, self.work, minutes)
        self.command = command
        if minutes <= self.args.evaluation_minutes + 0.5:
            self.log(f"{minutes:.1f} min left: too little for the comparison and its evaluations")
            self.process = None
            return
        self.log(f"comparison, seeds {seeds}, {minutes:.1f} min: {shlex.join(command[1:])}")
        with (self.work / "compare_masking.log").open("a") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait()

    def projected_end(self) -> float | None:
        """When the slowest run would finish at its measured seconds per epoch (None before every run has one)."""
        states = run_states(self.work / "runs")
        if len(states) < 2 * len(self.seeds.split(",")) or any(state["epoch"] < 1 for state in states.values()):
            return None
        remaining = [(self.preset.epochs - s["epoch"]) * s["train_seconds"] / s["epoch"] for s in states.values()]
        return time.time() + max(remaining) + 60 * self.args.evaluation_minutes

    def supervise(self, measure_after: float) -> None:
        """Wait for the comparison; after `measure_after` s, once every run has an epoch, measure and decide."""
        measured = False
        while self.process is not None and self.process.poll() is None:
            if time.time() >= self.stop_at:
                self.log("the budget's end: stopping the comparison (every finished evaluation is kept)")
                self.stop()
                return
            end = None if measured or time.time() - self.started < measure_after else self.projected_end()
            if end is not None:
                measured = True
                fits = end <= self.stop_at
                self.decisions.append({"seeds": self.seeds, "projected_end_s": end - self.log.started, "fits": fits})
                verdict = "they fit" if fits else "too late"
                self.log(
                    f"measured: seeds {self.seeds} would end at {end - self.log.started:.0f} s "
                    f"(stop at {self.stop_at - self.log.started:.0f} s): {verdict}"
                )
                if not fits and "," in self.seeds:
                    self.log("every seed cannot finish: going on with seed 0 alone (its runs resume)")
                    self.stop()
                    self.start(self.seeds.split(",")[0])
                    measured = False
            time.sleep(1.0)


def speed(work: Path, preset: Preset, device_flops: float) -> dict:
    """Step rate and MFU of every run from its own epochs (images and steps over the loop's clock), and their sum
    while they shared the device; FLOPs: the cost model's random step (a self-guided run's refreshes not counted)."""
    from benchmarks.cost_model import floor_ratio

    flops = floor_ratio(model_config(preset), 0)["random_step_gflop_per_image"] * 1e9
    runs = {}
    for name, state in run_states(work / "runs").items():
        images_per_s = state["samples_seen"] / state["train_seconds"]
        runs[name] = {
            "epoch": state["epoch"],
            "images_per_s": images_per_s,
            "steps_per_s": state["step"] / state["train_seconds"],
            "mfu": images_per_s * flops / device_flops,
        }
    together = sum(run["images_per_s"] for run in runs.values())
    return {
        "gflop_per_image": flops / 1e9,
        "device_tflops": device_flops / 1e12,
        "runs": runs,
        "images_per_s_together": together,
        "mfu_together": together * flops / device_flops,
    }


RECORD_SUFFIXES = {".json", ".md", ".png", ".txt", ".log"}
ARCHIVED = (
    "comparison/*", "compare_masking.log", "bench_model_vitb.json", "runs/*/pretrain.log", "runs/*/train_results.json",
    "runs/*/checkpoint-*/trainer_state.json", "runs/*/checkpoint-*/eval-frozen/*", "runs/*/checkpoint-*/analysis/*",
)  # fmt: skip


def archive(work: Path, path: Path) -> int:
    """records.tar.gz: every record, evaluation, analysis, panel and log of the call (no weights); its file count."""
    files = sorted({found for pattern in ARCHIVED for found in work.glob(pattern) if found.suffix in RECORD_SUFFIXES})
    with tarfile.open(path, "w:gz") as packed:
        for found in files:
            packed.add(found, arcname=str(found.relative_to(work)))
    return len(files)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="where the files that come back go (at most 7)")
    parser.add_argument("--preset", choices=["vits", "tiny"], default="vits", help="the compared model")
    parser.add_argument("--smoke", action="store_true", help="the same path on a CPU: tiny model, one epoch")
    parser.add_argument("--data", help="Imagenette in the Hub layout (default: .data/imagenette, else ../shared)")
    parser.add_argument("--minutes", type=float, default=8.0, help="the budget, from the script's start")
    parser.add_argument("--evaluation_minutes", type=float, default=1.5, help="kept for the last evaluations")
    parser.add_argument("--measure_after", type=float, default=60.0, help="seconds of training before measuring")
    args = parser.parse_args()
    if args.data is None:
        found = [
            path for path in (".data/imagenette", "../shared/data/imagenette") if (REPO / path / "112px").is_dir()
        ]
        if not found:
            parser.error("no dataset folder: --data DIR (Imagenette with its 112px config), or --prepare first")
        args.data = found[0]
    return args


def write_results(args, log: Log, work: Path, result: dict) -> None:
    """gpu_run.json, the tables and the curves from the records, and the archive, into --output."""
    from benchmarks.masking_report import plot, regenerated

    records = work / "comparison" / "compare_masking.json"
    if records.is_file():
        text, markdown = regenerated(records)
        written = json.loads(text)
        (args.output / "compare_masking.md").write_text(markdown)
        if written["records"]:
            plot(written["summary"], args.output / "compare_masking.png", {})
        result["comparison"] = {"evaluations": len(written["records"]), "summary": written["summary"]}
    else:
        log("no evaluation finished")
    result["archived_files"] = archive(work, args.output / "records.tar.gz")
    (args.output / "gpu_run.json").write_text(json.dumps(result, indent=2) + "\n")
    problems = files_coming_back(args.output)
    log(
        f"wrote {len(list(args.output.iterdir()))} files (at most {FILES_BACK} come back)"
        + (f"; problems: {problems}" if problems else "")
    )


def main() -> None:
    started = float(os.environ.get("GPU_RUN_STARTED") or time.time())
    args = parse_args()
    import torch

    from benchmarks.timing import matmul_rate

    if not args.smoke and not torch.cuda.is_available():
        message = "error: no CUDA GPU is visible; gpu_run.sh measures a GPU (--smoke runs the same path on the CPU)"
        print(message, file=sys.stderr)
        sys.exit(2)
    args.output.mkdir(parents=True, exist_ok=True)
    log = Log(args.output / "gpu_run.log", started)
    found = versions()
    log(f"versions: {json.dumps(found)}")
    work = Path(tempfile.mkdtemp(prefix="gpu_run_"))
    if found["datasets"] is None or found["evaluate"] is None:
        install_missing(log, work / "site")
        found = versions()
        log(f"versions with the carried wheels: {json.dumps(found)}")
    preset = PRESETS["smoke" if args.smoke else args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    device_flops = matmul_rate(device, bf16=device.type == "cuda")
    result = {
        "command": shlex.join(["bash", "benchmarks/gpu_run.sh", *sys.argv[1:]]),
        "commit": code_commit(),
        "versions": found,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "preset": asdict(preset),
        "budget_minutes": args.minutes,
    }
    result["vit_b_step"] = vit_b_step(log, work, args.smoke)
    stop_at = started + 60 * args.minutes - STOP_BEFORE_END - PACKING_SECONDS
    seeds = plan_seeds(log, preset, device_flops, stop_at)
    comparison = Comparison(args, preset, work, log, stop_at)
    comparison.start(seeds)
    comparison.supervise(args.measure_after)
    result |= {"seeds_run": comparison.seeds, "decisions": comparison.decisions}
    result["collect_command"] = shlex.join(["python", *comparison.command[1:]]).replace(str(work), "UNPACKED") + (
        " --collect_only"
    )
    result["speed"] = speed(work, preset, device_flops)
    log(f"speed from the runs' own epochs: {json.dumps(result['speed'])}")
    write_results(args, log, work, result)
    log(f"gpu_run: done in {time.time() - started:.0f} s of {60 * args.minutes:.0f}")


ASSUMED_MFU = 0.3  # before measuring: a small model's share of the device's matmul rate


def plan_seeds(log: Log, preset: Preset, device_flops: float, stop_at: float) -> str:
    """The seeds to start with: all when the cost model's estimate fits them before `stop_at`, else seed 0."""
    from benchmarks.cost_model import floor_ratio

    flops = floor_ratio(model_config(preset), 0)["random_step_gflop_per_image"] * 1e9
    images = preset.epochs * IMAGENETTE_TRAIN
    runs = 2 * len(preset.seeds.split(","))
    seconds = runs * images * flops / (ASSUMED_MFU * device_flops)
    fits = time.time() + seconds <= stop_at
    log(
        f"estimate: {runs} runs x {images / 1e6:.2f} M images x {flops / 1e9:.1f} GFLOP at {ASSUMED_MFU:.0%} of "
        f"{device_flops / 1e12:.2f} TFLOP/s = {seconds:.0f} s; {stop_at - time.time():.0f} s left: "
        + ("every seed" if fits else "seed 0 alone")
    )
    return preset.seeds if fits else preset.seeds.split(",")[0]


if __name__ == "__main__":
    main()
