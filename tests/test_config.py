"""Tests of nthr_book.config (the run-size switch) and nthr_book.presets (the preset notebooks 02-04
share)."""

from __future__ import annotations

import inspect

import pytest

from nthr_book import config, groups, lld_sweep, presets


def test_run_size_reads_the_switch_and_its_alias(monkeypatch):
    monkeypatch.delenv(config.FAST_ENV, raising=False)
    for size in config.RUN_SIZES:
        monkeypatch.setenv(config.SIZE_ENV, size)
        assert config.run_size() == size and config.fast_mode() == (size != "paper")
        assert presets.GroupsPreset.current().name == size
        assert config.by_size(ci=1, laptop=2, paper=3) == config.RUN_SIZES.index(size) + 1
    monkeypatch.setenv(config.SIZE_ENV, "huge")
    with pytest.raises(ValueError, match="NTHR_BOOK_SIZE='huge'"):
        config.run_size()
    # NTHR_BOOK_FAST is the older switch: 1 is the ci size, 0 the paper size; SIZE wins over it
    monkeypatch.delenv(config.SIZE_ENV)
    monkeypatch.setenv(config.FAST_ENV, "1")
    assert config.run_size() == "ci" and presets.GroupsPreset.current() == presets.GroupsPreset.ci()
    monkeypatch.setenv(config.FAST_ENV, "0")
    assert config.run_size() == "paper" and not config.fast_mode()
    assert config.mode_name() == "paper (NTHR_BOOK_FAST=0)"
    monkeypatch.setenv(config.SIZE_ENV, "laptop")
    assert config.run_size() == "laptop"
    monkeypatch.delenv(config.SIZE_ENV)
    monkeypatch.setenv(config.FAST_ENV, "maybe")
    with pytest.raises(ValueError, match="NTHR_BOOK_FAST='maybe'"):
        config.fast_mode()


def test_announce_size_prints_the_cost_of_every_size(monkeypatch, capsys):
    monkeypatch.setenv(config.SIZE_ENV, "laptop")
    costs = {"ci": "2 min", "laptop": "15 min", "paper": "GPU hours"}
    assert config.announce_size(costs) == "laptop"
    printed = capsys.readouterr().out
    assert "run size: laptop" in printed and "about 15 min" in printed
    assert "ci: 2 min" in printed and "paper: GPU hours" in printed
    with pytest.raises(ValueError, match="no entry for paper"):
        config.announce_size({"ci": "1", "laptop": "2"})


def test_preset_sampling_is_what_the_groups_file_records(monkeypatch, tmp_path):
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    preset = presets.GroupsPreset.ci()
    # every sampling setting a groups file must match, except the problem ids, comes from the preset
    assert set(preset.sampling()) == set(groups.SAMPLING_KEYS) - {"problem_ids"}
    for fn in (groups.load_or_sample_groups, lld_sweep.lld_experiment):
        assert set(preset.sampling()) <= set(inspect.signature(fn).parameters), fn.__name__
    assert preset.groups_path == tmp_path / "lld" / "groups-ci-seed0.pt"
    problems = preset.problems()
    assert len(problems) == preset.n_questions == len({p["id"] for p in problems})
    assert problems == presets.GroupsPreset.ci().problems()  # seeded: the same questions every time


def test_reasoner_presets_draw_the_reasoner_rl_pool(monkeypatch, tmp_path):
    from nthr_book import reasoner

    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    for size, name in (("ci", "ci-reasoner"), ("laptop", "laptop-reasoner"), ("paper", "paper")):
        monkeypatch.setenv(config.SIZE_ENV, size)
        assert presets.GroupsPreset.current_reasoner().name == name
    preset = presets.GroupsPreset.reasoner_laptop()
    assert preset.model == reasoner.REASONER and preset.max_new_tokens == reasoner.MAX_NEW_TOKENS
    problems = preset.problems()
    assert problems == reasoner.problems("rl", 32, seed=0)
    assert {reasoner.split_of(p["expression"]) for p in problems} == {"rl"}
    # its own files: the base model's groups are not overwritten
    assert preset.groups_path != presets.GroupsPreset.laptop().groups_path
