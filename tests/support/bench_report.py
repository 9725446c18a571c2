"""`make bench`'s figures: medians, min-max, and the ratio of each back-to-back pair, printed and as JSON.

Every ratio is given two ways: the ratio of the medians of the run, and the
ratios of the pairs (a lazy sample divided by the normal pull of the same round,
taken one right after the other), whose spread says how far the machine's
moods move the figure. The indexed gzip image's own figures pair its column
with the eStargz image's (`als`) of the same round instead.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

from tests.support.bench_runs import Sample, Variant

MB = 1e6
GZINDEX = "als-gzindex"  # the column of the indexed gzip image
ESGZ = "als"  # the column it is compared with: the same config on the eStargz image
INDEX_TARGET = "<= 0.03"  # index blobs over layer blobs


@dataclass
class Series:
    workload: str
    variant: str
    samples: dict[int, Sample] = field(default_factory=dict)  # by round

    def values(self, key: str) -> list[float]:
        return [getattr(s, key) for s in self.samples.values()]

    def summary(self) -> dict:
        out = {}
        for key in Sample.__dataclass_fields__:
            vals = self.values(key)
            if vals and any(vals):
                out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        return out


@dataclass
class Figure:
    """One line of the figures table; ``of`` gives a variant's value in one round (None: not measured)."""
    key: str
    label: str
    target: str  # e.g. "<= 0.15", "" for none
    of: Callable[[dict[tuple[str, str], Series], str, int], float | None]
    unit: str = ""
    column: str = ""  # only this column has the figure, and the target is its own (not the headline's)


def _get(series, workload: str, variant: str, rnd: int, key: str) -> float | None:
    s = series.get((workload, variant))
    sample = s.samples.get(rnd) if s else None
    return getattr(sample, key) if sample is not None else None


def ratio(workload: str, key: str, versus: str, speed: bool = False, versus_variant: str = "normal"):
    """Ours over ``versus_variant``'s (the normal pull) in the same round (``speed``: theirs over ours, so
    higher is better)."""
    def of(series, variant, rnd):
        ours, theirs = _get(series, workload, variant, rnd, key), _get(series, versus, versus_variant, rnd, key)
        if not ours or not theirs:
            return None
        return theirs / ours if speed else ours / theirs
    return of


def absolute(workload: str, key: str, scale: float = 1.0, scales: dict[str, float] | None = None):
    """A value of the round, divided by ``scale`` (or the variant's own in ``scales``: its image's size)."""
    def of(series, variant, rnd):
        v = _get(series, workload, variant, rnd, key)
        return None if v is None else v / (scales or {}).get(variant, scale)
    return of


def figures(image_bytes: int, opt_bytes: int, images: dict[str, int] | None = None) -> list[Figure]:
    """``images``: the compressed size of the image a column pulls instead of the eStargz one (Variant.image)."""
    return [
        Figure("cold", "cold start, pull + print(1) / normal pull", "<= 0.15", ratio("cold", "seconds", "cold")),
        Figure("cold_pull_s", "  its `podman pull` phase, s", "< stargz-store's", absolute("cold", "pull_seconds"), "s"),
        Figure("cold_run_s", "  its `podman run` phase, s", "", absolute("cold", "run_seconds"), "s"),
        Figure("cold_opt", "optimized image cold start / normal pull", "<= 0.10",
               ratio("cold-opt", "seconds", "cold")),
        Figure("cold_bytes_exit", "bytes fetched by the container's exit / image", "<= 0.09",
               absolute("cold", "registry_bytes_at_exit", image_bytes, images)),
        Figure("cold_bytes_settled", "  and once the link is quiet / image", "",
               absolute("cold", "registry_bytes_settled", image_bytes, images)),
        Figure("cold_settle_s", "  seconds from the exit to the last byte", "", absolute("cold", "settle_seconds"), "s"),
        Figure("cold_opt_bytes_exit", "optimized: bytes by the exit / image", "",
               absolute("cold-opt", "registry_bytes_at_exit", opt_bytes)),
        Figure("readall", "read everything / normal pull", "<= 0.7", ratio("readall", "seconds", "readall")),
        Figure("warm_after", "warm read-all at once, speed vs normal pull", ">= 0.9",
               ratio("readall", "warm_after_s", "readall", speed=True)),
        Figure("warm_settled", "warm read-all settled, speed vs normal pull", ">= 0.9",
               ratio("readall", "warm_settled_s", "readall", speed=True)),
        Figure("peak_mb", "store peak memory reading everything, MB", "<= 60",
               absolute("readall", "store_peak_rss", MB), "MB"),
        Figure("gz_cold_vs_esgz", "indexed gzip: cold start / eStargz image's", "<= 1.2",
               ratio("cold", "seconds", "cold", versus_variant=ESGZ), column=GZINDEX),
        Figure("gz_bytes_vs_esgz", "indexed gzip: bytes by the exit / eStargz's", "",
               ratio("cold", "registry_bytes_at_exit", "cold", versus_variant=ESGZ), column=GZINDEX),
    ]


