"""The model organism: its planted cliff is there, and the pipeline measures it.

The first tests use the shipped organisms only through transformers and plain torch hooks written
here (knockout as an attention-mask rewrite, patches as output replacements, teacher-forced
log-probs read at the position before the answer), independent of capture's own intervention
code. The end-to-end tests run the production path (``gap capture`` with the demo config, then
``gap analyze``) on each organism and check that it finds the same cliff. Training is too slow for ``make test``; the
``slow`` test retrains and checks determinism and accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from capture.organism import SHIPPED_CLIFFS, organism_path, read_organism  # noqa: E402

N_SAMPLES = 64
LAYERS = 6


def _encode(processor: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat-template prompts + images in one processor call, the answer token appended."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
        add_generation_prompt=True, tokenize=False) for r in rows]
    enc = processor(text=prompts, images=[r["image"] for r in rows], return_tensors="pt")
    tok = processor.tokenizer
    answers = torch.tensor([tok(r["answer"], add_special_tokens=False)["input_ids"] for r in rows])
    assert answers.shape[1] == 1, "organism answers are single tokens"
    ids = torch.cat([enc["input_ids"], answers], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": enc["pixel_values"],
            "gold": answers[:, 0], "visual": ids == processor.tokenizer.convert_tokens_to_ids("<image>")}


class Probe:
    """Forward passes of one organism with hand-written knockout and patch hooks."""

    def __init__(self, path: Path, rows: list[dict[str, Any]]) -> None:
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation="eager").eval()
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.batch = _encode(self.processor, rows)
        self.layers = self.model.model.language_model.layers
        self.answers = sorted({r["answer"] for r in rows})

    def logprobs(self, knock_after: int | None = None, patch: tuple[int, Any] | None = None) -> Any:
        """Log-softmax at the position predicting the answer (index T-2 predicts token T-1)."""
        b = self.batch
        n, t = b["input_ids"].shape
        vis = b["visual"]
        handles = []
        if knock_after is not None:
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            # Non-visual queries may not see visual keys; visual queries keep their own causal view
            # (nothing reads them after the knockout, so their rows cannot change the answer).
            allowed = causal[None] & ~((~vis)[:, :, None] & vis[:, None, :])
            mask = torch.zeros(n, 1, t, t).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)

            def pre(module, args, kwargs):
                return args, {**kwargs, "attention_mask": mask}

            handles += [layer.register_forward_pre_hook(pre, with_kwargs=True)
                        for i, layer in enumerate(self.layers) if i > knock_after]
        if patch is not None:
            layer_idx, replace = patch

            def post(module, args, out):
                h = out.clone()
                h[vis] = replace(out)[vis]
                return h

            handles.append(self.layers[layer_idx].register_forward_hook(post))
        try:
            with torch.no_grad():
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    pixel_values=b["pixel_values"]).logits
        finally:
            for h in handles:
                h.remove()
        return logits[:, -2].double().log_softmax(-1)

    def accuracy(self, lp: Any) -> float:
        return float((lp.argmax(-1) == self.batch["gold"]).double().mean())

    def gold_logp(self, lp: Any) -> np.ndarray:
        return lp[torch.arange(len(lp)), self.batch["gold"]].numpy()


@pytest.fixture(scope="module", params=SHIPPED_CLIFFS, ids=[f"cliff{k}" for k in SHIPPED_CLIFFS])
def measured(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Everything the independent checks need, computed once per shipped organism."""
    from capture.synthetic import generate

    torch.set_num_threads(1)
    k = request.param
    path = organism_path(k)
    meta = read_organism(path)
    rows = generate(N_SAMPLES, seed=123, kinds=meta["recipe"]["kinds"], split="test")
    probe = Probe(path, rows)
    clean = probe.logprobs()
    out: dict[str, Any] = {"k": k, "meta": meta, "probe": probe, "rows": rows,
                           "baseline": probe.accuracy(clean), "clean_logp": probe.gold_logp(clean)}
    out["trunc"] = {L: probe.accuracy(probe.logprobs(knock_after=L)) for L in range(LAYERS)}
    # Visual-channel causal deltas, method zero: D(l) = s_clean - s_patched(l).
    out["delta"] = np.stack([out["clean_logp"] - probe.gold_logp(probe.logprobs(patch=(l, torch.zeros_like)))
                             for l in range(LAYERS)], axis=1)
    # Swap: each sample gets the visual states of the next sample with a different answer.
    answers = [r["answer"] for r in rows]
    donor = [next(j % len(rows) for j in range(i + 1, i + len(rows)) if answers[j % len(rows)] != answers[i])
             for i in range(len(rows))]
    donor_gold = probe.batch["gold"][donor]
    out["swap_follow"] = {}
    for l in range(LAYERS):
        lp = probe.logprobs(patch=(l, lambda h: h[donor]))
        out["swap_follow"][l] = float((lp.argmax(-1) == donor_gold).double().mean())
    return out


