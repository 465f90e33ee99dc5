"""Write notebooks/04_threshold_explorer.ipynb (no outputs): `python notebooks/_make_04.py`."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS: list[tuple[str, str]] = [
    ("md", r"""# 04 · The threshold explorer: which wrong tokens does NTHR spare?

*Move β and η and watch, token by token, which parts of the wrong answers NTHR stops pushing down,
what that does to their advantages, and how one update then moves the correct answers' likelihood.*

**What you will learn**
- how the token score $s_t$ ranks the tokens of an incorrect response by how much penalising them
  also pushes down the correct responses of the same group;
- how the threshold $\tau = \beta \cdot \min_i \bar s^+_i$ turns scores into a selection, from
  β = -∞ (every incorrect token) through β = 0 (every positive score) to large β (almost none);
- what the η schedules (2|0.5 − p|, p, 1 − p, 0) do to the selected tokens' advantages;
- how far the cheap "generated vocabulary" scores are from the exact full-vocabulary ones;
- how Δ(x) after one NTHR step compares with GRPO's on the same question.

**Before this**: notebook 02 (Δ(x), lazy likelihood displacement; it saves the groups used here)
and notebook 03 (token scores and NTHR in `nthr_book.nthr`). Library modules used here:
`nthr_book.widgets` (this notebook's), `nthr_book.nthr`, `nthr_book.lld`, `nthr_book.viz`."""),
    ("code", r"""from nthr_book import env

env.report();"""),
    ("md", r"""## Parameters

`NTHR_BOOK_FAST=1` (the default without a GPU) uses the embedded SmolLM2-135M and a handful of
questions; `NTHR_BOOK_FAST=0` uses Qwen2.5-0.5B-Instruct on MATH-500 questions (GPU)."""),
    ("code", r"""import math

from nthr_book import config

FAST = config.fast_mode()
print("mode:", config.mode_name())

SEED = 0
MODEL = "smollm2-135m" if FAST else "Qwen/Qwen2.5-0.5B-Instruct"
# Notebook 02 saves the groups it measured here; this notebook reuses them when they exist.
GROUPS_PATH = config.runs_dir() / "lld" / f"groups-{'fast' if FAST else 'full'}-seed{SEED}.pt"
# Without notebook 02's file we sample our own groups, saved under a name of their own.
OWN_GROUPS_PATH = config.runs_dir() / "lld" / f"groups-04-{'fast' if FAST else 'full'}-seed{SEED}.pt"
N_QUESTIONS = 12 if FAST else 64  # questions sampled when no groups file exists
N_EXPLORE = 4 if FAST else 40  # mixed groups shown (scores are computed once per group)
SAMPLING = dict(  # used only when sampling our own groups
    group_size=8,
    max_new_tokens=40 if FAST else 1024,
    temperature=1.0,
    template="arithmetic" if FAST else "boxed",
    require_boxed=not FAST,
    seed=SEED,
)
LR = 5e-5 if FAST else 1e-5  # step size of the Δ(x) button: one SGD step, as in notebook 02
BETAS = [-math.inf, 0.0, 0.1, 1.0, 2.0]  # the sweep of section 5
ETAS = ["two_abs", "p", "one_minus_p"]
VOCABS = ["generated", "full"]
OUT_DIR = config.build_dir() / "04_threshold_explorer"
print(f"model {MODEL}; groups {GROUPS_PATH}; up to {N_EXPLORE} mixed groups; results in {OUT_DIR}")"""),
    ("md", r"""## 1. The groups

A group is one question with its G sampled responses and their 0/1 rewards (`nthr_book.lld.Group`).
NTHR only acts on *mixed* groups (0 < N+ < G): it needs correct responses to score against and
incorrect ones to select from. We load notebook 02's groups, or sample a few if it has not run."""),
    ("code", r"""import time

import pandas as pd
import torch

from nthr_book import data, lld, models

env.set_seed(SEED)
model, tokenizer = models.load_policy(MODEL)


def load_or_sample_groups():
    # notebook 02's groups first, then ours; sample (and save) only when neither holds a mixed group
    for path in (GROUPS_PATH, OWN_GROUPS_PATH):
        if path.exists():
            groups, settings = lld.load_groups(path, return_settings=True)
            if any(g.status == "mixed" for g in groups):
                return groups, settings, f"loaded from {path}"
    if FAST:
        problems = data.arithmetic_problems(N_QUESTIONS, seed=SEED)
    else:
        problems = [dict(row) for row in data.load_benchmark("math500").select(range(N_QUESTIONS))]
    t0 = time.time()
    groups = lld.sample_groups(model, tokenizer, problems, **SAMPLING)
    settings = SAMPLING | {"model": MODEL, "problem_ids": [p["id"] for p in problems]}
    lld.save_groups(OWN_GROUPS_PATH, groups, settings=settings)
    return groups, settings, f"sampled in {time.time() - t0:.0f} s, saved to {OWN_GROUPS_PATH}"


groups, settings, source = load_or_sample_groups()
TEMPERATURE = float(settings.get("temperature", 1.0))  # scores use the sampling temperature
mixed = [g for g in groups if g.status == "mixed"][:N_EXPLORE]
print(f"{len(groups)} groups {source}; {len(mixed)} mixed ones shown; temperature {TEMPERATURE}")
pd.DataFrame([{"id": g.question_id, "problem": g.problem.strip()[:60], "answer": g.answer,
               "N+": g.n_correct, "G": g.group_size,
               "tokens per response": round(float(g.rollouts.completion_mask.sum(1).float().mean()), 1)}
              for g in mixed])"""),
    ("code", r"""assert mixed, "no mixed group: NTHR needs correct and incorrect responses in one group"
assert all(0 < g.n_correct < g.group_size for g in mixed)"""),
    ("md", r"""## 2. Token scores, once per group

For every response token $t$ of a group, with $g_t = e_{y_t} - q_t$ the prediction error and $h_t$
the last hidden state,

$$s_t = \sum_{k \in \text{correct tokens}} \langle g_t, g_k\rangle \langle h_t, h_k\rangle .$$

A large $s_t$ on an incorrect token means that pushing that token down also pushes the correct
responses down. `widgets.compute_group_scores` runs one forward pass per group
(`grpo.per_token_logps(return_hidden=True)`) and computes the scores with
`nthr.token_scores_from_hidden` in both vocabulary modes: *generated* restricts $g$ to the token
ids that occur in the group (the paper's speed-up), *full* is exact. The explorer below only
reads these cached numbers: moving a control never runs the model."""),
    ("code", r"""from nthr_book import nthr, widgets

t0 = time.time()
scores = [widgets.compute_group_scores(model, g, vocab=VOCABS, temperature=TEMPERATURE, tokenizer=tokenizer)
          for g in mixed]
print(f"scores of {len(scores)} groups in both vocabulary modes: {time.time() - t0:.1f} s")

# how far the generated-vocabulary scores are from the exact ones
approx = []
for gs in scores:
    m = gs.completion_mask
    a, b = gs.scores("generated")[m].double(), gs.scores("full")[m].double()
    approx.append({"id": gs.question_id, "tokens": int(m.sum()), "relative error": float((a - b).norm() / b.norm()),
                   "correlation": float(torch.corrcoef(torch.stack([a, b]))[0, 1])})

# Open on the group where β = 1 spares the most tokens, so the first view shows NTHR at work
# (on many groups β = 1 spares nothing: the correct answers' own scores set a high bar).
n_spared = [widgets.explorer_state(gs, beta=1.0, eta="two_abs").n_selected_group for gs in scores]
order = sorted(range(len(mixed)), key=lambda i: -n_spared[i])
mixed, scores, approx = [mixed[i] for i in order], [scores[i] for i in order], [approx[i] for i in order]
print("incorrect tokens selected at β = 1, per group:",
      {g.question_id: n_spared[i] for g, i in zip(mixed, order)})
pd.DataFrame(approx).round(4)"""),
    ("code", r"""# The explorer's numbers are the library's: τ and the selection come from nthr.threshold / select_tokens.
gs = scores[0]
s, m, c = gs.scores("generated"), gs.completion_mask, gs.correct
for beta in BETAS:
    st = widgets.explorer_state(gs, beta=beta, eta="two_abs")
    assert st.tau == nthr.threshold(s, m, c, beta)
    assert torch.equal(st.selected, nthr.select_tokens(s, m, c, beta))
    sbar = torch.stack([s[i][m[i]].mean() for i in c.nonzero().flatten()])  # s̄+ by hand
    if beta > -math.inf:
        torch.testing.assert_close(torch.tensor(st.tau), beta * sbar.min())
print("τ and selection agree with nthr.threshold / nthr.select_tokens for β in", BETAS)"""),
    ("md", r"""## 3. The explorer

Pick a question and one of its incorrect responses. Tokens are coloured by score (red: high,
harmful to the correct answers; blue: low), centred at τ; outlined tokens are selected
($s_t > \tau$), and their advantage becomes $\eta \cdot A$. The correct responses are on the
right with their self-influence $\bar s^+_i$ (τ is β times the smallest). Below: the number and
fraction of selected tokens per response and for the group, the score histogram with τ, and the
resulting per-token advantages. The button runs one update from the initial weights with the
current selection and η (`lld.one_step_displacement`, weights restored afterwards) and shows Δ(x)
next to GRPO's."""),
    ("code", r"""explorer = widgets.threshold_explorer(mixed, scores=scores, model=model, tokenizer=tokenizer, lr=LR,
                                     temperature=TEMPERATURE, beta=1.0, eta="two_abs")
display(explorer)"""),
    ("code", r"""st = explorer.state()
gs = explorer.current_scores()
assert st.n_selected_group == int(nthr.select_tokens(gs.scores(st.vocab), gs.completion_mask, gs.correct,
                                                     st.beta).sum())
print(f"question {st.question_id}: τ = {st.tau:.4g}, {st.n_selected_group} of {st.n_incorrect_tokens} "
      f"incorrect tokens selected ({100 * st.selected_frac:.1f}%), η = {st.eta:.3g}")"""),
    ("md", r"""## 4. The same picture, static

A widget needs a running kernel. `widgets.explorer_snapshot` renders the same view at fixed
settings as plain HTML, so this executed notebook still shows it without one (β = 1, η = 2|0.5 − p|)."""),
    ("code", r"""widgets.explorer_snapshot(mixed, beta=1.0, eta="two_abs", scores=scores)"""),
    ("md", r"""And what the button computes, for the first question at those settings: Δ(x) after one SGD
step with NTHR's advantages next to GRPO's (same initial weights; Δ(x) ≤ 0 is lazy likelihood
displacement)."""),
    ("code", r"""state = widgets.explorer_state(scores[0], beta=1.0, eta="two_abs")
res_nthr, res_grpo = widgets.displacement_comparison(model, mixed[0], state, lr=LR, temperature=TEMPERATURE)
pd.DataFrame([{"update": "NTHR (β = 1, η = 2|0.5-p|)", "Δ(x)": res_nthr.delta, "selected": res_nthr.n_selected_tokens},
              {"update": "GRPO", "Δ(x)": res_grpo.delta, "selected": None}])"""),
    ("code", r"""assert res_nthr.n_selected_tokens == state.n_selected_group
assert math.isfinite(res_nthr.delta) and math.isfinite(res_grpo.delta)"""),
    ("md", r"""## 5. A sweep over β and η

The same quantities for every shown group, without the widget: the fraction of incorrect tokens
selected (η does not change it) and the mean advantage left on incorrect tokens (GRPO's is the
η = 1 limit). Saved as CSV with the settings, then plotted from the file."""),
    ("code", r"""rows = []
for gs in scores:
    for vocab in VOCABS:
        for beta in BETAS:
            for eta in ETAS:
                rows.append(widgets.explorer_state(gs, beta=beta, eta=eta, vocab=vocab).summary())
sweep = pd.DataFrame(rows).assign(seed=SEED, model=MODEL, mode="fast" if FAST else "full",
                                  temperature=TEMPERATURE)
OUT_DIR.mkdir(parents=True, exist_ok=True)
sweep.to_csv(OUT_DIR / "threshold_sweep.csv", index=False)
from nthr_book.io import write_json

write_json(OUT_DIR / "threshold_sweep.json", {"source": source, "groups_settings": settings, "betas": BETAS,
                                              "etas": ETAS, "vocabs": VOCABS, "versions": env.versions()})
print(f"{len(sweep)} rows -> {OUT_DIR / 'threshold_sweep.csv'}")"""),
    ("code", r"""table = pd.read_csv(OUT_DIR / "threshold_sweep.csv")  # beta = -inf is read back as -inf
# pooled over questions, token-weighted: selected / incorrect tokens and mean advantage per incorrect token
n = table["n_incorrect_tokens"]
sums = (table.assign(adv=table["mean_adv_incorrect"] * n, adv_grpo=table["mean_adv_incorrect_grpo"] * n)
        .groupby(["vocab", "eta_schedule", "beta"], sort=False)[["n_selected", "n_incorrect_tokens", "adv", "adv_grpo"]]
        .sum())
summary = pd.DataFrame({"selected_frac": sums["n_selected"] / sums["n_incorrect_tokens"],
                        "mean_adv_incorrect": sums["adv"] / sums["n_incorrect_tokens"],
                        "mean_adv_incorrect_grpo": sums["adv_grpo"] / sums["n_incorrect_tokens"]})
summary.round(3)"""),
    ("code", r"""# β = -∞ selects every incorrect token; a larger β never selects more when every s̄+ is positive.
assert (table.loc[table["beta"] == -math.inf, "selected_frac"] == 1.0).all()
for (qid, vocab, eta), part in table.groupby(["id", "vocab", "eta_schedule"]):
    part = part[part["beta"] >= 0].sort_values("beta")
    if (part["tau"] >= 0).all():  # min s̄+ > 0: τ grows with β
        assert part["n_selected"].is_monotonic_decreasing, (qid, vocab, eta)
# unselected tokens keep A, selected ones get η·A: the mean never leaves [A, η·A]
assert (table["mean_adv_incorrect"] >= table["mean_adv_incorrect_grpo"] - 1e-6).all()"""),
    ("code", r"""import matplotlib.pyplot as plt

labels = ["-∞" if b == -math.inf else f"{b:g}" for b in BETAS]
ETA_LABELS = {value: label for label, value in widgets.ETA_CHOICES}
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
sel = summary.reset_index()
for vocab in VOCABS:
    part = sel[(sel["vocab"] == vocab) & (sel["eta_schedule"] == ETAS[0])].set_index("beta").reindex(BETAS)
    ax0.plot(labels, part["selected_frac"], marker="o", label=f"{vocab} vocabulary")
ax0.set_xlabel("β")
ax0.set_ylabel("selected / incorrect tokens")
ax0.set_ylim(-0.03, 1.03)
ax0.legend()
for eta in ETAS:
    part = sel[(sel["vocab"] == "generated") & (sel["eta_schedule"] == eta)].set_index("beta").reindex(BETAS)
    ax1.plot(labels, part["mean_adv_incorrect"], marker="o", label=f"η = {ETA_LABELS[eta]}")
ax1.axhline(float(sel["mean_adv_incorrect_grpo"].iloc[0]), color="black", linestyle="--", label="GRPO (η = 1)")
ax1.set_xlabel("β")
ax1.set_ylabel("mean advantage of incorrect tokens")
ax1.legend(fontsize=8)
fig.suptitle(f"{len(scores)} mixed groups, {MODEL}", fontsize=10)
fig.tight_layout()
plt.close(fig)
display(fig)"""),
    ("md", r"""## Summary

- Token scores are computed once per group (one forward pass); τ, the selection, η and the
  advantages are cheap functions of them, which is why the explorer can react instantly.
- β = -∞ selects every incorrect token (NTHR then only rescales the whole negative gradient by η);
  β = 0 selects the tokens with positive score; the paper's β = 1 keeps only the tokens whose
  score reaches the weakest correct response's self-influence.
- η sets how much of the negative gradient the selected tokens keep: 2|0.5 − p| (training),
  p, 1 − p, or 0 (the LLD diagnostic).
- The generated-vocabulary scores track the exact ones closely (see the table in section 2).
- Library: `widgets.compute_group_scores`, `widgets.explorer_state`, `widgets.threshold_explorer`,
  `widgets.explorer_snapshot`, `widgets.displacement_comparison`; results in
  `build/04_threshold_explorer/threshold_sweep.csv`.

## Exercises

1. Find a question where β = 1 selects nothing. What do its correct responses' self-influences
   look like compared with the incorrect tokens' scores?
2. With η = 0, press the button for β = -∞, 0 and 1. Which setting gives the largest Δ(x)? Is
   "pushing down nothing" (β = -∞, η = 0, the Pos Only rule) always best for Δ(x)?
3. Switch to the full vocabulary. Which tokens change their selection? Relate it to the relative
   error table.
4. Exclude the self pairs from s̄+ (`nthr.threshold(..., self_pairs=...)` with
   `nthr.token_scores(..., return_self_pairs=True)`) and compare τ for one group."""),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"nb04-{i:02d}"
    return nb


if __name__ == "__main__":
    path = Path(__file__).resolve().parent / "04_threshold_explorer.ipynb"
    nbformat.write(build(), path)
    print(f"wrote {path}")
