"""Tests of nthr_book.config: the fast/full switch and the preset notebooks 02-04 share."""

from __future__ import annotations

import inspect

import pytest

from nthr_book import config, groups, lld


def test_fast_mode_reads_the_switch(monkeypatch):
    monkeypatch.setenv(config.FAST_ENV, "1")
    assert config.fast_mode() and config.GroupsPreset.current() == config.GroupsPreset.fast()
    monkeypatch.setenv(config.FAST_ENV, "0")
    assert not config.fast_mode() and config.GroupsPreset.current() == config.GroupsPreset.paper()
    monkeypatch.setenv(config.FAST_ENV, "maybe")
    with pytest.raises(ValueError, match="NTHR_BOOK_FAST='maybe'"):
        config.fast_mode()


def test_preset_sampling_is_what_the_groups_file_records(monkeypatch, tmp_path):
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    preset = config.GroupsPreset.fast()
    # every sampling setting a groups file must match, except the problem ids, comes from the preset
    assert set(preset.sampling()) == set(groups.SAMPLING_KEYS) - {"problem_ids"}
    for fn in (groups.load_or_sample_groups, lld.lld_experiment):
        assert set(preset.sampling()) <= set(inspect.signature(fn).parameters), fn.__name__
    assert preset.groups_path == tmp_path / "lld" / "groups-fast-seed0.pt"
    problems = preset.problems()
    assert len(problems) == preset.n_questions == len({p["id"] for p in problems})
    assert (
        problems == config.GroupsPreset.fast().problems()
    )  # seeded: the same questions every time
