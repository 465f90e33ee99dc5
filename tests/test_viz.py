"""Tests for nthr_book.viz: plots checked by the data they draw, HTML by its spans (arXiv
2505.18830)."""

from __future__ import annotations

import html
import json
import re

import matplotlib

matplotlib.use("Agg")  # before pyplot: no window, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from nthr_book import viz  # noqa: E402

torch.set_num_threads(1)

EPS64, EPS32 = np.finfo(np.float64).eps, np.finfo(np.float32).eps
# data-score attributes are written with 6 significant digits: half a unit in the 6th digit,
# relatively
SCORE_RTOL = 0.5e-5


@pytest.fixture(autouse=True)
def _no_show_and_close(monkeypatch):
    """Every test: plt.show raises (no plot function may call it); figures are closed afterwards."""

    def boom(*args, **kwargs):
        raise AssertionError("plt.show() was called")

    monkeypatch.setattr(plt, "show", boom)
    yield
    plt.close("all")


def _heights(container) -> np.ndarray:
    return np.array([p.get_height() for p in container.patches], dtype=float)


# ------------------------------------------------------------------ Figure 1: displacement


def _displacement_df() -> pd.DataFrame:
    deltas = {  # id -> (grpo, pos_only, nthr)
        "q0": (0.30, 0.35, 0.40),
        "q1": (-0.20, 0.10, 0.05),
        "q2": (0.05, 0.50, 0.20),
        "q3": (0.00, 0.02, 0.01),
    }
    rows = [
        {"id": q, "method": m, "delta": d[j]}
        for q, d in deltas.items()
        for j, m in enumerate(("grpo", "pos_only", "nthr"))
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter


def test_plot_displacement_bars_sorted_by_grpo():
    df = _displacement_df()
    ax = viz.plot_displacement(df, methods=("grpo", "pos_only", "nthr"))
    order = ["q1", "q3", "q2", "q0"]  # ascending GRPO Δ
    assert len(ax.containers) == 3
    for container, m in zip(ax.containers, ("grpo", "pos_only", "nthr")):
        expected = [df[(df.id == q) & (df.method == m)].delta.item() for q in order]
        np.testing.assert_array_equal(_heights(container), expected)  # the data, not a computation
    assert [t.get_text() for t in ax.get_xticklabels()] == order
    # bars of the same question sit side by side, methods left to right
    xs = np.array([[p.get_x() for p in c.patches] for c in ax.containers])
    assert (np.diff(xs, axis=0) > 0).all()
    assert ax.get_ylabel() == "Δ ln π(y+|x)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "GRPO",
        "Pos Only",
        "GRPO + NTHR",
    ]
    assert any(np.array_equal(line.get_ydata(), [0.0, 0.0]) for line in ax.lines)  # the zero line


def test_plot_displacement_sort_by_other_method_and_missing_bar():
    df = _displacement_df()
    df = df[~((df.id == "q2") & (df.method == "grpo"))]  # GRPO lacks q2
    ax = viz.plot_displacement(df, sort_by="pos_only")
    order = ["q3", "q1", "q0", "q2"]  # ascending Pos Only Δ
    assert [t.get_text() for t in ax.get_xticklabels()] == order
    np.testing.assert_array_equal(_heights(ax.containers[0]), [0.0, -0.2, 0.3, np.nan])
    np.testing.assert_array_equal(_heights(ax.containers[1]), [0.02, 0.10, 0.35, 0.50])


def test_plot_displacement_errors_name_the_problem():
    df = _displacement_df()
    with pytest.raises(ValueError, match=r"\['random'\]"):
        viz.plot_displacement(df, methods=("grpo", "random"))
    with pytest.raises(ValueError, match="delta"):
        viz.plot_displacement(df.drop(columns="delta"))
    with pytest.raises(ValueError, match="several rows"):
        viz.plot_displacement(pd.concat([df, df.iloc[:1]]))


def test_plot_displacement_draws_into_given_axes_and_saves(tmp_path):
    fig, ax = plt.subplots()
    before = plt.get_fignums()
    out = viz.plot_displacement(
        _displacement_df(), ax=ax, title="t", save=tmp_path / "sub" / "fig1.png"
    )
    assert out is ax and plt.get_fignums() == before
    assert (tmp_path / "sub" / "fig1.png").stat().st_size > 0
    assert ax.get_title() == "t"


