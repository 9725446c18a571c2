"""`make bench`'s harness: the headline column is the shipped config, ratios pair samples of one round,
and a missing reference store is reported, not fatal."""

from __future__ import annotations

import argparse
import os
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import bench_stargz
from tests.support.bench import variants
from tests.support.bench_report import Series, compute, index_figure
from tests.support.bench_runs import SHIPPED_CONFIG, Sample, background_off
from tests.support.procstat import stolen_seconds, written_bytes


def _variants():
    return variants(SimpleNamespace(args=argparse.Namespace(no_reference=True, stargz_store=None)))


def test_headline_is_the_shipped_config_and_the_extra_differs_only_in_background():
    cols = {v.name: v for v in _variants()}
    assert [v.name for v in cols.values() if v.headline] == ["als"]
    assert cols["als"].config == SHIPPED_CONFIG.read_text()
    shipped, extra = tomllib.loads(cols["als"].config), tomllib.loads(cols["als-nobg"].config)
    assert shipped["fetch"]["background"] is True and extra["fetch"]["background"] is False
    extra["fetch"]["background"] = True
    assert extra == shipped


def test_background_off_refuses_a_config_it_cannot_change():
    with pytest.raises(RuntimeError, match="background = true"):
        background_off("[fetch]\nprefetch = true\n")


def test_the_hosts_steal_is_the_eighth_figure_of_the_cpu_line():
    tick = os.sysconf("SC_CLK_TCK")
    text = f"cpu  386994 0 294656 1810563 148769 0 7068 {3 * tick} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert stolen_seconds(text) == 3.0
    assert stolen_seconds() >= 0.0  # this machine's own
    with pytest.raises(ValueError, match="cpu line"):
        stolen_seconds("intr 1 2 3\n")


def test_a_process_written_bytes_count_what_it_wrote(tmp_path):
    before = written_bytes(os.getpid())
    (tmp_path / "f").write_bytes(b"x" * (1 << 20))
    assert written_bytes(os.getpid()) - before >= 1 << 20
    assert written_bytes(2 ** 22 + 1) == 0  # no such process: nothing, not an error


def _sample(seconds: float, peak: int = 0) -> Sample:
    return Sample(seconds, seconds / 2, seconds / 2, 1000, 1000, store_peak_rss=peak)


def test_ratios_pair_the_samples_of_one_round_and_targets_mark_the_headline_only():
    cols = _variants()
    series = {("cold", "normal"): Series("cold", "normal", {0: _sample(10.0), 1: _sample(4.0)}),
              ("cold", "als"): Series("cold", "als", {0: _sample(1.0), 1: _sample(1.0)}),
              ("cold", "als-nobg"): Series("cold", "als-nobg", {0: _sample(1.0)})}
    rows = {r["key"]: r for r in compute(series, cols, 2, 10_000, 10_000)}
    als = rows["cold"]["variants"]["als"]
    assert als["per_round"] == [0.1, 0.25]  # 1/10 and 1/4, not a ratio of medians (1/7)
    assert als["pairs"] == {"median": 0.175, "min": 0.1, "max": 0.25, "n": 2}
    assert als["target_met"] is False  # <= 0.15
    assert "target_met" not in rows["cold"]["variants"]["als-nobg"]
    assert rows["cold_bytes_exit"]["variants"]["als"]["pairs"]["median"] == 0.1


def test_the_indexed_image_column_is_the_shipped_config_on_its_own_image_and_skips_the_optimized_one():
    from tests.support.bench import WORKLOADS
    cols = {v.name: v for v in _variants()}
    gz = cols["als-gzindex"]
    assert (gz.config, gz.image, gz.headline) == (SHIPPED_CONFIG.read_text(), "gzindex", False)
    assert [v.image for v in cols.values() if v.name != "als-gzindex"] == ["", "", ""]
    assert [w.name for w in WORKLOADS if w.any_image] == ["cold", "readall"]
    order = [v.name for v in _variants()]  # next to the eStargz column whichever way a round runs
    assert abs(order.index("als-gzindex") - order.index("als")) == 1


def test_the_indexed_image_is_paired_with_the_estargz_image_of_the_same_round():
    cols = _variants()
    series = {("cold", "normal"): Series("cold", "normal", {0: _sample(10.0), 1: _sample(10.0)}),
              ("cold", "als"): Series("cold", "als", {0: _sample(1.0), 1: _sample(2.0)}),
              ("cold", "als-gzindex"): Series("cold", "als-gzindex", {0: _sample(1.5), 1: _sample(2.2)})}
    series[("cold", "als-gzindex")].samples[0].registry_bytes_at_exit = 4000
    rows = {r["key"]: r for r in compute(series, cols, 2, 10_000, 10_000, {"als-gzindex": 8_000})}
    cell = rows["gz_cold_vs_esgz"]["variants"]
    assert list(cell) == ["als-gzindex"]  # not a figure of the other columns
    assert cell["als-gzindex"]["per_round"] == pytest.approx([1.5, 1.1])  # 1.5/1 and 2.2/2: by round
    assert cell["als-gzindex"]["target_met"] is False  # median 1.3 > 1.2, its own target
    assert rows["gz_bytes_vs_esgz"]["variants"]["als-gzindex"]["per_round"] == [4.0, 1.0]
    # bytes over its own image (8,000), the eStargz column's over the eStargz image (10,000)
    assert rows["cold_bytes_exit"]["variants"]["als-gzindex"]["per_round"] == [0.5, 0.125]
    assert rows["cold_bytes_exit"]["variants"]["als"]["per_round"] == [0.1, 0.1]
    assert "target_met" not in rows["cold"]["variants"]["als-gzindex"]  # the headline's targets stay its own


def test_the_index_size_target_is_three_percent_of_the_layers():
    assert index_figure(3000, 100_000, 1, 1.25)["target_met"] is True
    over = index_figure(3001, 100_000, 1, 1.25)
    assert over["target_met"] is False and over["fraction"] == 0.03001


def test_no_reference_store_is_a_reason_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no stargz-store on it
    monkeypatch.setattr(bench_stargz, "DEBIAN_GOCODE", tmp_path / "gocode")
    binary, why = bench_stargz.obtain(tmp_path, None)
    assert binary is None and "cmd/stargz-store" in why
    binary, why = bench_stargz.obtain(tmp_path, str(tmp_path / "nothing"))
    assert binary is None and "not an executable file" in why


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain")
def test_a_failed_build_names_the_missing_packages(tmp_path):
    src = tmp_path / "stargz-store" / "gopath" / "src" / bench_stargz.IMPORT_PATH
    (src / "cmd" / "stargz-store").mkdir(parents=True)
    (src / "cmd" / "stargz-store" / "main.go").write_text(
        'package main\n\nimport _ "example.invalid/not/in/debian"\n\nfunc main() {}\n')
    binary, why = bench_stargz.obtain(tmp_path, None)
    assert binary is None
    assert "missing from Debian" in why and "example.invalid/not/in/debian" in why


def test_a_reference_store_that_exits_at_once_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(RuntimeError, match="stargz-store exited 1"):
        bench_stargz.StargzStore(Path(shutil.which("false")), tmp_path / "store").start(timeout=10)
