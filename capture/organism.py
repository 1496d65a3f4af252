"""The model organism: a tiny LLaVA trained so that its modality cliff sits at a known layer.

No real VLM can be downloaded here, and a random-weight model has no cliff to find. The
organism is a tiny LLaVA (:func:`capture.tiny.build_tiny`: CLIP tower at 56 px / 14 px patches ->
16 visual tokens, a 6-layer Llama of width 64) trained on :mod:`capture.synthetic`'s colour
questions with a *planted* cliff ``k``: the answer can be read from the visual tokens only by
decoder layer ``k``. The cliff lives in the weights; the organism loads as a plain checkpoint
and needs no intervention at inference.

How it is planted. Every training row gets one condition, drawn by seed (the *schedule*):

``clean``
    no restriction; target: the gold answer.
``keep``
    knockout after a layer ``L`` drawn from ``k .. n-1`` (no position may attend to visual
    tokens in layers ``> L``, exactly :func:`capture.attention.block_keys`, the capture path's
    knockout); target: the gold answer. Visual evidence must have reached text positions by ``k``.
``blind``
    knockout after ``L`` drawn from ``-1 .. k-1``; target: the uniform distribution over the
    answer words. Reading the image before layer ``k`` must not be enough to answer, so the
    model cannot move the evidence early.
``late_patch``
    the visual states at the output of a layer drawn from ``k .. n-1`` are replaced by another
    row's, by zeros or by their mean; target: the row's own answer. Layers after ``k`` learn to
    ignore the visual tokens, so visual-channel patches beyond ``k`` change nothing.
``early_swap``
    the visual states at the output of a layer drawn from ``0 .. k-1`` are replaced by another
    row's; target: *that* row's answer. What the text positions glimpsed before ``k`` must not
    decide the answer: the visual tokens as layer ``k`` reads them do.

The loss is cross-entropy on the answer token (teacher forcing) plus on the EOS that ends the
answer (so greedy generation yields exactly the answer word), AdamW, batch 32, on prompts
encoded by :func:`capture.prompts.encode_sample` (the checkpoint's chat template), i.e. the same
token layout capture produces. Training is deterministic by seed (one thread, deterministic
algorithms; the same machine and library versions give the same bytes) and stops once every
planted property holds on held-out rows, or at the step cap: clean accuracy and accuracy under
knockout after each ``L >= k`` at least ``target_accuracy``, after each ``L < k`` at most chance +
0.1, swaps at layers 0 and ``k - 1`` followed by the answer, zeroed visual states at ``k`` and
``n - 2`` moving the answer log-prob by at most :data:`ZERO_DELTA_MAX`. The shipped organisms took
1900 (cliff 2) and 2400 (cliff 4) steps, 9-10 minutes each on two shared CPU cores.

Examples
--------
Train (a few minutes on two CPU cores) and inspect what was recorded::

    gap organism train --cliff 2 --out /tmp/cliff2
    python -c "import json; print(json.load(open('/tmp/cliff2/organism.json'))['planted_cliff'])"

The shipped organisms are found with :func:`organism_path`:

>>> organism_path(2).name
'cliff2'
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from schemas.errors import GapError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from capture.family import LoadedModel
    from capture.prompts import PromptSample

log = logging.getLogger(__name__)

ORGANISM_DIR = Path(__file__).resolve().parent / "organisms"
SHIPPED_CLIFFS = (2, 4)
CONDITIONS = ("clean", "keep", "blind", "late_patch", "early_swap")
PATCHES = ("swap", "zero", "mean")  # what a late patch writes into the visual positions
ZERO_DELTA_MAX = 0.01  # nats: "near zero" for a visual-channel patch beyond the cliff (tau)
TRAIN_KINDS = ["square_colour"]
HOW = ("tiny LLaVA (capture.tiny.build_tiny) trained from random weights on capture.synthetic {kinds} "
       "questions; loss: cross-entropy on the answer token (teacher forcing) and on EOS after it. Each "
       "row drew one condition of the schedule: clean (gold); keep = knockout of all attention to "
       "visual tokens in layers > L, L in [k, n-1] (gold); blind = the same for L in [-1, k-1] "
       "(uniform over the answer words); late_patch = visual states at the output of a layer in "
       "[k, n-1] swapped with another row's, zeroed or mean-filled (own gold); early_swap = swapped "
       "at a layer in [0, k-1] (the donor's gold). See capture/organism.py.")


@dataclass
class Recipe:
    """Everything that determines an organism (recorded in ``organism.json``)."""

    cliff: int
    seed: int = 0
    n_layers: int = 6
    hidden_size: int = 64
    image_size: int = 56
    kinds: list[str] = field(default_factory=lambda: list(TRAIN_KINDS))
    pool: int = 2048  # distinct training samples, encoded once
    batch_size: int = 32
    lr: float = 1e-3  # 3e-3 plateaus for thousands of steps under the cliff schedule
    weight_decay: float = 0.01
    max_steps: int = 8000
    min_steps: int = 500
    eval_every: int = 100
    eval_n: int = 256
    target_accuracy: float = 0.95
    schedule: dict[str, float] = field(default_factory=lambda: {
        "clean": 0.2, "keep": 0.25, "blind": 0.2, "late_patch": 0.2, "early_swap": 0.15})

    def check(self) -> None:
        """Raise :class:`GapError` for a recipe that cannot plant its cliff."""
        if not 1 <= self.cliff <= self.n_layers - 2:
            raise GapError(f"--cliff {self.cliff}: must be in 1..{self.n_layers - 2} for a "
                           f"{self.n_layers}-layer organism (layers before and after it are needed)")
        if set(self.schedule) != set(CONDITIONS) or abs(sum(self.schedule.values()) - 1) > 1e-6:
            raise GapError(f"organism schedule {self.schedule}: needs {', '.join(CONDITIONS)} summing to 1")


def organism_path(cliff: int) -> Path:
    """The directory of the shipped organism with planted cliff ``cliff``.

    >>> organism_path(4).parent.name
    'organisms'
    """
    return ORGANISM_DIR / f"cliff{cliff}"


class Conditions:
    """Per-row training conditions applied through hooks on the decoder blocks.

    ``after[b]``: row ``b`` attends to no visual token in layers ``> after[b]`` (``n_layers``:
    no restriction). ``patch_layer[b]``: at the output of that layer (``-1``: none) row ``b``'s
    visual states are replaced according to ``patch_kind[b]`` (an index into :data:`PATCHES`):
    by row ``donor[b]``'s, by zeros, or by their mean over the visual tokens. Set the tensors
    before each forward; the hooks read them.

    Examples
    --------
    >>> cond = Conditions(loaded.layers())                        # doctest: +SKIP
    >>> with cond.installed():                                    # doctest: +SKIP
    ...     cond.set(visual, after=torch.tensor([1, 6]))          # row 0: knockout after layer 1
    ...     logits = loaded.model(**inputs).logits
    """

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.visual: "torch.Tensor | None" = None
        self.after: "torch.Tensor | None" = None
        self.patch_layer: "torch.Tensor | None" = None
        self.patch_kind: "torch.Tensor | None" = None
        self.donor: "torch.Tensor | None" = None

    def set(self, visual: "torch.Tensor", after: "torch.Tensor | None" = None,
            patch_layer: "torch.Tensor | None" = None, patch_kind: "torch.Tensor | None" = None,
            donor: "torch.Tensor | None" = None) -> None:
        """Conditions for the next forward: ``visual`` is the ``(B, T)`` mask, the rest ``(B,)``."""
        self.visual, self.after = visual, after
        self.patch_layer, self.patch_kind, self.donor = patch_layer, patch_kind, donor

    def _pre(self, index: int) -> Any:
        from capture.attention import block_keys

        def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            if self.after is None:
                return None
            rows = self.after < index
            if not bool(rows.any()):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = dict(kwargs)
            # Same mask rewrite as the capture path's knockout, row by row.
            kwargs["attention_mask"] = block_keys(kwargs.get("attention_mask"), self.visual & rows[:, None],
                                                  int(hidden.shape[1]), dtype=hidden.dtype)
            return args, kwargs
        return hook

    def _post(self, index: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> Any:
            if self.patch_layer is None:
                return None
            rows = (self.patch_layer == index).nonzero().flatten()
            if len(rows) == 0:
                return None
            h = output.clone()  # a decoder block returns a plain tensor in transformers 5
            for r in rows.tolist():
                kind, vis = PATCHES[int(self.patch_kind[r])], self.visual[r]
                if kind == "swap":
                    d = int(self.donor[r])
                    h[r, vis] = output[d, self.visual[d]]  # LLaVA: equal visual counts
                elif kind == "zero":
                    h[r, vis] = 0.0
                else:
                    h[r, vis] = output[r, vis].mean(0, keepdim=True)
            return h
        return hook

    @contextmanager
    def installed(self) -> Iterator["Conditions"]:
        """Register the hooks for the duration of the block."""
        handles = []
        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(self._post(i)))
            yield self
        finally:
            for h in handles:
                h.remove()


@dataclass
class _Encoded:
    """A set of encoded samples stacked for fast batching (equal-length prompts)."""

    inputs: dict[str, "torch.Tensor"]  # forward inputs, (N, T) per token, (N, ...) pixels
    visual: "torch.Tensor"  # (N, T) bool
    label: "torch.Tensor"  # (N,) index into the answer classes
    eos_id: int  # the token that ends an answer

    def to(self, device: Any) -> "_Encoded":
        return _Encoded({k: v.to(device) for k, v in self.inputs.items()}, self.visual.to(device),
                       self.label.to(device), self.eos_id)

    def rows(self, idx: "torch.Tensor") -> tuple[dict[str, "torch.Tensor"], "torch.Tensor", "torch.Tensor"]:
        return {k: v[idx] for k, v in self.inputs.items()}, self.visual[idx], self.label[idx]


def _encode(loaded: "LoadedModel", samples: list[dict[str, Any]], classes: list[str]) -> _Encoded:
    """Encode samples through the capture path's prompt code and stack them.

    The organism's questions share one template, so every prompt has the same length and the
    single answer token is the last one; anything else is refused.
    """
    import torch

    from capture.prompts import collate, encode_sample

    encoded: list[PromptSample] = []
    for s in samples:
        ps = encode_sample(loaded.processor, loaded.image_token_id, s)
        if len(ps.answer_ids) != 1:
            raise GapError(f"sample {s['sample_id']}: answer {s['answer']!r} is not one token")
        encoded.append(ps)
    lengths = {ps.n_tokens for ps in encoded}
    if len(lengths) != 1:
        raise GapError(f"organism training needs prompts of one length, got lengths {sorted(lengths)}")
    batch = collate(encoded, loaded.pad_token_id)
    inputs = loaded.forward_inputs(batch.inputs)
    visual = torch.as_tensor(batch.inputs["input_ids"] == loaded.image_token_id)
    label = torch.tensor([classes.index(s["answer"]) for s in samples])
    eos = loaded.processor.tokenizer.eos_token_id
    if eos is None:
        raise GapError("the organism's tokenizer has no EOS token to end answers with")
    return _Encoded(inputs, visual, label, int(eos))


def _class_token_ids(loaded: "LoadedModel", classes: list[str]) -> "torch.Tensor":
    """Token id of each one-token answer word."""
    import torch

    ids = [loaded.processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in classes]
    bad = [c for c, i in zip(classes, ids) if len(i) != 1]
    if bad:
        raise GapError(f"answer word {bad[0]!r} is not a single token of the organism's tokenizer")
    return torch.tensor([i[0] for i in ids])


def _answer_logprobs(loaded: "LoadedModel", data: _Encoded, idx: "torch.Tensor", class_ids: "torch.Tensor",
                    cond: Conditions, **state: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Log-probs of the answer words where the answer is predicted, and of EOS after the answer.

    Returns ``(B, n_classes)`` (log-softmax over the whole vocabulary, class columns) and
    ``(B,)`` log p(EOS | prompt, answer): the organism also learns to end its answer, so greedy
    generation yields exactly the word.
    """
    inputs, visual, _ = data.rows(idx)
    cond.set(visual, **state)
    try:
        # The answer is the last token: the last two positions predict it and what follows it.
        logits = loaded.model(**inputs, logits_to_keep=2).logits.float().log_softmax(-1)
    finally:
        cond.set(visual)
    return logits[:, 0, class_ids], logits[:, 1, data.eos_id]