def test_shipped_organism_is_a_plain_small_checkpoint() -> None:
    for k in SHIPPED_CLIFFS:
        path = organism_path(k)
        meta = read_organism(path)
        assert meta["planted_cliff"] == k
        assert meta["intervention_at_inference"] is None and meta["converged"]
        assert {"seed", "steps", "train_accuracy", "how", "recipe"} <= set(meta)
        assert meta["recipe"]["schedule"]["blind"] > 0  # the knockout schedule is recorded
        weights = path / "model.safetensors"
        assert weights.exists() and weights.stat().st_size < 8e6
        assert (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists()
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "llava" and config["text_config"]["num_hidden_layers"] == LAYERS


def test_organism_answers_well(measured: dict[str, Any]) -> None:
    assert measured["baseline"] >= 0.9
    assert measured["meta"]["train_accuracy"] >= 0.9


def test_knockout_truncation_shows_the_planted_cliff(measured: dict[str, Any]) -> None:
    k, base, trunc = measured["k"], measured["baseline"], measured["trunc"]
    chance = 1 / len(measured["probe"].answers)
    for L in range(k, LAYERS):
        assert trunc[L] >= base - 0.05, (L, trunc)
    for L in range(0, k - 1):
        assert trunc[L] <= base - 0.3, (L, trunc)
        assert trunc[L] <= chance + 0.2, (L, trunc)


def test_visual_causal_deltas_vanish_beyond_the_cliff(measured: dict[str, Any]) -> None:
    k, delta = measured["k"], measured["delta"]
    curve = delta.mean(axis=0)
    assert np.all(curve[:k] > 0.5), curve  # before k, zeroed visual tokens cost the answer
    assert np.all(np.abs(curve[k:]) < 0.01), curve  # after k, nothing reads them
    # EVD per sample (last layer with D >= 0.01) and its median: the layer before k, whose
    # output layer k reads.
    tau = 0.01
    evd = np.array([max([l for l in range(LAYERS) if d[l] >= tau], default=-1) for d in delta])
    assert abs(np.median(evd) - k) <= 1


def test_swap_before_the_cliff_follows_the_donor(measured: dict[str, Any]) -> None:
    k, follow = measured["k"], measured["swap_follow"]
    for l in range(k):
        assert follow[l] >= 0.9, follow
    for l in range(k, LAYERS):
        assert follow[l] <= 0.05, follow


# ---- end to end: the production capture path and the analysis find the planted cliff -----------

DEMO_CONFIG = organism_path(SHIPPED_CLIFFS[0]).parent / "demo.yaml"


@pytest.fixture(scope="module", params=SHIPPED_CLIFFS, ids=[f"cliff{k}" for k in SHIPPED_CLIFFS])
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``gap capture`` (demo config, fewer samples and interventions) then ``gap analyze``."""
    from analyze import open_analysis
    from analyze.cli import main as analyze_main
    from capture.cli import main as capture_main
    from store import open_run

    k = request.param
    tmp = tmp_path_factory.mktemp(f"organism_e2e_{k}")
    run, out = tmp / "run", tmp / "analysis"
    overrides = [f"model.path={organism_path(k)}", "data.limit=24", "capture.activations=false",
                 "capture.causal.methods=[zero, swap]", "capture.causal.channels=[visual]",
                 "capture.truncation.modes=[knockout]", "capture.truncation.score=[logprob]"]
    args = [str(DEMO_CONFIG), "--out", str(run), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert capture_main(args) == 0
    assert analyze_main([str(run), "--out", str(out), "--scheduler", "threads", "--no-plots", "-q"]) == 0
    return {"k": k, "run": open_run(run), "analysis": open_analysis(out), "out": out}


def test_pipeline_truncation_curve_shows_the_cliff(pipeline: dict[str, Any]) -> None:
    k = pipeline["k"]
    curve = pipeline["analysis"]["trunc_curve"].sel(mode="knockout", subset="all")
    acc = {int(L): float(curve.sel(trunc_layer=L)) for L in curve["trunc_layer"].values}
    assert acc[-1] >= 0.9, acc  # the untruncated baseline
    for L in range(k, LAYERS):
        assert acc[L] >= acc[-1] - 0.05, acc
    for L in range(0, k - 1):
        assert acc[L] <= acc[-1] - 0.3, acc


def test_pipeline_estimates_the_planted_cliff(pipeline: dict[str, Any]) -> None:
    # planted k: the first layer whose visual states no longer matter; the cliff layer is the last
    # one that still does (EVD's convention), by every method
    k, ds = pipeline["k"], pipeline["analysis"]
    assert float(ds["cliff_layer"]) == k - 1
    by_method = dict(zip(ds["cliff_method"].values.tolist(), ds["cliff_by_method"].values.tolist()))
    assert by_method["threshold_crossing"] == k - 1
    assert k - 2 <= by_method["gradient"] <= k - 1  # the steepest step of a fading mean curve
    start, end = (float(ds["transfer_window"].sel(bound=b)) for b in ("start", "end"))
    assert start <= k <= end, (start, end)
    assert (pipeline["out"] / "decision.json").exists()


def test_pipeline_causal_deltas_and_swaps(pipeline: dict[str, Any]) -> None:
    k, run = pipeline["k"], pipeline["run"]
    delta = run["delta"].sel({"method": "zero", "channel": "visual"}).transpose("sample", "layer").values
    assert np.all(np.abs(delta[:, k:].mean(axis=0)) < 0.01), delta.mean(axis=0)
    assert np.all(delta[:, :k].mean(axis=0) > 0.5), delta.mean(axis=0)
    # Swap before k: the donor's answer becomes the likely one; after k it stays unlikely.
    donor = run["donor_logp_patched"].sel(channel="visual").transpose("sample", "layer").values
    differs = np.asarray(run["answer"].values) != np.asarray(
        run["answer"].values)[[list(run["sample_id"].values).index(d) for d in run["swap_donor"].values]]
    assert differs.sum() >= 5
    assert np.mean(donor[differs, :k] > np.log(0.5)) >= 0.9
    assert np.mean(donor[differs, k:] < np.log(0.5)) >= 0.9


# ---- the training code's own pieces (fast) ----------------------------------------------------

def test_conditions_are_drawn_from_their_layer_ranges() -> None:
    from capture.organism import CONDITIONS, PATCHES, Recipe, _draw_conditions

    recipe = Recipe(cliff=3)
    c = _draw_conditions(recipe, 4000, torch.Generator().manual_seed(0))
    kind = {name: c["kind"] == i for i, name in enumerate(CONDITIONS)}
    for name in CONDITIONS:  # every condition occurs, roughly at its scheduled rate
        assert abs(float(kind[name].double().mean()) - recipe.schedule[name]) < 0.03
    assert set(c["after"][kind["keep"]].tolist()) == {3, 4, 5}
    assert set(c["after"][kind["blind"]].tolist()) == {-1, 0, 1, 2}
    assert set(c["after"][~(kind["keep"] | kind["blind"])].tolist()) == {6}  # no knockout
    assert set(c["patch_layer"][kind["late_patch"]].tolist()) == {3, 4, 5}
    assert set(c["patch_layer"][kind["early_swap"]].tolist()) == {0, 1, 2}
    assert set(c["patch_kind"][kind["late_patch"]].tolist()) == set(range(len(PATCHES)))
    assert set(c["patch_kind"][kind["early_swap"]].tolist()) == {PATCHES.index("swap")}
    assert set(c["patch_layer"][kind["clean"] | kind["keep"] | kind["blind"]].tolist()) == {-1}


def test_training_hooks_match_the_independent_ones(measured: dict[str, Any]) -> None:
    """The training-time knockout and swap equal this file's hand-written versions."""
    from capture.organism import PATCHES, Conditions

    probe, k = measured["probe"], measured["k"]
    b = probe.batch
    n = len(b["gold"])
    cond = Conditions(list(probe.layers))
    donor = torch.roll(torch.arange(n), 1)
    inputs = {key: b[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    with cond.installed(), torch.no_grad():
        cond.set(b["visual"], after=torch.full((n,), k - 1))
        knocked = probe.model(**inputs).logits[:, -2].double().log_softmax(-1)
        cond.set(b["visual"], patch_layer=torch.full((n,), 0), patch_kind=torch.full((n,), PATCHES.index("swap")),
                 donor=donor)
        swapped = probe.model(**inputs).logits[:, -2].double().log_softmax(-1)
    torch.testing.assert_close(knocked, probe.logprobs(knock_after=k - 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped, probe.logprobs(patch=(0, lambda h: h[donor])), atol=1e-5, rtol=0)


def test_planted_check_reads_every_property() -> None:
    from capture.organism import Recipe, _planted

    good = {"clean": 1.0, "knockout_after_-1": 0.2, "knockout_after_0": 0.3, "knockout_after_1": 0.97,
            "swap_follow_0": 0.96, "swap_follow_1": 0.0, "zero_delta_1": 0.004, "zero_delta_0": 2.0}
    recipe = Recipe(cliff=1)
    assert _planted(good, recipe, chance=0.25)
    for key, bad in [("clean", 0.9), ("knockout_after_0", 0.36), ("knockout_after_1", 0.9),
                     ("swap_follow_0", 0.5), ("zero_delta_1", -0.02)]:
        assert not _planted({**good, key: bad}, recipe, chance=0.25), key


def test_cli_refuses_a_cliff_without_layers_around_it(tmp_path: Path) -> None:
    from capture.organism import main
    from schemas.errors import GapError

    with pytest.raises(GapError, match="--cliff 5"):
        main(["train", "--cliff", "5", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_training_is_deterministic_and_plants_the_cliff(tmp_path: Path) -> None:
    from capture.organism import Recipe, train

    small = dict(cliff=2, max_steps=30, min_steps=0, pool=128, eval_n=64, eval_every=10)
    a = train(Recipe(**small), tmp_path / "a", progress=False)
    b = train(Recipe(**small), tmp_path / "b", progress=False)
    assert a["history"] == b["history"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    full = train(Recipe(cliff=2), tmp_path / "full", progress=False)
    assert full["converged"] and full["train_accuracy"] >= 0.95