# ------------------------------------------------------------------ HTML token views

_SPAN = re.compile(
    r'<span class="(nthr-token(?: nthr-selected)?)" data-score="([^"]*)" title="([^"]*)"'
)


def test_render_token_scores_html_counts_scores_and_escaping():
    tokens = ["<script>", "alert(1)", "</script>", " x", "\n", " &"]
    scores = torch.tensor([0.5, -1.25, 3.0, 0.0, 2.0, -0.125])
    selected = torch.tensor([True, False, True, False, True, False])
    out = viz.render_token_scores_html(tokens, scores, selected, tau=0.25, title="<b>resp</b>")
    spans = _SPAN.findall(out)
    assert len(spans) == len(tokens)
    assert sum(cls.endswith("nthr-selected") for cls, _, _ in spans) == int(selected.sum())
    assert out.count("nthr-selected") == int(selected.sum())
    assert [cls.endswith("nthr-selected") for cls, _, _ in spans] == selected.tolist()
    drawn = [float(s) for _, s, _ in spans]
    np.testing.assert_allclose(drawn, scores.numpy(), rtol=SCORE_RTOL, atol=0.0)
    assert "<script>" not in out and "</script>" not in out and "<b>resp</b>" not in out
    assert "&lt;script&gt;" in out and "&lt;b&gt;resp&lt;/b&gt;" in out
    assert "↵" in out and "&amp;" in out
    assert "score 3 (selected)" in html.unescape(spans[2][2])


def test_render_token_scores_html_colours_diverge_around_tau():
    tokens = ["a", "b", "c"]
    out = viz.render_token_scores_html(tokens, [10.0, 0.0, -10.0], tau=0.0)
    colours = re.findall(r'class="nthr-token"[^>]*style="background:(#[0-9a-f]{6})', out)
    assert len(colours) == 3
    rgb = [matplotlib.colors.to_rgb(c) for c in colours]
    assert rgb[0][0] > rgb[0][2]  # high score: red
    assert rgb[2][2] > rgb[2][0]  # low score: blue
    assert min(rgb[1]) > 0.9  # at the centre: near white
    # centred at tau: a score equal to tau is white even when it is far from 0
    out = viz.render_token_scores_html(tokens, [12.0, 2.0, -8.0], tau=2.0)
    mid = re.findall(r'class="nthr-token"[^>]*style="background:(#[0-9a-f]{6})', out)[1]
    assert min(matplotlib.colors.to_rgb(mid)) > 0.9


def test_render_token_scores_html_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="scores"):
        viz.render_token_scores_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="selected"):
        viz.render_token_scores_html(["a", "b"], [1.0, 2.0], [True])
    with pytest.raises(TypeError, match="tokens"):
        viz.render_token_scores_html("ab", [1.0, 2.0])


def test_render_token_scores_html_whitespace_is_visible():
    out = viz.render_token_scores_html(["Hi", "  ", "", "\t"], [0.0, 1.0, 2.0, 3.0])
    text = [html.unescape(m) for m in re.findall(r'class="nthr-token"[^>]*>([^<]*)</span>', out)]
    assert text == ["Hi", "··", "∅", "⇥"]


def test_render_group_html_header_and_counts():
    tok_neg = [["The", " answer", " is", " 5"], ["<x>", " 7"]]
    sc_neg = [torch.tensor([0.1, 0.9, 0.8, -0.3]), [0.4, -1.0]]
    sel_neg = [torch.tensor([False, True, True, False]), [True, False]]
    tok_pos = [["The", " answer", " is", " 6"]]
    sc_pos = [[0.5, 0.6, 0.7, 0.2]]
    out = viz.render_group_html(tok_neg, sc_neg, tok_pos, sc_pos, sel_neg, tau=0.3)
    spans = _SPAN.findall(out)
    assert len(spans) == 10
    assert out.count("nthr-selected") == 3
    assert "τ = 0.3" in out and "2 incorrect, 1 correct responses" in out
    assert "3 of 6 incorrect tokens selected (50.0%)" in out
    assert "&lt;x&gt;" in out and "<x>" not in out
    # incorrect column first, then correct; one colour scale over the group
    expected = [0.1, 0.9, 0.8, -0.3, 0.4, -1.0, 0.5, 0.6, 0.7, 0.2]
    np.testing.assert_allclose([float(s) for _, s, _ in spans], expected, rtol=SCORE_RTOL, atol=0.0)
    assert out.index("Incorrect") < out.index("Correct")
    with pytest.raises(ValueError, match="selected_incorrect"):
        viz.render_group_html(tok_neg, sc_neg, tok_pos, sc_pos, sel_neg[:1], tau=0.3)
    with pytest.raises(ValueError, match=r"scores_correct\[0\]"):
        viz.render_group_html(tok_neg, sc_neg, tok_pos, [[0.5]], sel_neg)