def _evaluate(loaded: "LoadedModel", data: _Encoded, class_ids: "torch.Tensor", cond: Conditions,
             afters: Sequence[int] = (), swaps: Sequence[int] = (), zeros: Sequence[int] = ()) -> dict[str, float]:
    """Held-out measurements of the planted properties.

    Keys: ``clean`` (accuracy), ``knockout_after_L`` (accuracy with no attention to visual
    tokens in layers > L, for L in ``afters``), ``swap_follow_l`` (share of answers that follow
    the donor image when the visual states at the output of layer l are swapped with the next
    row's, for l in ``swaps``), ``zero_delta_l`` (mean drop of the gold log-prob when they are
    zeroed there, for l in ``zeros``). Accuracy is the argmax over the answer words.
    """
    import torch

    n = len(data.label)
    idx = torch.arange(n, device=data.label.device)
    donor = torch.roll(idx, 1)

    def run(**state: Any) -> "torch.Tensor":
        full = {k: torch.full((n,), v, device=idx.device) for k, v in state.items()}
        return _answer_logprobs(loaded, data, idx, class_ids, cond, donor=donor, **full)[0]

    out: dict[str, float] = {}
    with torch.no_grad():
        clean = run()
        out["clean"] = (clean.argmax(-1) == data.label).float().mean().item()
        for after in afters:
            out[f"knockout_after_{after}"] = (run(after=after).argmax(-1) == data.label).float().mean().item()
        for layer in swaps:
            lp = run(patch_layer=layer, patch_kind=PATCHES.index("swap"))
            out[f"swap_follow_{layer}"] = (lp.argmax(-1) == data.label[donor]).float().mean().item()
        gold_clean = clean[idx, data.label]
        for layer in zeros:
            lp = run(patch_layer=layer, patch_kind=PATCHES.index("zero"))
            out[f"zero_delta_{layer}"] = (gold_clean - lp[idx, data.label]).mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def _draw_conditions(recipe: Recipe, n: int, gen: "torch.Generator") -> dict[str, "torch.Tensor"]:
    """Sample one condition per row (see the module docstring)."""
    import torch

    k, nl = recipe.cliff, recipe.n_layers
    probs = torch.tensor([recipe.schedule[c] for c in CONDITIONS])
    kind = torch.multinomial(probs, n, replacement=True, generator=gen)
    keep, blind, late, early = (kind == CONDITIONS.index(c) for c in CONDITIONS[1:])

    def draw(low: int, high: int, rows: "torch.Tensor") -> "torch.Tensor":
        return torch.randint(low, high, (int(rows.sum()),), generator=gen)

    after = torch.full((n,), nl)
    after[keep] = draw(k, nl, keep)
    after[blind] = draw(-1, k, blind)
    patch_layer = torch.full((n,), -1)
    patch_layer[late] = draw(k, nl, late)
    patch_layer[early] = draw(0, k, early)
    patch_kind = torch.zeros(n, dtype=torch.long)  # swap
    patch_kind[late] = draw(0, len(PATCHES), late)
    donor = torch.roll(torch.arange(n), 1)
    return {"kind": kind, "after": after, "patch_layer": patch_layer, "patch_kind": patch_kind,
            "donor": donor}


