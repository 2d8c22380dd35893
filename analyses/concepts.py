"""Concepts through depth: which concepts of one sparse dictionary, fitted on every layer's tokens,
are born, peak and die in which phase, and whether births and deaths fall at phase boundaries.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path

import numpy as np
import xarray as xr
from sklearn.base import clone

from analyses.phases import find_phases
from analyses.streaming import image_coords, provenance, rounded
from dynamo.blocks import fold_image_blocks, image_blocks, layer_states
from dynamo.dictionary import KINDS, ConceptDictionary, matched_cosine, require_hidden
from dynamo.heads import store_labels
from dynamo.layout import ALL_TOKENS, token_groups
from dynamo.metrics import r2_from_sums, r2_sums
from dynamo.partition import NO_PHASE, Partition, assign_phases
from dynamo.progress import progress_bar
from dynamo.serialize import derived_seed

DESCRIPTION = (
    "One sparse dictionary (TopK or RA-SAE) over every layer's tokens: each concept's activation "
    "per layer and token kind, its birth, peak and death layers, whether births and deaths fall at "
    "phase boundaries (permutation test), class selectivity, reconstruction R² and dead concepts."
)
ALIVE_FRACTION = 0.25


def compute(ds: xr.Dataset, dictionary: ConceptDictionary | None = None, *, partition=None, per_phase: bool = False,
            stability: bool = False, alive_fraction: float = ALIVE_FRACTION, examples_per_phase: int = 4, top_images: int = 6,
            n_permutations: int = 10000, seed: int = 0, progress: bool = True) -> xr.Dataset:
    """Concept profiles through depth, their births and deaths at phase boundaries, quality and examples.

    Parameters
    ----------
    dictionary : ConceptDictionary, optional
        Fitted, or unfitted (fitted here); default ``ConceptDictionary()``.
    partition : Partition or nested list, optional
        The phases of depth; default the store's max-cut phases.
    per_phase : bool
        Also fit one dictionary per phase and compare its R², dead fraction and atoms.
    stability : bool
        Also fit a second seed of each kind (TopK, RA-SAE) and Hungarian-match the two seeds' atoms.
    alive_fraction : float
        A concept is alive at a layer where its mean activation (all tokens) is at least this share
        of its peak's; birth and death are the first and last alive layers.
    n_permutations : int
        Random boundary placements in the null (every placement when there are no more: exact).

    Returns
    -------
    xarray.Dataset
        ``frequency``, ``mean_activation``, ``class_information`` (bits, with labels) over (concept,
        layer, token_kind; ``all`` pools the kinds); ``birth``, ``peak``, ``death`` (-1 for dead);
        ``births``, ``deaths``, ``dead_fraction`` (layer); ``r2`` (layer, token_kind); ``boundary_*``
        over ``event``; ``top_*`` examples; ``per_phase_*`` and ``stability*`` when asked.
    """
    require_hidden(ds)
    dictionary = ConceptDictionary(progress=progress) if dictionary is None else dictionary
    if not hasattr(dictionary, "model_"):
        dictionary.fit(ds)
    partition = Partition(find_phases(ds) if partition is None else partition)
    labels = store_labels(ds)
    classes = None if labels is None else np.unique(labels)
    kinds = list(token_groups(ds["token_kind"]))
    sums = profile_sums(ds, dictionary, classes, progress=progress)
    layers = dictionary.layers_
    frequency = sums["count"] / sums["tokens"]
    mean_activation = sums["total"] / sums["tokens"]
    birth, peak, death = lifetimes(mean_activation[:, :, -1], layers, alive_fraction)
    dead = peak < 0
    coords = {"concept": np.arange(frequency.shape[0]), "layer": layers, "token_kind": [*kinds, ALL_TOKENS]}
    cube = ("concept", "layer", "token_kind")
    result = xr.Dataset(
        {
            "frequency": (cube, frequency, {"long_name": "share of tokens on which the concept is active"}),
            "mean_activation": (cube, mean_activation,
                                {"long_name": "mean contribution norm z‖d‖ over tokens (zeros included), in RMS token norms"}),
            "birth": ("concept", birth, {"long_name": "first layer alive (-1: dead)"}),
            "peak": ("concept", peak, {"long_name": "layer of highest mean activation (-1: dead)"}),
            "death": ("concept", death, {"long_name": "last layer alive (-1: dead)"}),
            "births": ("layer", _count_at(birth[~dead], layers), {"long_name": "concepts born at the layer"}),
            "deaths": ("layer", _count_at(death[~dead], layers), {"long_name": "concepts dying at the layer"}),
            "r2": (("layer", "token_kind"), r2_from_sums(*sums["r2"]),
                   {"long_name": "reconstruction R² (scalar mean, target variance) in the scaled space"}),
            "dead_fraction": ("layer", (sums["count"][:, :, -1] == 0).mean(axis=0),
                              {"long_name": "share of concepts never active at the layer"}),
        },
        coords=coords,
    )
    notes = []
    if classes is not None:
        result["class_information"] = (cube, class_information(sums["class_count"], sums["class_tokens"]),
                                       {"units": "bit", "long_name": "I(concept active on a token; image label)"})
    else:
        notes.append("class analyses skipped: the store has no labels (record from class sub-folders to get them)")
    tests = _boundary_result(birth[~dead], death[~dead], layers, partition, n_permutations, seed)
    result = result.merge(tests).assign_attrs(tests.attrs)
    result = result.merge(top_examples(ds, dictionary, result, partition, examples_per_phase, top_images, progress))
    if per_phase:
        result = result.merge(_per_phase(ds, dictionary, partition, progress))
    if stability:
        result = result.merge(_stability(ds, dictionary, _pooled_r2(sums), progress))
    return assign_phases(result, partition).assign_attrs(
        **provenance(ds), analysis="concepts", dictionary_kind=dictionary.kind, concepts=int(frequency.shape[0]), k=int(dictionary.k),
        steps=int(dictionary.steps), dictionary_seed=int(dictionary.seed), alive_fraction=alive_fraction,
        n_images=int(ds.sizes["image"]), notes=notes,
        definitions="birth/death: first/last layer with mean activation >= alive_fraction x the concept's peak "
                    "(all tokens); an event counts at a boundary when its gap between layers is one where the phase changes",
    )


def profile_sums(ds: xr.Dataset, dictionary: ConceptDictionary, classes: np.ndarray | None, progress: bool = True) -> dict:
    """Counts and sums of every concept's activations over the store, per layer and token kind.

    Returns
    -------
    dict
        ``count``, ``total`` (concept, layer, kind + all); ``tokens`` (layer, kind + all); ``r2`` (4,
        layer, kind + all): the `dynamo.metrics.r2_sums`; with ``classes`` (sorted labels)
        ``class_count`` (concept, layer, kind + all, class) and ``class_tokens`` (kind + all, class).
    """
    groups = token_groups(ds["token_kind"])
    positions = np.flatnonzero(np.isin(ds["layer"].values, dictionary.layers_))
    reader = partial(_block_sums, dictionary=dictionary, groups=groups, positions=positions, classes=classes)
    sums = fold_image_blocks(reader, ds, description="concepts: profiles", progress=progress)
    for key in ("count", "total", "tokens", "r2", "class_count", "class_tokens"):  # "all" = the sum over kinds
        if key in sums:
            axis = -2 if key.startswith("class") else -1
            sums[key] = np.concatenate([sums[key], sums[key].sum(axis=axis, keepdims=True)], axis=axis)
    return sums


def _block_sums(block: xr.Dataset, dictionary: ConceptDictionary, groups: dict, positions: np.ndarray,
                classes: np.ndarray | None) -> dict:
    """`profile_sums` of one block of images (a `fold_image_blocks` partial)."""
    concepts, n_kinds = dictionary.model_.encoder.out_features, len(groups)
    shape = (concepts, len(positions), n_kinds)
    sums = {"count": np.zeros(shape), "total": np.zeros(shape), "tokens": np.zeros((len(positions), n_kinds)),
            "r2": np.zeros((4, len(positions), n_kinds))}
    image_class = None
    if classes is not None:
        image_class = np.searchsorted(classes, block["label"].values.astype(int))
        sums["class_count"] = np.zeros((*shape, len(classes)))
        sums["class_tokens"] = np.outer([len(index) for index in groups.values()],
                                        np.bincount(image_class, minlength=len(classes)))
    selected = block.isel(layer=positions)
    for slot, states in enumerate(layer_states(selected)):
        n_images, n_tokens = states.shape[:2]
        values, indices, reconstruction, target = dictionary.encode(states, int(selected["layer"].values[slot]))
        values, indices = values.reshape(n_images, n_tokens, -1).numpy(), indices.reshape(n_images, n_tokens, -1).numpy()
        reconstruction, target = reconstruction.reshape(n_images, n_tokens, -1), target.reshape(n_images, n_tokens, -1)
        for kind, index in enumerate(groups.values()):
            value, concept = values[:, index].ravel(), indices[:, index].ravel()  # image-major: (image, token, k)
            active = value > 0
            sums["count"][:, slot, kind] = np.bincount(concept[active], minlength=concepts)
            sums["total"][:, slot, kind] = np.bincount(concept, weights=value, minlength=concepts)
            sums["tokens"][slot, kind] = n_images * len(index)
            sums["r2"][:, slot, kind] = [float(v) for v in r2_sums(reconstruction[:, index], target[:, index], "target", dims=None)]
            if image_class is not None:
                entry_class = np.repeat(image_class, len(index) * values.shape[-1])[active]
                joint = np.bincount(entry_class * concepts + concept[active], minlength=len(classes) * concepts)
                sums["class_count"][:, slot, kind] = joint.reshape(len(classes), concepts).T
    return sums


def lifetimes(activation: np.ndarray, layers: np.ndarray, alive_fraction: float = ALIVE_FRACTION):
    """Birth, peak and death layer of each concept from its (concept, layer) mean activation.

    Returns
    -------
    birth, peak, death : numpy.ndarray of int, (concept,)
        Layer values; -1 for a concept that is never active.
    """
    peak_value = activation.max(axis=1, keepdims=True)
    alive = (activation >= alive_fraction * peak_value) & (peak_value > 0)
    fired = alive.any(axis=1)
    first = alive.argmax(axis=1)
    last = alive.shape[1] - 1 - alive[:, ::-1].argmax(axis=1)
    values = [np.where(fired, layers[index], -1) for index in (first, activation.argmax(axis=1), last)]
    return tuple(value.astype(int) for value in values)


def boundary_test(event_gaps: np.ndarray, boundary_gaps, eligible_gaps, n_permutations: int = 10000, seed: int = 0) -> dict:
    """Share of events at phase boundaries against boundaries placed at random among the eligible gaps.

    Parameters
    ----------
    event_gaps : numpy.ndarray of int
        The gap of each event (gap i lies between layers i and i + 1); events outside ``eligible_gaps`` are left out.
    boundary_gaps, eligible_gaps : sequence of int
        The gaps where the phase changes, and those a boundary may sit in.
    n_permutations : int
        Enumerate every placement when there are at most this many, else draw this many (with ``seed``).

    Returns
    -------
    dict
        ``fraction``, ``null_fraction``, ``p_value`` (placements at least as extreme, the observed
        one counted), ``n_events``, ``n_placements``, ``exact``.
    """
    eligible = np.asarray(sorted(eligible_gaps), dtype=int)
    boundaries = np.asarray(sorted(boundary_gaps), dtype=int)
    events = np.asarray(event_gaps, dtype=int)
    events = events[np.isin(events, eligible)]
    per_gap = np.array([(events == gap).sum() for gap in eligible], dtype=float)
    outcome = {"n_events": int(len(events)), "fraction": math.nan, "null_fraction": math.nan, "p_value": math.nan,
               "n_placements": 0, "exact": True}
    if len(events) == 0 or len(boundaries) == 0 or len(boundaries) >= len(eligible):
        return outcome
    observed = per_gap[np.isin(eligible, boundaries)].sum() / len(events)
    total = math.comb(len(eligible), len(boundaries))
    if total <= n_permutations:
        placements = np.array(list(itertools.combinations(range(len(eligible)), len(boundaries))))
        null = per_gap[placements].sum(axis=1) / len(events)
        p_value = float(np.mean(null >= observed - 1e-12))
    else:
        rng = np.random.default_rng(seed)
        placements = np.array([rng.choice(len(eligible), len(boundaries), replace=False) for _ in range(n_permutations)])
        null = per_gap[placements].sum(axis=1) / len(events)
        p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations))
    return {**outcome, "fraction": float(observed), "null_fraction": float(null.mean()), "p_value": p_value,
            "n_placements": int(len(placements)), "exact": bool(total <= n_permutations)}


def _boundary_result(birth, death, layers, partition: Partition, n_permutations: int, seed: int) -> xr.Dataset:
    """The boundary test for births, deaths and both, as variables over ``event``."""
    phase = partition.phase_of(layers)
    eligible = [i for i in range(len(layers) - 1) if phase[i] != NO_PHASE and phase[i + 1] != NO_PHASE]
    boundaries = [i for i in eligible if phase[i] != phase[i + 1]]
    position = {int(layer): i for i, layer in enumerate(layers)}
    birth_gaps = np.array([position[int(b)] - 1 for b in birth])  # born at layer i: the gap (i-1, i)
    death_gaps = np.array([position[int(d)] for d in death])      # dead after layer i: the gap (i, i+1)
    tests = {name: boundary_test(gaps, boundaries, eligible, n_permutations, seed)
             for name, gaps in (("births", birth_gaps), ("deaths", death_gaps),
                                ("both", np.concatenate([birth_gaps, death_gaps])))}
    names = list(tests)
    return xr.Dataset(
        {f"boundary_{key}": ("event", [tests[name][key] for name in names])
         for key in ("fraction", "null_fraction", "p_value", "n_events", "n_placements")},
        coords={"event": names},
        attrs={"boundary_gaps": [int(layers[i]) for i in boundaries], "boundary_test_exact": tests["both"]["exact"]},
    )


def _count_at(values: np.ndarray, layers: np.ndarray) -> np.ndarray:
    return np.array([(values == layer).sum() for layer in layers], dtype=int)


def class_information(class_count: np.ndarray, class_tokens: np.ndarray) -> np.ndarray:
    """Mutual information (bits) between a concept being active on a token and the token's image label.

    ``class_count`` (..., kind, class) active tokens and ``class_tokens`` (kind, class) all tokens of
    each class's images; returns (..., kind).
    """
    n = class_tokens.sum(axis=-1, keepdims=True)
    joint = np.stack([class_count, class_tokens - class_count], axis=-2) / n[..., None, :]  # (..., kind, 2, class)
    p_active = joint.sum(axis=-1, keepdims=True)
    p_class = joint.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log2(joint / (p_active * p_class)), 0.0)
    return np.clip(terms.sum(axis=(-2, -1)), 0, None)


def example_concepts(result: xr.Dataset, partition: Partition, per_phase: int = 4) -> list[tuple[int, int, int]]:
    """``(phase, concept, peak layer)`` of the top concepts of each phase: peaking in it, active on at
    most half of the patches at the peak, ranked by mean patch activation there.
    """
    if "patch" not in result["token_kind"].values:
        return []
    peak = result["peak"].values
    at_peak = {name: result[name].sel(token_kind="patch").values[np.arange(len(peak)), _index_of(result, peak)]
               for name in ("frequency", "mean_activation")}
    chosen = []
    for phase, blocks in enumerate(partition):
        candidates = np.flatnonzero(np.isin(peak, blocks) & (at_peak["frequency"] > 0) & (at_peak["frequency"] <= 0.5))
        ranked = candidates[np.argsort(-at_peak["mean_activation"][candidates], kind="stable")][:per_phase]
        chosen += [(phase, int(concept), int(peak[concept])) for concept in ranked]
    return chosen


def _index_of(result: xr.Dataset, layers: np.ndarray) -> np.ndarray:
    values = result["layer"].values
    return np.searchsorted(values, np.where(layers < 0, values[0], layers))


def top_examples(ds: xr.Dataset, dictionary: ConceptDictionary, result: xr.Dataset, partition: Partition,
                 per_phase: int = 4, top_images: int = 6, progress: bool = True) -> xr.Dataset:
    """The images that activate each example concept most at its peak layer, with patch maps.

    Returns
    -------
    xarray.Dataset
        ``top_image`` (example, rank; image positions), ``top_activation`` (max over patches),
        ``top_map`` (example, rank, patch_row, patch_col; NaN where no patch was recorded).
    """
    chosen = example_concepts(result, partition, per_phase)
    rows, cols = ds["patch_row"].values, ds["patch_col"].values
    patches = np.flatnonzero(rows >= 0)
    grid = (int(rows.max()) + 1, int(cols.max()) + 1) if len(patches) else (0, 0)
    n_top = min(top_images, ds.sizes["image"])
    best = np.full((len(chosen), n_top), -np.inf)
    images = np.full((len(chosen), n_top), -1)
    maps = np.full((len(chosen), n_top, *grid), np.nan, dtype=np.float32)
    layers = sorted({layer for _, _, layer in chosen})
    blocks = image_blocks(ds) if chosen else []
    with progress_bar(total=len(blocks), desc="concepts: examples", enabled=progress, leave=False) as bar:
        for block in blocks:
            for layer in layers:
                states = np.asarray(ds["hidden"].isel(image=block).sel(layer=layer).values[:, patches], dtype=np.float32)
                activation, concept_index, _, _ = dictionary.encode(states, layer)
                activation = activation.reshape(len(states), len(patches), -1).numpy()
                concept_index = concept_index.reshape(len(states), len(patches), -1).numpy()
                for slot, (_, concept, peak) in enumerate(chosen):
                    if peak != layer:
                        continue
                    values = (activation * (concept_index == concept)).sum(axis=-1)
                    score = np.concatenate([best[slot], values.max(axis=1)])
                    order = np.argsort(-score, kind="stable")[:n_top]
                    grids = np.full((len(values), *grid), np.nan, dtype=np.float32)
                    grids[:, rows[patches], cols[patches]] = values
                    maps[slot] = np.concatenate([maps[slot], grids])[order]
                    images[slot] = np.concatenate([images[slot], np.arange(block.start, block.stop)])[order]
                    best[slot] = score[order]
            bar.update()
    known = image_coords(ds)
    ids = known.get("image_id", np.arange(ds.sizes["image"]).astype(str)).astype(str)
    coords = {
        "example_concept": ("example", [c for _, c, _ in chosen]),
        "example_layer": ("example", [layer for _, _, layer in chosen]),
        "example_phase": ("example", [phase for phase, _, _ in chosen]),
        "top_image_id": (("example", "rank"), np.where(images >= 0, ids[np.clip(images, 0, None)], "")),
    }
    labels = store_labels(ds)
    if labels is not None:
        names = known.get("label_name", labels).astype(str)
        coords["top_label"] = (("example", "rank"), np.where(images >= 0, names[np.clip(images, 0, None)], ""))
    return xr.Dataset(
        {
            "top_image": (("example", "rank"), images),
            "top_activation": (("example", "rank"), np.where(np.isfinite(best), best, np.nan)),
            "top_map": (("example", "rank", "patch_row", "patch_col"), maps),
        },
        coords=coords,
    )


def _sub(folder, name: str):
    return None if folder is None else Path(folder) / name


def _per_phase(ds: xr.Dataset, dictionary: ConceptDictionary, partition: Partition, progress: bool) -> xr.Dataset:
    """One dictionary per phase: R² and dead fraction per layer, and the match of its atoms to the shared ones."""
    layers = dictionary.layers_
    r2 = np.full((len(layers), len(token_groups(ds["token_kind"])) + 1), np.nan)
    dead = np.full(len(layers), np.nan)
    match = []
    for index, blocks in enumerate(partition):
        phase_layers = [layer for layer in blocks if layer in layers]
        fitted = clone(dictionary).set_params(
            layers=phase_layers, seed=derived_seed(dictionary.seed, "phase", index),
            checkpoint_dir=_sub(dictionary.checkpoint_dir, f"phase{index}"),
        ).fit(ds)
        sums = profile_sums(ds, fitted, None, progress=progress)
        where = np.isin(layers, fitted.layers_)
        r2[where] = r2_from_sums(*sums["r2"])
        dead[where] = (sums["count"][:, :, -1] == 0).mean(axis=0)
        match.append(float(matched_cosine(fitted.atoms_, dictionary.atoms_)[0].mean()))
    return xr.Dataset({
        "per_phase_r2": (("layer", "token_kind"), r2, {"long_name": "R² of the phase's own dictionary"}),
        "per_phase_dead_fraction": ("layer", dead),
        "per_phase_match": ("phase_index", match,
                            {"long_name": "mean Hungarian-matched cosine of the phase dictionary's atoms to the shared dictionary's"}),
    }, coords={"phase_index": np.arange(len(partition))})


def _pooled_r2(sums: dict) -> float:
    """R² over every layer and token from `profile_sums`."""
    return float(r2_from_sums(*sums["r2"][:, :, -1].sum(axis=1)))


def _stability(ds: xr.Dataset, dictionary: ConceptDictionary, r2_given: float, progress: bool) -> xr.Dataset:
    """Two seeds of each dictionary kind: matched cosine between their atoms and pooled R² (``r2_given``: ``dictionary``'s)."""
    cosines, means, r2 = [], [], []
    for kind in KINDS:
        fits = []
        for index, seed in enumerate((dictionary.seed, derived_seed(dictionary.seed, "stability"))):
            if kind == dictionary.kind and index == 0:
                fits.append(dictionary)
                continue
            fits.append(clone(dictionary).set_params(
                kind=kind, seed=seed, checkpoint_dir=_sub(dictionary.checkpoint_dir, f"{kind}-seed{index}")).fit(ds))
        cosine = np.sort(matched_cosine(fits[0].atoms_, fits[1].atoms_)[0])[::-1]
        cosines.append(cosine)
        means.append(float(cosine.mean()))
        first = fits[0]
        r2.append(r2_given if first is dictionary else _pooled_r2(profile_sums(ds, first, None, progress=progress)))
    return xr.Dataset({
        "stability_cosine": (("dictionary_kind", "atom"), np.array(cosines),
                             {"long_name": "Hungarian-matched cosine between two seeds' atoms, sorted"}),
        "stability": ("dictionary_kind", means, {"long_name": "mean matched cosine between two seeds"}),
        "stability_r2": ("dictionary_kind", r2, {"long_name": "R² over every layer and token (first seed)"}),
    }, coords={"dictionary_kind": list(KINDS)})


def summarize(result: xr.Dataset) -> dict:
    """Quality per layer, concept counts by phase, the boundary test, selectivity, stability."""
    alive = result["peak"].values >= 0
    numbers = {
        "dictionary_kind": result.attrs.get("dictionary_kind"),
        "concepts": int(result.sizes["concept"]),
        "k": result.attrs.get("k"),
        "alive_concepts": int(alive.sum()),
        "r2_per_layer": rounded(result["r2"].sel(token_kind=ALL_TOKENS).values.astype(float)),
        **{f"r2_per_layer_{kind}": rounded(result["r2"].sel(token_kind=kind).values.astype(float))
           for kind in result["token_kind"].values if kind != ALL_TOKENS},
        "dead_fraction_per_layer": rounded(result["dead_fraction"].values.astype(float)),
        "dead_fraction": rounded(float(1 - alive.mean())),
        "births_per_layer": result["births"].values.tolist(),
        "deaths_per_layer": result["deaths"].values.tolist(),
    }
    if "phase" in result.coords:
        phase = result["phase"].values
        layers = result["layer"].values
        peak_phase = np.array([phase[np.searchsorted(layers, p)] if p >= 0 else NO_PHASE for p in result["peak"].values])
        numbers["concepts_peaking_per_phase"] = [int((peak_phase == index).sum()) for index in sorted(set(phase) - {NO_PHASE})]
    for event in result["event"].values:
        for name in ("boundary_fraction", "boundary_null_fraction", "boundary_p_value"):
            numbers[f"{name}_{event}"] = rounded(float(result[name].sel(event=event)))
    if "class_information" in result:
        information = result["class_information"].sel(token_kind=ALL_TOKENS)
        numbers["class_information_max_per_layer"] = rounded(information.max("concept").values.astype(float))
    if "per_phase_r2" in result:
        numbers["per_phase_r2_per_layer"] = rounded(result["per_phase_r2"].sel(token_kind=ALL_TOKENS).values.astype(float))
        numbers["per_phase_dead_fraction_per_layer"] = rounded(result["per_phase_dead_fraction"].values.astype(float))
        numbers["per_phase_match"] = rounded(result["per_phase_match"].values.astype(float))
    if "stability" in result:
        for kind in result["dictionary_kind"].values:
            numbers[f"stability_{kind}"] = rounded(float(result["stability"].sel(dictionary_kind=kind)))
            numbers[f"stability_r2_{kind}"] = rounded(float(result["stability_r2"].sel(dictionary_kind=kind)))
    return numbers