class _ByteTokenizer:
    """Fake byte-level tokenizer: id i is byte i; decode joins the bytes (partial UTF-8 ->
    U+FFFD)."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_tokens_for_display_pieces_rebuild_the_text():
    text = "Hi é 😀\n<b>"
    ids = torch.tensor(list(text.encode("utf-8")))
    pieces = viz.tokens_for_display(_ByteTokenizer(), ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text
    assert pieces[:3] == ["H", "i", " "]
    assert pieces[-8:-4] == ["", "", "", "😀"]  # a 4-byte character shows on its last byte
    with pytest.raises(ValueError, match="1-D"):
        viz.tokens_for_display(_ByteTokenizer(), ids[None])


class _SentencePieceLike:
    """Fake SentencePiece tokenizer: decode drops the leading space of the text (so per-id decode
    loses it)."""

    vocab = {0: "\u2581Hello", 1: "\u2581world", 2: "!", 3: "<|im_end|>"}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join(self.vocab[i] for i in ids).replace("\u2581", " ").lstrip(" ")


def test_tokens_for_display_keeps_leading_spaces_and_special_tokens():
    pieces = viz.tokens_for_display(_SentencePieceLike(), [0, 1, 2, 3])
    assert pieces == ["Hello", " world", "!", "<|im_end|>"]
    assert _SentencePieceLike().decode([1]) == "world"  # what decoding one id alone would show


# ------------------------------------------------------------------ token influence


def test_token_influence_matrix_matches_loop():
    gen = torch.Generator().manual_seed(0)
    g_a, h_a = torch.randn(3, 7, generator=gen), torch.randn(3, 5, generator=gen)
    g_b, h_b = torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
    expected = torch.empty(3, 4, dtype=torch.float64)
    for t in range(3):
        for k in range(4):
            expected[t, k] = float(g_a[t].double() @ g_b[k].double()) * float(
                h_a[t].double() @ h_b[k].double()
            )
    out = viz.token_influence_matrix(g_a, h_a, g_b, h_b)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    # float32 rounding bound: a 7-term and a 5-term dot product and their product, (7 + 5 + 1)·eps
    # at the
    # scale of the absolute terms
    g_a64, h_a64, g_b64, h_b64 = (x.double() for x in (g_a, h_a, g_b, h_b))
    scale = (g_a64.abs() @ g_b64.abs().T) * (h_a64.abs() @ h_b64.abs().T)
    assert ((out.double() - expected).abs() <= (7 + 5 + 1) * EPS32 * scale).all()
    out64 = viz.token_influence_matrix(g_a64, h_a64, g_b64, h_b64)
    assert_close(out64, expected, rtol=0.0, atol=(7 + 5 + 1) * EPS64 * scale.max().item())
    assert viz.token_influence_matrix(g_a.double(), h_a, g_b, h_b).dtype == torch.float64
    with pytest.raises(ValueError, match="one row per token"):
        viz.token_influence_matrix(g_a, h_a[:2], g_b, h_b)
    with pytest.raises(ValueError, match="widths"):
        viz.token_influence_matrix(g_a, h_a, g_b[:, :6], h_b)


def test_plot_token_influence_heatmap_data_and_labels():
    gen = torch.Generator().manual_seed(1)
    g_n, h_n = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
    g_p, h_p = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
    tok_n = ["a", " b", "\n", "d", "e"]
    tok_p = ["w", "x", "y", "z"]
    ax = viz.plot_token_influence(g_n, h_n, g_p, h_p, tok_n, tok_p, max_tokens=3)
    drawn = np.asarray(ax.collections[0].get_array()).reshape(3, 3)
    matrix = viz.token_influence_matrix(g_n, h_n, g_p, h_p)
    np.testing.assert_array_equal(drawn, matrix[:3, :3].numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "·b", "↵"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w", "x", "y"]


def test_plot_token_influence_precomputed_matrix_and_given_axes():
    m = np.arange(12.0).reshape(3, 4) - 5
    fig, ax = plt.subplots()
    before = plt.get_fignums()
    out = viz.plot_token_influence(
        matrix=m, tokens_incorrect=["a", "b", "c"], tokens_correct=list("wxyz"), ax=ax
    )
    assert out is ax and plt.get_fignums() == before
    np.testing.assert_array_equal(np.asarray(ax.collections[0].get_array()).reshape(3, 4), m)
    with pytest.raises(ValueError, match="tokens_correct"):
        viz.plot_token_influence(matrix=m, tokens_correct=["w"], ax=ax)
    with pytest.raises(ValueError, match="matrix"):
        viz.plot_token_influence(torch.zeros(2, 2), torch.zeros(2, 2), ax=ax)


# ------------------------------------------------------------------ score histogram


def test_plot_score_histogram_counts_and_tau_line():
    scores = torch.tensor([[0.1, 0.5, 2.0, 9.0], [1.0, 1.5, -1.0, 0.0], [3.0, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    correct = torch.tensor([False, True, False])
    ax = viz.plot_score_histogram(scores, mask, correct, tau=0.4, bins=5)
    neg = np.array([0.1, 0.5, 2.0, 3.0, 0.2])  # masked 9.0 and 0.3, 0.4 are out
    pos = np.array([1.0, 1.5, -1.0, 0.0])
    edges = np.histogram_bin_edges(np.concatenate([neg, pos]), bins=5)
    assert len(ax.containers) == 2
    np.testing.assert_array_equal(_heights(ax.containers[0]), np.histogram(neg, edges)[0])
    np.testing.assert_array_equal(_heights(ax.containers[1]), np.histogram(pos, edges)[0])
    assert _heights(ax.containers[0]).sum() == 5 and _heights(ax.containers[1]).sum() == 4
    vlines = [line for line in ax.lines if np.array_equal(line.get_xdata(), [0.4, 0.4])]
    assert len(vlines) == 1
    assert "3 of 5 incorrect above" in vlines[0].get_label()


def test_plot_score_histogram_infinite_tau_draws_no_line():
    scores = torch.tensor([[0.1, 0.5], [1.0, 2.0]])
    ax = viz.plot_score_histogram(
        scores, torch.ones(2, 2), torch.tensor([0.0, 1.0]), tau=float("-inf")
    )
    assert len(ax.lines) == 0
    with pytest.raises(ValueError, match="correct"):
        viz.plot_score_histogram(scores, torch.ones(2, 2), torch.tensor([1.0]))


# ------------------------------------------------------------------ training curves


def _metrics_df() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method in ("grpo", "nthr"):
        for seed in (0, 1, 2):
            for step in range(5):
                rows.append(
                    {
                        "step": step,
                        "method": method,
                        "seed": seed,
                        "reward_mean": rng.random(),
                        "kl": rng.random() / 10,
                        "completion_length": float(rng.integers(10, 50)),
                    }
                )
    return pd.DataFrame(rows)


def test_plot_training_curves_panels_and_mean_over_seeds():
    df = _metrics_df()
    axes = viz.plot_training_curves(df)
    present = ["reward_mean", "kl", "completion_length"]
    assert len(axes) == 3 and [ax.get_title() for ax in axes] == present
    fig = axes[0].figure
    assert (
        "lld/rate" in fig._suptitle.get_text() and "nthr/selected_frac" in fig._suptitle.get_text()
    )
    for ax, metric in zip(axes, present):
        assert len(ax.lines) == 2
        for line, method in zip(ax.lines, ("grpo", "nthr")):
            expected = df[df.method == method].groupby("step")[metric].mean()
            np.testing.assert_array_equal(line.get_xdata(), expected.index.to_numpy())
            # a mean of 3 positive seeds, summed in whatever order: (3 + 1) roundings, relatively
            np.testing.assert_allclose(
                line.get_ydata(), expected.to_numpy(), rtol=4 * EPS64, atol=0.0
            )
        # band = mean ± sd over seeds: a mean and a std of 3 numbers, at the scale of the largest
        # value
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        sd = df[df.method == "grpo"].groupby("step")[metric].std().to_numpy()
        mean = df[df.method == "grpo"].groupby("step")[metric].mean().to_numpy()
        atol = 16 * EPS64 * df[metric].abs().max()
        assert abs(band.max() - (mean + sd).max()) <= atol
        assert abs(band.min() - (mean - sd).min()) <= atol


def test_plot_training_curves_repeated_steps_count_once_and_nan_skipped():
    df = pd.DataFrame(
        {
            "step": [0, 0, 1, 0, 1, 1],
            "method": ["grpo"] * 6,
            "seed": [0, 0, 0, 1, 1, 1],
            "kl": [1.0, 3.0, 5.0, 10.0, np.nan, 20.0],
        }
    )
    axes = viz.plot_training_curves(df, metrics=("kl",), band="minmax")
    line = axes[0].lines[0]
    # seed 0: step0 mean(1,3)=2, step1 5; seed 1: step0 10, step1 20 -> means 6, 12.5
    np.testing.assert_array_equal(line.get_ydata(), [6.0, 12.5])  # exact in binary


def test_plot_training_curves_smooth_is_a_trailing_mean_per_run():
    df = pd.DataFrame(
        {
            "step": [0, 1, 2, 3] * 2,
            "method": ["grpo"] * 8,
            "seed": [0] * 4 + [1] * 4,
            "reward_mean": [0.0, 1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0],
        }
    )
    axes = viz.plot_training_curves(df, metrics=("reward_mean",), smooth=2)
    # seed 0 trailing means over 2 steps: 0, .5, .5, .5; seed 1: .5, .5, .75, .5 (by hand), then
    # the mean over the two seeds; every number is a short sum of halves and quarters: exact
    np.testing.assert_array_equal(axes[0].lines[0].get_ydata(), [0.25, 0.5, 0.625, 0.5])
    assert "trailing mean over 2 steps" in axes[0].figure._suptitle.get_text()
    with pytest.raises(ValueError, match="smooth=0"):
        viz.plot_training_curves(df, metrics=("reward_mean",), smooth=0)


def test_plot_training_curves_trainer_column_names_and_all_nan_columns():
    df = _metrics_df()
    df["lld/rate"] = np.arange(len(df), dtype=float)
    df["nthr/selected_frac"] = np.nan  # the trainer writes NaN NTHR columns for GRPO runs
    axes = viz.plot_training_curves(df, metrics=("lld_rate", "nthr/selected_frac", "kl"))
    assert [ax.get_title() for ax in axes] == ["lld/rate", "kl"]
    expected = df[df.method == "nthr"].groupby("step")["lld/rate"].mean().to_numpy()
    # a mean of 3 positive seeds: (3 + 1) roundings, relatively
    np.testing.assert_allclose(axes[0].lines[1].get_ydata(), expected, rtol=4 * EPS64, atol=0.0)
    assert "skipped: nthr/selected_frac" in axes[0].figure._suptitle.get_text()


def test_plot_training_curves_given_axes_and_errors():
    df = _metrics_df()
    fig, axs = plt.subplots(1, 2)
    before = plt.get_fignums()
    out = viz.plot_training_curves(df, metrics=("kl", "reward_mean"), axes=axs)
    assert plt.get_fignums() == before and list(out) == list(axs)
    with pytest.raises(ValueError, match="2 axes given for 3 metrics"):
        viz.plot_training_curves(df, metrics=("kl", "reward_mean", "completion_length"), axes=axs)
    with pytest.raises(ValueError, match="none of the metrics"):
        viz.plot_training_curves(df, metrics=("lld_rate",), axes=axs)
    with pytest.raises(ValueError, match="seed"):
        viz.plot_training_curves(df.drop(columns="seed"), axes=axs)
    with pytest.raises(ValueError, match="band"):
        viz.plot_training_curves(df, metrics=("kl",), band="ci", axes=axs)
    fig2, ax2 = plt.subplots()
    viz.plot_training_curves(df, metrics=("kl",), band=None, axes=[ax2])
    assert len(ax2.collections) == 0 and len(ax2.lines) == 2


def test_load_metrics_from_config_and_path(tmp_path):
    a = tmp_path / "runs" / "grpo" / "seed3"
    b = tmp_path / "other_run"
    for d in (a, b):
        d.mkdir(parents=True)
    pd.DataFrame({"step": [0, 1], "kl": [0.1, 0.2]}).to_csv(a / "metrics.csv", index=False)
    pd.DataFrame({"step": [0], "kl": [0.5]}).to_csv(b / "metrics.csv", index=False)
    (b / "config.json").write_text(json.dumps({"method": "nthr", "seed": 7, "lr": 1e-6}))
    t = tmp_path / "trainer_style"  # nthr_book.trainer nests the config under "config"
    t.mkdir()
    pd.DataFrame({"step": [0], "kl": [0.9]}).to_csv(t / "metrics.csv", index=False)
    (t / "config.json").write_text(
        json.dumps({"config": {"method": "pos_only", "seed": 1}, "versions": {}})
    )
    df = viz.load_metrics([a, str(b), t])
    assert df[["method", "seed"]].values.tolist() == [
        ["grpo", 3],
        ["grpo", 3],
        ["nthr", 7],
        ["pos_only", 1],
    ]
    assert df["kl"].tolist() == [0.1, 0.2, 0.5, 0.9] and df["run"].iloc[2] == str(b)
    c = tmp_path / "nameless"
    c.mkdir()
    pd.DataFrame({"step": [0]}).to_csv(c / "metrics.csv", index=False)
    with pytest.raises(ValueError, match="nameless"):
        viz.load_metrics([c])
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        viz.load_metrics(tmp_path / "missing" / "seed0")


# ------------------------------------------------------------------ benchmarks and success rates


def test_plot_benchmark_table_bars_and_error_bars():
    df = pd.DataFrame(
        {
            "benchmark": ["MATH500", "AMC23", "MATH500", "AMC23"],
            "method": ["grpo", "grpo", "nthr", "nthr"],
            "accuracy": [33.8, 7.5, 36.6, 10.0],
            "ci_low": [29.8, 2.0, 32.4, 4.0],
            "ci_high": [38.0, 20.0, 41.0, 23.0],
        }
    )
    ax = viz.plot_benchmark_table(df)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["MATH500", "AMC23"]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2
    np.testing.assert_array_equal(_heights(bars[0]), [33.8, 7.5])
    np.testing.assert_array_equal(_heights(bars[1]), [36.6, 10.0])
    segments = bars[1].errorbar.lines[2][0].get_segments()
    # error bars are drawn as accuracy ∓ (accuracy - ci): two roundings at the scale of the accuracy
    np.testing.assert_allclose(
        [[s[0][1], s[1][1]] for s in segments],
        [[32.4, 41.0], [4.0, 23.0]],
        rtol=0.0,
        atol=2 * EPS64 * 41.0,
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GRPO", "GRPO + NTHR"]
    bad = df.assign(ci_low=[40.0, 2.0, 32.4, 4.0])
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        viz.plot_benchmark_table(bad)


def test_plot_benchmark_table_several_models_pair_model_and_method():
    df = pd.DataFrame(
        {
            "benchmark": ["MATH500"] * 3,
            "model": ["0.5B", "0.5B", "1.5B"],
            "method": ["grpo", "nthr", "grpo"],
            "accuracy": [0.3, 0.35, 0.5],
            "ci_low": [0.25, 0.3, 0.45],
            "ci_high": [0.35, 0.4, 0.55],
        }
    )
    ax = viz.plot_benchmark_table(df)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "0.5B / GRPO",
        "0.5B / GRPO + NTHR",
        "1.5B / GRPO",
    ]
    np.testing.assert_array_equal([_heights(b)[0] for b in bars], [0.3, 0.35, 0.5])


def test_plot_benchmark_table_reads_evaluate_rows():
    df = pd.DataFrame(
        {
            "label": ["grpo", "nthr"],
            "benchmark": ["AMC23", "AMC23"],
            "accuracy_pct": [7.5, 10.0],
            "ci_low_pct": [2.6, 4.0],
            "ci_high_pct": [19.9, 23.1],
        }
    )
    ax = viz.plot_benchmark_table(df)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    np.testing.assert_array_equal([_heights(b)[0] for b in bars], [7.5, 10.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GRPO", "GRPO + NTHR"]


def test_plot_success_histogram_counts_at_k_over_g():
    rates = [0.0, 0.0, 0.25, 0.5, 0.5, 0.5, 1.0]
    ax = viz.plot_success_histogram(rates, group_size=4)
    np.testing.assert_array_equal(_heights(ax.containers[0]), [2, 1, 3, 0, 1])
    centres = [p.get_x() + p.get_width() / 2 for p in ax.containers[0].patches]
    # x = centre - width/2, then + width/2 again: two roundings at the scale of 1
    np.testing.assert_allclose(centres, [0, 0.25, 0.5, 0.75, 1.0], rtol=0.0, atol=2 * EPS64)
    assert "4 mixed" in ax.get_title()
    rewards = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    ax2 = viz.plot_success_histogram(rewards, group_size=4)
    np.testing.assert_array_equal(_heights(ax2.containers[0]), [1, 1, 0, 0, 1])
    with pytest.raises(ValueError, match="k/4"):
        viz.plot_success_histogram([0.3], group_size=4)


def test_no_plot_function_creates_a_figure_when_given_axes():
    fig, axs = plt.subplots(2, 3)
    axs = axs.ravel()
    before = plt.get_fignums()
    viz.plot_success_histogram([0.5], ax=axs[0], group_size=2)
    viz.plot_score_histogram(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([True]), ax=axs[1])
    viz.plot_benchmark_table(
        pd.DataFrame(
            {
                "benchmark": ["b"],
                "method": ["grpo"],
                "accuracy": [0.5],
                "ci_low": [0.4],
                "ci_high": [0.6],
            }
        ),
        ax=axs[2],
    )
    viz.plot_displacement(_displacement_df(), ax=axs[3])
    viz.plot_token_influence(matrix=np.eye(2), ax=axs[4])
    assert plt.get_fignums() == before


def test_plot_first_order_scatter_and_parts():
    table = pd.DataFrame(
        {
            "negatives": ["f=0.00", "f=0.00", "near-miss", "near-miss"],
            "measured": [0.02, 0.03, 0.001, -0.002],
            "predicted": [0.021, 0.029, 0.002, -0.001],
            "right": [0.01, 0.02, 0.02, 0.02],
            "wrong": [0.011, 0.009, -0.018, -0.021],
        }
    )
    axes = viz.plot_first_order(table)
    natural, near = axes[0].collections[:2]
    np.testing.assert_array_equal(near.get_offsets(), [[0.002, 0.001], [-0.001, -0.002]])
    right, wrong = axes[1].containers
    # mean parts per kind: natural (0.015, 0.01), near-miss (0.02, −0.0195); float64 means of two
    np.testing.assert_allclose([b.get_height() for b in right], [0.015, 0.02], rtol=2 * EPS64)
    np.testing.assert_allclose([b.get_height() for b in wrong], [0.01, -0.0195], rtol=2 * EPS64)
    assert all(r.get_x() < w.get_x() for r, w in zip(right, wrong))  # side by side, not overlaid
    measured = axes[1].collections[-1].get_offsets()[:, 1]  # the mean measured Δ per kind
    np.testing.assert_allclose(measured, [0.025, -0.0005], rtol=2 * EPS64)
    with pytest.raises(ValueError, match="predicted"):
        viz.plot_first_order(table.drop(columns="predicted"))


def test_plot_regime_panels_titles_state_what_the_intervals_show():
    rows = []
    for cond, prefix, diffs in (
        ("f=0.00", 0.3, {"grpo": (0.01, 0.005, 0.02), "nthr": (0.012, 0.006, 0.02)}),
        ("near-miss", 0.85, {"grpo": (-0.01, -0.02, -0.004), "nthr": (0.002, -0.001, 0.005)}),
    ):
        for method, (d, lo, hi) in diffs.items():
            rows.append(
                {"negatives": cond, "method": method, "shared_prefix": prefix, "diff_mean": d}
                | {"diff_low": lo, "diff_high": hi}
            )
    axes = viz.plot_regime_panels(pd.DataFrame(rows), rules_shown=("nthr",))
    assert [p.get_height() for p in axes[0].patches] == [0.3, 0.85]
    title = axes[1].get_title()
    assert "below 0: GRPO near-miss" in title and "above 0: GRPO f=0.00" in title
    assert "no interval wholly below 0" in axes[2].get_title()
    assert "sparing tokens: NTHR against Pos Only" in axes[2].get_title()  # the rules shown
    line = axes[1].containers[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), [0.01, -0.01])