def _planted(metrics: dict[str, float], recipe: Recipe, chance: float) -> bool:
    """Whether every measured property of the planted cliff holds (keys absent are skipped)."""
    k, target = recipe.cliff, recipe.target_accuracy
    checks = [metrics["clean"] >= target]
    for key, value in metrics.items():
        kind, _, layer = key.rpartition("_")
        if kind == "knockout_after":
            checks.append(value >= target if int(layer) >= k else value <= chance + 0.1)
        elif kind == "swap_follow" and int(layer) < k:
            checks.append(value >= target)
        elif kind == "zero_delta" and int(layer) >= k:
            checks.append(abs(value) <= ZERO_DELTA_MAX)
    return all(checks)


@dataclass
class _Setup:
    """A freshly built organism with its encoded training and held-out sets."""

    loaded: "LoadedModel"
    train: _Encoded
    heldout: _Encoded
    classes: list[str]
    class_ids: "torch.Tensor"

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)


def _prepare(recipe: Recipe, device: str) -> _Setup:
    """Build the random-weight tiny LLaVA and encode the data through the capture path."""
    from capture.family import load_model
    from capture.synthetic import SYNTHETIC_VOCAB, generate
    from capture.tiny import build_tiny
    from schemas.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny("llava", tmp, n_layers=recipe.n_layers, hidden_size=recipe.hidden_size,
                   vocab_words=SYNTHETIC_VOCAB, image_size=recipe.image_size, seed=recipe.seed)
        loaded = load_model(ModelConfig(path=tmp, dtype="float32", device_map=None, attn_implementation="eager"))
    loaded.model.to(device)
    rows = {split: generate(n, seed=recipe.seed, kinds=recipe.kinds, image_size=recipe.image_size, split=split)
            for split, n in (("train", recipe.pool), ("organism-eval", recipe.eval_n))}
    classes = sorted({r["answer"] for r in rows["train"]})
    log.info("encoding %d training and %d held-out samples", recipe.pool, recipe.eval_n)
    return _Setup(loaded, _encode(loaded, rows["train"], classes).to(device),
                  _encode(loaded, rows["organism-eval"], classes).to(device), classes,
                  _class_token_ids(loaded, classes).to(device))


