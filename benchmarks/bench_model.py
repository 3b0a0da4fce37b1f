"""Training-step benchmark of SG-MAE: against transformers' ViTMAE, and the price of self-guided masking.

Three measurements per config and device, each a full training step (forward + backward + AdamW step), all
variants in one precision (`--precision`: bf16 autocast by default on a GPU, float32 on the CPU):

1. **SG-MAE vs ViTMAE.** `SGMAEForPreTraining` (mask_strategy="random") against
   `transformers.ViTMAEForPreTraining` with the same config fields and the *same weights* (ours is loaded from the
   saved ViTMAE checkpoint by `SGMAEForPreTraining.from_pretrained`, which converts it) and the same noise each
   step: ViTMAE with eager and with SDPA attention (what a user would run instead), ours as it loads (SDPA) and
   ours with `compile_blocks()` (unless `--no-compile`). Before timing, the losses on one batch are compared (they
   must agree). Target: SG-MAE ≥ 1.0x ViTMAE-SDPA's throughput (aim 1.15x; on an H200 in bf16 the target is 1.3x).
   Reported next to images/s: model-FLOP utilisation (MFU: the cost model's training FLOPs, 3x the forward, over
   the device's matmul rate in the step's precision, measured here on square matmuls) and, on a GPU, each
   variant's peak memory above what was allocated before its step. On a GPU, one step of ours (random, and
   self-guided in measurement 2) also runs under `torch.cuda.set_sync_debug_mode("error")`: any device-to-host
   synchronisation inside the step is recorded.
2. **Self-guided vs random step time**, with informed masking active from step 0 (`informed_masking_start=0.0`),
   for the features taken at the last encoder block (k = L) and at half depth (k = L/2), next to the floor ratio
   that token counts allow.
3. **Share of a self-guided step spent in `SelfGuidedMasking`** (graph + Fiedler solver + ranking + hints),
   timed by forward hooks on `model.masking` inside real steps. Target ≤ 10 %. The no-grad feature pass
   (`model.vit.encode` over all patches) is timed the same way and reported for reference. Measurements 2 and 3
   use the per-step source (`informed_mask_source="step"`).
4. **Cached informed masks** (the default source, docs/method.md §8): a training step given the batch's stored
   whole-image rankings, cropped with random views (`augment.crop_maps`) inside the step, against a random step
   (target ≤ 1.05x); and the refresh pass, `informed_mask_scores` on whole images in eval mode, against a plain
   eval forward of `SGMAEModel` over the same images (target ≤ 1.2x), with each Fiedler solver.

Floor ratio (measurement 2): 1 + F(k) / (3·(E + R)), the no-grad feature pass over all patches (k blocks) against
forward + backward of the masked encoder and the decoder, from token counts (`benchmarks/cost_model.py`).
Target: measured ratio / floor ≤ 1.15.

Method (`benchmarks/timing.py`): all variants of one measurement live in one process and run in alternation, one
step each per round, after `--warmup` untimed rounds. Reported: median step time per variant, images/s from it,
and the median over rounds of the paired per-round ratio (targets are judged on these); next to them the same ratio
in process CPU time and the ratio of the fastest steps. The CPU pressure of the machine (Linux PSI) is recorded:
from a run with high pressure the ratios say little (rerun on an idle machine, or use --threads 1).

`--layouts` repeats measurement 1 with other sets of variants in the same process (e.g. only ViTMAE-SDPA and ours),
to see whether the other models sharing the process change the ratio.

Usage (CPU defaults: cifar batch 64 x 20 steps, vitb batch 8 x 5 steps; about 7 minutes on 2 idle cores):

    python -m benchmarks.bench_model
    python -m benchmarks.bench_model --configs cifar --steps 40 --device cpu
    python -m benchmarks.bench_model --configs vitb --skip-self-guided \
        --layouts "vit_mae_eager,vit_mae,sgmae_random,sgmae_compiled;vit_mae,sgmae_random"
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import HfArgumentParser, ViTMAEConfig, ViTMAEForPreTraining

from benchmarks.cost_model import floor_ratio
from benchmarks.provenance import REPO, code_commit
from benchmarks.timing import (
    DISTURBED,
    Variant,
    alternate,
    best_ratio,
    cpu_pressure,
    matmul_rate,
    median_of,
    paired_ratio,
    synchronize,
    undisturbed_rounds,
)
from modeling_sgmae import SGMAEConfig, SGMAEForPreTraining
from modeling_sgmae.crops import crop_maps
from modeling_sgmae.masking_sgmae import MaskType
from sgmae_training.arguments import parse_script_args
from sgmae_training.augment import BatchAugmentation

# Architecture fields shared by ViTMAEConfig and SGMAEConfig.
CONFIGS: dict[str, dict] = {
    # ViT-Tiny-like encoder on CIFAR-sized images (the expected CIFAR preset).
    "cifar": dict(
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        decoder_hidden_size=128,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=512,
        layer_norm_eps=1e-6,
        norm_pix_loss=True,
    ),
    # ViT-B/16 at 224 px with transformers' default 8 x 512 decoder (MAE's recipe: norm_pix_loss, eps 1e-6).
    "vitb": dict(layer_norm_eps=1e-6, norm_pix_loss=True),
}
CONFIGS["vit_tiny"] = dict(  # ViT-Tiny/16 at 224 px, transformers' default 8 x 512 decoder
    hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, **CONFIGS["vitb"]
)
# Issue 21's 196-patch comparison: the CIFAR preset at 112 px / patch 8 with a 4-block encoder and 2-block decoder.
CONFIGS["imagenette196"] = CONFIGS["cifar"] | dict(
    image_size=112, patch_size=8, num_hidden_layers=4, decoder_num_hidden_layers=2
)
# One block each side: the smoke setting of gpu_run.sh (the same path on a CPU in seconds).
CONFIGS["smoke"] = CONFIGS["cifar"] | dict(num_hidden_layers=1, decoder_num_hidden_layers=1)
# (batch size, timed steps, warm-up rounds) per config and device.
DEFAULTS = {
    ("cifar", "cpu"): (64, 20, 3),
    ("smoke", "cpu"): (2, 1, 0),
    ("vitb", "cpu"): (8, 5, 1),
    ("vit_tiny", "cpu"): (8, 4, 1),
    ("imagenette196", "cpu"): (128, 8, 1),
    ("cifar", "cuda"): (1024, 30, 10),
    ("vitb", "cuda"): (256, 20, 5),
    ("vit_tiny", "cuda"): (1024, 20, 5),
    ("imagenette196", "cuda"): (1024, 20, 5),
}
SPEEDUP_TARGET, SPEEDUP_AIM, FLOOR_TARGET, MASKING_SHARE_TARGET = 1.0, 1.15, 1.15, 0.10
CACHED_STEP_TARGET, REFRESH_TARGET = 1.05, 1.2  # measurement 4: x a random step; x a plain eval forward
SOLVERS = ("lanczos", "power")
VS_VIT_MAE_VARIANTS = ("vit_mae_eager", "vit_mae", "sgmae_random", "sgmae_compiled")


# ----- the timed models ----------------------------------------------------------------------------------------
class Trainer:
    """A model with MAE's AdamW (betas 0.9/0.95, weight decay 0.05); `step` is forward + backward + update, the
    forward under bf16 autocast when `bf16`."""

    def __init__(self, model: torch.nn.Module, bf16: bool):
        self.model, self.bf16 = model, bf16
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step(self, pixels: torch.Tensor, **forward_kwargs) -> None:
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(pixel_values=pixels, **forward_kwargs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class CallTimer:
    """Accumulates the wall time spent in the calls of a module (forward hooks) or a function (wrapper)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = 0.0
        self._start = 0.0

    def begin(self, *_) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def end(self, *_) -> None:
        synchronize(self.device)
        self.total += time.perf_counter() - self._start

    def attach(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self.begin)
        module.register_forward_hook(self.end)

    def wrap(self, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.begin()
            try:
                return function(*args, **kwargs)
            finally:
                self.end()

        return timed

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total


def random_pixels(config: SGMAEConfig | ViTMAEConfig, batch: int, device: torch.device) -> torch.Tensor:
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, config.num_channels, height, width, generator=generator).to(device)