def index_figure(index_bytes: int, layer_bytes: int, layers: int, seconds: float) -> dict:
    """The indexed image's index blobs against its layer blobs (one figure per run, not per round)."""
    fraction = index_bytes / layer_bytes
    return {"index_bytes": index_bytes, "layer_bytes": layer_bytes, "layers": layers, "fraction": fraction,
            "seconds": round(seconds, 1), "target": INDEX_TARGET, "target_met": met(INDEX_TARGET, fraction, None)}


def spread(vals: list[float]) -> dict | None:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None


def met(target: str, value: float, reference: float | None) -> bool | None:
    if target.startswith("<="):
        return value <= float(target.split()[1])
    if target.startswith(">="):
        return value >= float(target.split()[1])
    if target.startswith("<") and reference is not None:
        return value < reference
    return None


def compute(series: dict[tuple[str, str], Series], variants: list[Variant], rounds: int,
            image_bytes: int, opt_bytes: int, images: dict[str, int] | None = None) -> list[dict]:
    rows = []
    for fig in figures(image_bytes, opt_bytes, images):
        row = {"key": fig.key, "label": fig.label, "target": fig.target, "unit": fig.unit, "variants": {}}
        for v in variants:
            if fig.column and v.name != fig.column:
                continue
            vals = [x for r in range(rounds) if (x := fig.of(series, v.name, r)) is not None]
            if vals:
                row["variants"][v.name] = {"pairs": spread(vals), "per_round": vals}
        ref = row["variants"].get("stargz-store")
        for v in variants:  # the targets are the shipped defaults'; other columns are for comparison
            cell = row["variants"].get(v.name)
            if (v.name == fig.column if fig.column else v.headline) and cell and fig.target:
                cell["target_met"] = met(fig.target, cell["pairs"]["median"], ref["pairs"]["median"] if ref else None)
        rows.append(row)
    return rows


def _fmt(cell: dict | None) -> str:
    if not cell:
        return "-"
    p = cell["pairs"]
    text = f"{p['median']:.3g}" if p["n"] == 1 else f"{p['median']:.3g} [{p['min']:.3g}-{p['max']:.3g}]"
    flag = {True: " ok", False: " MISS"}.get(cell.get("target_met"), "")
    return text + flag


def print_tables(series: dict[tuple[str, str], Series], variants: list[Variant], rows: list[dict]) -> None:
    width = 26
    print(f"\n{'seconds, median [min-max]':<34}" + "".join(f"{v.name:>{width}}" for v in variants))
    for workload in ("cold", "cold-opt", "readall"):
        for key, label in (("seconds", workload), ("pull_seconds", "  pull"), ("run_seconds", "  run"),
                           ("warm_after_s", "  warm at once"), ("warm_settled_s", "  warm settled"),
                           ("warm_steal_cpus", "  host's steal in warm runs, CPUs"),
                           ("warm_store_mb", "  store's writes in warm runs, MB"),
                           ("store_cpu_user_s", "  store CPU user"), ("store_cpu_sys_s", "  store CPU system"),
                           ("host_steal_cpus", "  host's steal, CPUs")):
            cells = []
            for v in variants:
                s = series.get((workload, v.name))
                vals = s.values(key) if s else []
                cells.append(f"{statistics.median(vals):.2f} [{min(vals):.2f}-{max(vals):.2f}]"
                             if vals and any(vals) else "-")
            if any(c != "-" for c in cells):
                print(f"{label:<34}" + "".join(f"{c:>{width}}" for c in cells))
    lazy = [v for v in variants if v.kind != "normal"]
    print(f"\n{'per pair (same round), median [min-max]':<48}{'target':>16}"
          + "".join(f"{v.name:>{width}}" for v in lazy))
    for row in rows:
        print(f"{row['label']:<48}{row['target']:>16}"
              + "".join(f"{_fmt(row['variants'].get(v.name)):>{width}}" for v in lazy))


def result_json(series: dict[tuple[str, str], Series], variants: list[Variant], rows: list[dict],
                meta: dict) -> dict:
    return {
        **meta,
        "variants": [asdict(v) for v in variants],
        "figures": rows,
        "series": {f"{w}/{v}": s.summary() for (w, v), s in series.items()},
        "raw": {f"{w}/{v}": {str(r): asdict(x) for r, x in s.samples.items()} for (w, v), s in series.items()},
    }