def _step_loss(setup: _Setup, cond: Conditions, recipe: Recipe, gen: "torch.Generator") -> "torch.Tensor":
    """The loss of one batch, each row under its own drawn condition."""
    import torch

    device = setup.train.label.device
    idx = torch.randint(len(setup.train.label), (recipe.batch_size,), generator=gen).to(device)
    state = {name: v.to(device) for name, v in _draw_conditions(recipe, recipe.batch_size, gen).items()}
    kind = state.pop("kind")
    lp, eos = _answer_logprobs(setup.loaded, setup.train, idx, setup.class_ids, cond, **state)
    label = setup.train.label[idx]
    # An early swap must make the answer follow the donor image.
    label = torch.where(kind == CONDITIONS.index("early_swap"), label[state["donor"]], label)
    gold = -lp[torch.arange(len(idx), device=device), label]
    uniform = -lp.mean(-1)  # cross-entropy to the uniform distribution over the answer words
    return (torch.where(kind == CONDITIONS.index("blind"), uniform, gold) - eos).mean()


def _fit(setup: _Setup, recipe: Recipe, cond: Conditions, *, progress: bool,
         deadline: float | None) -> tuple[int, str, list[dict[str, Any]]]:
    """Train until every planted property holds on the held-out set (or a cap); returns
    ``(steps, stopped_by, history)``."""
    import torch
    from tqdm import tqdm

    model, k = setup.loaded.model, recipe.cliff
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # A cheap check every eval_every steps; the full one only once the cheap one passes.
    watch = {"afters": [k - 1, k]}
    full = {"afters": list(range(-1, recipe.n_layers - 1)), "swaps": [0, k - 1], "zeros": [k, recipe.n_layers - 2]}
    history: list[dict[str, Any]] = []
    with tqdm(total=recipe.max_steps, disable=not progress, desc=f"organism cliff {k}") as bar:
        for step in range(1, recipe.max_steps + 1):
            model.train()
            loss = _step_loss(setup, cond, recipe, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % recipe.eval_every and step != recipe.max_steps:
                continue
            model.eval()
            metrics = _evaluate(setup.loaded, setup.heldout, setup.class_ids, cond, **watch)
            ready = step >= recipe.min_steps and _planted(metrics, recipe, setup.chance)
            if ready:
                metrics = _evaluate(setup.loaded, setup.heldout, setup.class_ids, cond, **full)
                ready = _planted(metrics, recipe, setup.chance)
            history.append({"step": step, "loss": round(loss.item(), 4), **metrics})
            bar.set_postfix(clean=metrics["clean"], at_k=metrics[f"knockout_after_{k}"],
                            below=metrics[f"knockout_after_{k - 1}"])
            log.info("step %d %s", step, history[-1])
            if ready:
                return step, "planted", history
            if deadline is not None and time.time() > deadline:
                return step, "time_limit", history
    return recipe.max_steps, "max_steps", history


def train(recipe: Recipe, out_dir: str | Path, *, progress: bool = True, device: str = "cpu",
          time_limit: float | None = None) -> dict[str, Any]:
    """Train an organism and save it (weights, processor, ``organism.json``) to ``out_dir``.

    Parameters
    ----------
    recipe
        Cliff, seed, sizes, optimiser and schedule.
    out_dir
        Directory to write; replaced if it exists.
    progress
        Show a progress bar.
    device
        Torch device to train on. Only ``cpu`` (one thread) is bit-reproducible across runs;
        the shipped organisms were trained on it.
    time_limit
        Seconds after which training stops at the next evaluation (``stopped_by`` says so in
        ``organism.json``); such a result depends on the machine's speed.

    Returns
    -------
    dict
        The ``organism.json`` content: ``planted_cliff``, ``seed``, ``steps``, ``converged``,
        training and held-out measurements, the recipe (schedule included), how it was made.

    Examples
    --------
    >>> meta = train(Recipe(cliff=2, max_steps=2), tempfile.mkdtemp(), progress=False)  # doctest: +SKIP
    >>> meta["planted_cliff"], meta["steps"]  # doctest: +SKIP
    (2, 2)
    """
    import torch
    import transformers

    recipe.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a fixed reduction order, hence reproducible weights
    torch.use_deterministic_algorithms(True)
    started = time.time()
    try:
        torch.manual_seed(recipe.seed)
        setup = _prepare(recipe, device)
        cond = Conditions(setup.loaded.layers())
        with cond.installed():
            steps, stopped_by, history = _fit(setup, recipe, cond, progress=progress,
                                              deadline=None if time_limit is None else started + time_limit)
            layers = list(range(recipe.n_layers))
            heldout = _evaluate(setup.loaded, setup.heldout, setup.class_ids, cond, afters=[-1, *layers[:-1]],
                               swaps=layers, zeros=layers)
            train_acc = _evaluate(setup.loaded, _subset(setup.train, recipe.eval_n), setup.class_ids, cond)["clean"]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    meta = {
        "planted_cliff": recipe.cliff,
        "seed": recipe.seed,
        "steps": steps,
        "stopped_by": stopped_by,
        "converged": _planted(heldout, recipe, setup.chance),
        "train_accuracy": train_acc,
        "heldout_metrics": heldout,
        "chance": setup.chance,
        "classes": setup.classes,
        "family": "llava",
        "intervention_at_inference": None,  # the cliff is in the weights
        "how": HOW.format(kinds="/".join(recipe.kinds)),
        "recipe": asdict(recipe),
        "history": history,
        "train_seconds": round(time.time() - started, 1),
        "device": str(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    setup.loaded.model.save_pretrained(out)
    setup.loaded.processor.save_pretrained(out)
    (out / "organism.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _subset(data: _Encoded, n: int) -> _Encoded:
    import torch

    idx = torch.arange(min(n, len(data.label)), device=data.label.device)
    inputs, visual, label = data.rows(idx)
    return _Encoded(inputs, visual, label, data.eos_id)


def read_organism(path: str | Path) -> dict[str, Any]:
    """The ``organism.json`` of an organism directory.

    >>> read_organism(organism_path(2))["planted_cliff"]
    2
    """
    file = Path(path) / "organism.json"
    try:
        return json.loads(file.read_text())
    except OSError as exc:
        raise GapError(f"{file}: cannot read the organism description ({exc.strerror})") from None


def main(argv: list[str]) -> int:
    """``gap organism train --cliff K [--seed S] [--out DIR] [--steps N]``."""
    parser = argparse.ArgumentParser(
        prog="gap organism",
        description="Train the model organism: a tiny LLaVA whose modality cliff is planted at a "
                    "known layer K (visual evidence must reach text positions by layer K and "
                    "cannot be read earlier). Deterministic by seed; a few minutes on a CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train", help="train and save an organism (weights, processor, organism.json)",
        description="Train a tiny LLaVA on synthetic colour questions with its cliff planted at "
                    "layer K and save it as a plain checkpoint with organism.json.",
        epilog="example: gap organism train --cliff 3 --seed 1 --out /tmp/cliff3")
    tr.add_argument("--cliff", type=int, required=True, help="planted cliff layer K (1..n_layers-2)")
    tr.add_argument("--seed", type=int, default=0, help="seed of weights, data and schedule (default 0)")
    tr.add_argument("--out", default=None,
                    help="output directory (default: the shipped capture/organisms/cliff<K>)")
    tr.add_argument("--steps", type=int, default=None,
                    help="step cap (default 8000); training stops earlier once the cliff is planted")
    tr.add_argument("--layers", type=int, default=6, help="decoder layers of the organism (default 6)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = Recipe(cliff=args.cliff, seed=args.seed, n_layers=args.layers)
    if args.steps is not None:
        recipe.max_steps = args.steps
        recipe.min_steps = min(recipe.min_steps, args.steps)
    out = Path(args.out) if args.out else organism_path(args.cliff)
    meta = train(recipe, out)
    if not meta["converged"]:
        log.warning("the planted properties do not all hold after %d steps (see heldout_metrics in "
                    "%s); try another --seed or more --steps", meta["steps"], out / "organism.json")
    print(f"organism with planted cliff {meta['planted_cliff']} after {meta['steps']} steps "
          f"(clean accuracy {meta['heldout_metrics']['clean']:.2f}, converged {meta['converged']}): {out}")
    return 0