# ----- measurements -------------------------------------------------------------------------------------------
def host_syncs(device: torch.device, step: Callable[[], None]) -> str | None:
    """On a GPU, run `step` with device-to-host synchronisation as an error: None if there was none, else what
    synchronised (the error's first line). Not checked (None) on the CPU, where nothing waits on a device."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def vit_mae_models(fields: dict, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """ViTMAE (SDPA, eager) and ours (as it loads, compiled) with the same weights: ours are loaded from the saved
    ViTMAE checkpoint, which `SGMAEForPreTraining.from_pretrained` converts."""
    torch.manual_seed(0)
    vit_mae = ViTMAEForPreTraining(ViTMAEConfig(**fields))  # SDPA attention, transformers' default
    models = {}
    with tempfile.TemporaryDirectory() as directory:
        vit_mae.save_pretrained(directory)
        for name in names:
            if name == "vit_mae":
                models[name] = vit_mae
            elif name == "vit_mae_eager":
                models[name] = ViTMAEForPreTraining.from_pretrained(directory, attn_implementation="eager")
            else:
                models[name] = SGMAEForPreTraining.from_pretrained(directory, mask_strategy="random")  # converts
                if name == "sgmae_compiled":
                    models[name].compile_blocks()
    return models


def compare_with_vit_mae(
    fields: dict, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool, names: tuple[str, ...]
) -> dict:
    """Measurement 1: SG-MAE (random masks) vs ViTMAE (eager and SDPA), same weights, noise and optimiser settings;
    `names`: the variants of `VS_VIT_MAE_VARIANTS` in this process's memory and alternation ("vit_mae" among them)."""
    models = vit_mae_models(fields, names)
    for model in models.values():
        model.to(device).train()
    config = next(model.config for name, model in models.items() if name.startswith("sgmae"))
    pixels = random_pixels(config, batch, device)
    grid_h, grid_w = config.grid_size
    noise_shape = (batch, grid_h * grid_w)
    noise = torch.rand(noise_shape, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        losses = {name: float(model(pixel_values=pixels, noise=noise).loss) for name, model in models.items()}
    trainers = {name: Trainer(model, bf16) for name, model in models.items()}
    variants = [
        Variant(name, lambda noise, trainer=trainer: trainer.step(pixels, noise=noise))
        for name, trainer in trainers.items()
    ]
    alternate(variants, steps, warmup, noise_shape, device)
    ours = [v for v in variants if v.name.startswith("sgmae")]
    return {
        "attn_implementation": {name: model.config._attn_implementation for name, model in models.items()},
        "trainable_parameters": {
            name: sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            for name, trainer in trainers.items()
        },
        "loss_abs_difference_same_noise": max(abs(loss - losses["vit_mae"]) for loss in losses.values()),
        "losses": losses,
        **step_rates(variants, batch, config, device, bf16),
        "host_syncs_in_step": host_syncs(device, lambda: trainers[ours[0].name].step(pixels, noise=noise)),
    }


def step_rates(variants: list[Variant], batch: int, config: SGMAEConfig, device: torch.device, bf16: bool) -> dict:
    """Images/s, MFU and peak memory of each variant, and ours against ViTMAE with SDPA (transformers' default):
    paired ratios on the wall clock and process CPU time, and the ratio of the fastest steps."""
    reference = next(v for v in variants if v.name == "vit_mae")
    rounds = undisturbed_rounds(variants)
    flops_per_image = floor_ratio(config, 0)["random_step_gflop_per_image"] * 1e9
    rate = matmul_rate(device, bf16)
    images_per_s = {v.name: batch / median_of(v.times, rounds) for v in variants}
    ours = [v for v in variants if v.name.startswith("sgmae")]
    return {
        "rounds_used": rounds,
        "median_step_s": {v.name: median_of(v.times, rounds) for v in variants},
        "images_per_s": images_per_s,
        "matmul_tflops": rate / 1e12,
        "mfu": {name: value * flops_per_image / rate for name, value in images_per_s.items()},
        "peak_memory_gib": {v.name: v.peak_bytes / 2**30 for v in variants} if device.type == "cuda" else None,
        "speedup": {v.name: paired_ratio(reference, v, rounds) for v in ours},
        "speedup_over_eager": {
            v.name: paired_ratio(variants[0], v, rounds) for v in ours if variants[0].name == "vit_mae_eager"
        },
        "speedup_cpu_time": {v.name: paired_ratio(reference, v, rounds, cpu=True) for v in ours},
        "speedup_best": {v.name: best_ratio(reference, v) for v in ours},
        "step_times_s": {v.name: v.times for v in variants},
        "step_cpu_times_s": {v.name: v.cpu_times for v in variants},
    }


class MaskingShares:
    """The shares of a self-guided step spent in `model.masking` (forward hooks: graph + solver + ranking + hints)
    and in `model.vit.encode` (a wrapper: the no-grad feature pass and the masked encoder's forward), per variant."""

    def __init__(self, model: SGMAEForPreTraining, device: torch.device, names: list[str]):
        self.masking, self.encode = CallTimer(device), CallTimer(device)
        self.masking.attach(model.masking)
        self.model, self.unwrapped = model, model.vit.encode
        model.vit.encode = self.encode.wrap(self.unwrapped)  # an instance attribute shadows the method
        self.shares: dict[str, dict[str, list[float]]] = {name: {"masking": [], "encode": []} for name in names}

    def timed(self, name: str, device: torch.device, step: Callable[[], None]) -> None:
        """Run one step, recording the two shares of its wall time under `name`."""
        self.masking.take()
        self.encode.take()
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        total = time.perf_counter() - start
        self.shares[name]["masking"].append(self.masking.take() / total)
        self.shares[name]["encode"].append(self.encode.take() / total)

    def detach(self) -> None:
        self.model.vit.encode = self.unwrapped


def informed_masks_per_depth(model: SGMAEForPreTraining, pixels: torch.Tensor, depths: dict[str, int]) -> dict:
    """Informed masks in one batch at each feature depth; raises if self-guided masking did not run (checked
    before timing, so the self-guided variants really build informed masks)."""
    informed = {}
    with torch.no_grad():
        for name, depth in depths.items():
            model.config.mask_feature_layer = depth
            mask_type = model(pixels).mask_type
            if bool((mask_type == MaskType.RANDOM).any()):
                raise RuntimeError(f"{name}: self-guided masking did not run")
            informed[name] = int((mask_type == MaskType.INFORMED).sum())
    return informed


def measure_self_guided(fields: dict, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool) -> dict:
    """Measurements 2 and 3: random vs self-guided steps (k = L and L/2) in one model and optimiser, with the
    shares of each self-guided step spent in masking and in the encoder calls."""
    torch.manual_seed(0)
    config = SGMAEConfig(
        **fields, mask_strategy="self_guided", informed_masking_start=0.0, informed_mask_source="step"
    )
    model = SGMAEForPreTraining(config).to(device).train()
    if not model.informed_masking_active:
        raise RuntimeError("informed masking should be active from step 0 with informed_masking_start=0.0")
    trainer = Trainer(model, bf16)
    pixels = random_pixels(config, batch, device)
    depths = {"self_guided_last": config.num_hidden_layers, "self_guided_half": max(config.num_hidden_layers // 2, 1)}
    informed = informed_masks_per_depth(model, pixels, depths)
    shares = MaskingShares(model, device, list(depths))

    def self_guided_turn(name: str) -> Callable[[torch.Tensor | None], None]:
        def turn(_noise: torch.Tensor | None) -> None:
            config.mask_feature_layer = depths[name]
            shares.timed(name, device, lambda: trainer.step(pixels))

        return turn

    random_variant = Variant("random", lambda _noise: trainer.step(pixels, random_masking=True))
    variants = [random_variant] + [Variant(name, self_guided_turn(name)) for name in depths]
    alternate(variants, steps, warmup, (batch, 1), device)
    shares.detach()
    rounds = undisturbed_rounds(variants)
    results = {
        variant.name: self_guided_row(variant, random_variant, rounds, floor_ratio(config, depths[variant.name]))
        | {
            "feature_layer": depths[variant.name],
            "images_per_s": batch / median_of(variant.times, rounds),
            # the warm-up rounds recorded shares too: keep the timed ones
            "masking_share": median_of(shares.shares[variant.name]["masking"][warmup:], rounds),
            "encoder_calls_share": median_of(shares.shares[variant.name]["encode"][warmup:], rounds),
            "informed_masks_of_batch": informed[variant.name],
        }
        for variant in variants[1:]
    }
    config.mask_feature_layer = None
    return {
        "host_syncs_in_step": host_syncs(device, lambda: trainer.step(pixels)),
        "rounds_used": rounds,
        "random_median_step_s": median_of(random_variant.times, rounds),
        "random_images_per_s": batch / median_of(random_variant.times, rounds),
        "random_step_times_s": random_variant.times,
        "random_step_cpu_times_s": random_variant.cpu_times,
        "self_guided": results,
    }


def self_guided_row(variant: Variant, random_variant: Variant, rounds: list[int], floor: dict) -> dict:
    """A self-guided variant's step time against the random step's, and against the floor from token counts."""
    ratio = paired_ratio(variant, random_variant, rounds)
    return {
        "median_step_s": median_of(variant.times, rounds),
        "ratio_vs_random": ratio,
        **floor,
        "ratio_over_floor": ratio / floor["floor_ratio"],
        "ratio_vs_random_cpu_time": paired_ratio(variant, random_variant, rounds, cpu=True),
        "ratio_vs_random_best": best_ratio(variant, random_variant),
        "step_times_s": variant.times,
        "step_cpu_times_s": variant.cpu_times,
    }


def measure_cached(fields: dict, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool) -> dict:
    """Measurement 4: a step masked by stored rankings (cropped inside the step) vs a random step, and the refresh
    pass vs a plain eval forward over the same whole images, per Fiedler solver."""
    torch.manual_seed(0)
    config = SGMAEConfig(**fields, mask_strategy="self_guided", informed_masking_start=0.0)
    model = SGMAEForPreTraining(config).to(device).train()
    trainer = Trainer(model, bf16)
    pixels = random_pixels(config, batch, device)
    with torch.no_grad():
        stored = model.eval().informed_mask_scores(pixels).view(batch, *config.grid_size)
    model.train()
    _, crops = BatchAugmentation(config.image_height_width, (0.5,) * 3, (0.25,) * 3).with_crops(
        torch.zeros(batch, 3, *config.image_height_width, dtype=torch.uint8, device=device)
    )
    if not bool((model(pixels, mask_scores=crop_maps(stored, crops).flatten(1)).mask_type != MaskType.RANDOM).all()):
        raise RuntimeError("cached masks did not run")
    step_variants = [
        Variant("random", lambda _noise: trainer.step(pixels, random_masking=True)),
        Variant("cached", lambda _noise: trainer.step(pixels, mask_scores=crop_maps(stored, crops).flatten(1))),
    ]
    alternate(step_variants, steps, warmup, (batch, 1), device)
    rounds = undisturbed_rounds(step_variants)
    random_variant, cached = step_variants
    return {
        "rounds_used": rounds,
        "random_median_step_s": median_of(random_variant.times, rounds),
        "cached_median_step_s": median_of(cached.times, rounds),
        "cached_ratio_vs_random": paired_ratio(cached, random_variant, rounds),
        "cached_ratio_vs_random_cpu_time": paired_ratio(cached, random_variant, rounds, cpu=True),
        "cached_ratio_vs_random_best": best_ratio(cached, random_variant),
        **refresh_passes(model.eval(), pixels, steps, warmup, device, bf16),
        "step_times_s": {variant.name: variant.times for variant in step_variants},
    }


def refresh_passes(
    model: SGMAEForPreTraining, pixels: torch.Tensor, steps: int, warmup: int, device: torch.device, bf16: bool
) -> dict:
    """The refresh pass (`informed_mask_scores` on whole images, eval mode) with each Fiedler solver against a plain
    eval forward of the encoder over the same images."""
    config = model.masking.config

    def no_grad_turn(function: Callable[[], object]) -> Callable[[torch.Tensor | None], None]:
        def turn(_noise: torch.Tensor | None) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                function()

        return turn

    def refresh(solver_config: SGMAEConfig) -> None:
        model.masking.config = solver_config
        model.informed_mask_scores(pixels)

    variants = [Variant("eval_forward", no_grad_turn(lambda: model.vit(pixels)))]
    for solver in SOLVERS:
        solver_config = SGMAEConfig(**(config.to_diff_dict() | {"fiedler_solver": solver}))
        variants.append(Variant(f"refresh_{solver}", no_grad_turn(lambda c=solver_config: refresh(c))))
    alternate(variants, steps, warmup, (len(pixels), 1), device)
    model.masking.config = config
    rounds = undisturbed_rounds(variants)
    return {
        "pass_rounds_used": rounds,
        "eval_forward_median_s": median_of(variants[0].times, rounds),
        "refresh": {
            variant.name.removeprefix("refresh_"): {
                "median_s": median_of(variant.times, rounds),
                "ratio_vs_eval_forward": paired_ratio(variant, variants[0], rounds),
                "ratio_vs_eval_forward_best": best_ratio(variant, variants[0]),
                "images_per_s": len(pixels) / median_of(variant.times, rounds),
            }
            for variant in variants[1:]
        },
        "pass_step_times_s": {variant.name: variant.times for variant in variants},
    }


def print_cached_table(rows: list[dict]) -> None:
    print(
        f"\n4. Cached informed masks: step vs random (target <= {CACHED_STEP_TARGET}x), refresh pass vs eval forward"
        f" (target <= {REFRESH_TARGET}x)"
    )
    header = f"{'config':<15}{'device':<7}{'what':<20}{'ms':>10}{'ratio':>9}{'(best)':>9}{'rounds':>8}  target"
    print(header)
    print("-" * len(header))
    for row in [measured for measured in rows if "cached" in measured]:
        c, start = row["cached"], f"{row['config']:<15}{row['device']:<7}"
        print(f"{start}{'random step':<20}{c['random_median_step_s'] * 1e3:>10.1f}")
        print(
            f"{start}{'cached-mask step':<20}{c['cached_median_step_s'] * 1e3:>10.1f}"
            f"{c['cached_ratio_vs_random']:>8.3f}x{c['cached_ratio_vs_random_best']:>8.3f}x"
            f"{rounds_used(c['rounds_used'], row['steps']):>8}  "
            f"{verdict(c['cached_ratio_vs_random'] <= CACHED_STEP_TARGET)}"
        )
        print(f"{start}{'eval forward':<20}{c['eval_forward_median_s'] * 1e3:>10.1f}")
        for solver, result in c["refresh"].items():
            print(
                f"{start}{'refresh, ' + solver:<20}{result['median_s'] * 1e3:>10.1f}"
                f"{result['ratio_vs_eval_forward']:>8.3f}x{result['ratio_vs_eval_forward_best']:>8.3f}x"
                f"{rounds_used(c['pass_rounds_used'], row['steps']):>8}  "
                f"{verdict(result['ratio_vs_eval_forward'] <= REFRESH_TARGET)}"
            )


# ----- report -------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def rounds_used(rounds: list[int], steps: int) -> str:
    return f"{len(rounds)}/{steps}"


def cpu_ratio(row: dict, value: float) -> str:
    return f"{value:>10.3f}x" if row["device"] == "cpu" else f"{'-':>11}"


def print_table(rows: list[dict]) -> None:
    print("\n1. Training step, SG-MAE (random masks) vs transformers ViTMAE (same weights, same noise)")
    header = (
        f"{'config':<9}{'device':<7}{'prec':<6}{'batch':>6}{'variant':>16}{'img/s':>10}{'MFU':>7}{'peak GiB':>10}"
        f"{'vs SDPA':>9}{'(cpu time)':>11}{'(best)':>9}{'rounds':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for row, c in [(measured, c) for measured in rows for c in measured.get("vs_vit_mae", [])]:
        for name, images_per_s in c["images_per_s"].items():
            peak = f"{c['peak_memory_gib'][name]:>10.2f}" if c["peak_memory_gib"] else f"{'-':>10}"
            line = (
                f"{row['config']:<9}{row['device']:<7}{row['precision']:<6}{row['batch_size']:>6}{name:>16}"
                f"{images_per_s:>10.1f}{c['mfu'][name]:>7.1%}{peak}"
            )
            if name in c["speedup"]:
                speedup = c["speedup"][name]
                target = f">= {SPEEDUP_TARGET:.2f} {verdict(speedup >= SPEEDUP_TARGET)}"
                target += f", aim {SPEEDUP_AIM:.2f} {verdict(speedup >= SPEEDUP_AIM)}"
                line += (
                    f"{speedup:>8.3f}x{cpu_ratio(row, c['speedup_cpu_time'][name])}{c['speedup_best'][name]:>8.3f}x"
                    f"{rounds_used(c['rounds_used'], row['steps']):>8}  {target}"
                )
            print(line)
        print(
            f"{'':<9}matmul rate {c['matmul_tflops']:.2f} TFLOP/s; "
            f"largest loss difference {c['loss_abs_difference_same_noise']:.1e}"
            + ("" if row["device"] == "cpu" else f"; host syncs in our step: {c['host_syncs_in_step'] or 'none'}")
        )
    if any("self_guided" in row for row in rows):
        print_self_guided_table(rows)
    if any("cached" in row for row in rows):
        print_cached_table(rows)
    print_legend(rows)


def print_self_guided_table(rows: list[dict]) -> None:
    print("\n2./3. Self-guided vs random step (informed masking active), floor from token counts")
    header = (
        f"{'config':<9}{'device':<7}{'k/L':>6}{'random ms':>11}{'SG ms':>10}{'ratio':>8}{'floor':>8}"
        f"{'ratio/floor':>13}{'(cpu time)':>11}{'(best)':>9}{'rounds':>8}{'masking %':>11}{'encode %':>10}"
        f"  targets (ratio/floor <= {FLOOR_TARGET}, masking <= {MASKING_SHARE_TARGET:.0%})"
    )
    print(header)
    print("-" * len(header))
    for row in [measured for measured in rows if "self_guided" in measured]:
        s = row["self_guided"]
        for result in s["self_guided"].values():
            depth = f"{result['feature_layer']}/{row['num_hidden_layers']}"
            targets = (
                f"{verdict(result['ratio_over_floor'] <= FLOOR_TARGET)}, "
                f"{verdict(result['masking_share'] <= MASKING_SHARE_TARGET)}"
            )
            print(
                f"{row['config']:<9}{row['device']:<7}{depth:>6}{s['random_median_step_s'] * 1e3:>11.1f}"
                f"{result['median_step_s'] * 1e3:>10.1f}{result['ratio_vs_random']:>8.3f}"
                f"{result['floor_ratio']:>8.3f}{result['ratio_over_floor']:>13.3f}"
                f"{cpu_ratio(row, result['ratio_vs_random_cpu_time'] / result['floor_ratio'])}"
                f"{result['ratio_vs_random_best'] / result['floor_ratio']:>8.3f}x"
                f"{rounds_used(s['rounds_used'], row['steps']):>8}"
                f"{result['masking_share'] * 100:>10.1f}%{result['encoder_calls_share'] * 100:>9.1f}%  {targets}"
            )
        if row["device"] != "cpu":
            print(f"{'':<9}host syncs in a self-guided step: {s['host_syncs_in_step'] or 'none'}")


def print_legend(rows: list[dict]) -> None:
    print(
        "\nvs SDPA = median over rounds of ViTMAE (SDPA) step time / SG-MAE step time (wall clock); ratio = the same "
        "for self-guided / random;\n'(cpu time)' = the same with process CPU time; '(best)' = ratio of the fastest "
        "steps; targets are judged on the wall-clock medians.\nrounds = timed rounds used: those in which no step "
        f"took over {DISTURBED}x its variant's fastest (bursts of load from other processes), all if too few.\n"
        "masking % = SelfGuidedMasking call (graph, solver, ranking, hints) in a self-guided step; encode % = no-grad "
        "feature pass + masked encoder forward;\nloss diff = |ViTMAE - SG-MAE| loss on one batch, same weights and "
        "noise;\nMFU = images/s x the cost model's training FLOPs per image / the measured matmul rate in the same "
        "precision; peak GiB = most memory allocated during a step above what was allocated before it."
    )
    pressures = [
        f"{row['config']}/{row['device']} {max(row['cpu_pressure_avg60']):.0%}"
        for row in rows
        if None not in row["cpu_pressure_avg60"]
    ]
    if pressures:
        print(
            "CPU pressure (share of time runnable tasks waited for a core, /proc/pressure/cpu avg60, worst of start "
            f"and end): {', '.join(pressures)}.\nAbove ~20% other processes compete for the cores and wall-clock "
            "ratios get noisy."
        )


@dataclass
class BenchModelArguments:
    """Where, what and how long to time (the step counts and batch sizes default per config and device)."""

    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda or cpu,cuda (default: cpu, plus cuda when available)"}
    )
    configs: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated subset of: " + ",".join(CONFIGS) + " (default: all with a GPU, else cifar,vitb)"
        },
    )
    steps: int | None = field(
        default=None, metadata={"help": "timed steps per variant (default per config and device)"}
    )
    warmup: int | None = field(default=None, metadata={"help": "untimed rounds first (default per config and device)"})
    batch_size: int | None = field(default=None, metadata={"help": "images per step (default per config and device)"})
    threads: int | None = field(
        default=None, metadata={"help": "torch threads (default: the CPU cores this process may use)"}
    )
    precision: Literal["fp32", "bf16"] | None = field(
        default=None, metadata={"help": "default: bf16 on a GPU, fp32 on the CPU"}
    )
    no_compile: bool = field(default=False, metadata={"help": "leave out ours with compile_blocks()"})
    layouts: str | None = field(
        default=None,
        metadata={
            "help": "measurement 1 in several layouts, one after another in this process: ';'-separated lists of "
            f"{','.join(VS_VIT_MAE_VARIANTS)} (each with vit_mae and one sgmae variant); default: all four"
        },
    )
    skip_self_guided: bool = field(default=False, metadata={"help": "leave out measurements 2 and 3"})
    skip_vit_mae: bool = field(default=False, metadata={"help": "leave out measurement 1"})
    skip_cached: bool = field(default=False, metadata={"help": "leave out measurement 4"})
    output: Path = REPO / "benchmarks" / "results" / "bench_model.json"


def devices_and_configs(parser: HfArgumentParser, args: BenchModelArguments) -> tuple[list[str], list[str]]:
    """The devices and configs asked for (defaults: the CPU, plus a GPU and its configs where there is one)."""
    if args.device:
        devices = [name.strip() for name in args.device.split(",") if name.strip()]
    else:
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if not devices or set(devices) - {"cpu", "cuda"}:
        parser.error(f"--device takes cpu, cuda or both, got {args.device!r}")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    configs_text = args.configs or ("cifar,vitb,vit_tiny" if "cuda" in devices else "cifar,vitb")
    configs = [name.strip() for name in configs_text.split(",") if name.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    return devices, configs


def vit_mae_layouts(parser: HfArgumentParser, args: BenchModelArguments) -> list[list[str]]:
    """The sets of variants of measurement 1, each with ViTMAE (SDPA) and one of ours."""
    default_layout = [name for name in VS_VIT_MAE_VARIANTS if not (args.no_compile and name == "sgmae_compiled")]
    layouts = [
        [name.strip() for name in text.split(",")] for text in (args.layouts or ",".join(default_layout)).split(";")
    ]
    for layout in layouts:
        if (
            set(layout) - set(VS_VIT_MAE_VARIANTS)
            or "vit_mae" not in layout
            or not any(name.startswith("sgmae") for name in layout)
        ):
            parser.error(
                f"--layouts: {','.join(layout)!r} needs vit_mae and an sgmae variant, from {VS_VIT_MAE_VARIANTS}"
            )
    return layouts


def measure_config(args: BenchModelArguments, name: str, device: torch.device, layouts: list[list[str]]) -> dict:
    """Every measurement asked for, of one config on one device, at its default or asked-for batch and steps."""
    batch, steps, warmup = DEFAULTS[(name, device.type)]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    bf16 = precision == "bf16"
    batch, steps = args.batch_size or batch, args.steps or steps
    warmup = args.warmup if args.warmup is not None else warmup
    fields = CONFIGS[name]
    print(f"[{name} on {device.type}] batch {batch}, {steps} timed steps after {warmup} warm-up rounds")
    row = {
        "config": name,
        "device": device.type,
        "batch_size": batch,
        "precision": precision,
        "steps": steps,
        "warmup": warmup,
        "fields": fields,
        "num_hidden_layers": SGMAEConfig(**fields).num_hidden_layers,
    }
    pressure_before = cpu_pressure()
    if not args.skip_vit_mae:
        row["vs_vit_mae"] = [
            compare_with_vit_mae(fields, batch, steps, warmup, device, bf16, tuple(layout)) for layout in layouts
        ]
    gc.collect()
    if not args.skip_self_guided:
        row["self_guided"] = measure_self_guided(fields, batch, steps, warmup, device, bf16)
    gc.collect()
    if not args.skip_cached:
        row["cached"] = measure_cached(fields, batch, steps, warmup, device, bf16)
    row["cpu_pressure_avg60"] = [pressure_before, cpu_pressure()]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = HfArgumentParser(BenchModelArguments, description=__doc__.split("\n")[0])
    (args,) = parse_script_args(parser)
    devices, configs = devices_and_configs(parser, args)
    layouts = vit_mae_layouts(parser, args)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    rows = []
    for device_name in devices:
        for name in configs:
            rows.append(measure_config(args, name, torch.device(device_name), layouts))
            write_report(args.output, rows, devices, threads, started)  # a run cut short keeps what it measured
    print_table(rows)
    print(f"\nwrote {args.output} ({time.perf_counter() - started:.0f} s)")


def write_report(output: Path, rows: list[dict], devices: list[str], threads: int, started: float) -> None:
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": code_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
        "wall_s": time.perf_counter() - started,
        "targets": {
            "speedup_min": SPEEDUP_TARGET,
            "speedup_aim": SPEEDUP_AIM,
            "ratio_over_floor_max": FLOOR_TARGET,
            "masking_share_max": MASKING_SHARE_TARGET,
            "cached_step_ratio_max": CACHED_STEP_TARGET,
            "refresh_ratio_max": REFRESH_TARGET,
        },
        "results": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(output)


if __name__ == "__main__":
    main()
