"""Turn a results document into the three outputs: results.json (everything, every sample),
results.md (medians, ranges, ratios, daemon CPU and memory, what was not measured) and chart.png.

The chart needs matplotlib (the optional `bench` extra that `scripts/setup.sh --bench` installs);
without it the chart is skipped and results.json says why, since the numbers do not depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.stats import RATIO_PAIRS

__all__ = ["chart", "markdown", "write_all"]

TARGET_ORDER = ("floor", "overlay", "fuse-overlayfs", "cowfs")


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _ok_targets(res: dict[str, Any]) -> list[str]:
    return [t["name"] for t in res["targets"] if t["status"] == "ok"]


def _metric_rows(res: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, metric) for every measured metric, in run order."""
    return [(w, m) for w in res["workloads"] if w["status"] == "ok" for m in w["metrics"]]


def _cell(res: dict[str, Any], workload: dict[str, Any], target: str, metric: str) -> str:
    if target in workload.get("not_applicable", ()):
        return "n/a"
    for r in res["results"]:
        if r["workload"] == workload["name"] and r["target"] == target:
            if r["status"] != "ok":
                return "**FAILED**"
            s = r["summary"][metric]
            if s["n"] == 1:
                return _num(s["median"])
            return f"{_num(s['median'])} ({_num(s['min'])}–{_num(s['max'])})"
    return "–"


def markdown(res: dict[str, Any]) -> str:
    """The report a person reads; also printed at the end of a run."""
    targets = _ok_targets(res)
    h = res["host"]
    out = [
        f"# cowfs benchmark: {res['mode']} run, {res['started']}",
        "",
        f"{res['reps']} interleaved repeat(s) per target, medians with (min–max). "
        f"Kernel {h['kernel']}, {h['cpus']} CPUs, {h['mem_gib']} GiB, Python {h['python']}, "
        f"{h['fio'] or 'no fio'}, {h['fuse_overlayfs'] or 'no fuse-overlayfs'}, "
        f"cowfs {h['cowfs_rev']}. Run took {res['duration_s']:.0f} s.",
        "",
        "## Medians",
        "",
        "| metric | unit | " + " | ".join(targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for w, m in _metric_rows(res):
        cells = [_cell(res, w, t, m["name"]) for t in targets]
        out.append(f"| {m['label']} | {m['unit']} | " + " | ".join(cells) + " |")

    pairs = [f"{a}/{b}" for a, b in RATIO_PAIRS if a in targets and b in targets]
    if pairs:
        out += [
            "",
            "## Speed ratios (of medians; 1.00 = as fast as the reference, 0.50 = half as fast;"
            " for s/ms metrics t_ref/t)",
            "",
            "| metric | " + " | ".join(pairs) + " |",
            "|---|" + "---|" * len(pairs),
        ]
        for _w, m in _metric_rows(res):
            if not m.get("speed", True):
                continue
            row = res["ratios"].get(m["name"], {})
            out.append(f"| {m['name']} | " + " | ".join(_ratio(row.get(p)) for p in pairs) + " |")

    fuse = [t for t in targets if t in ("fuse-overlayfs", "cowfs")]
    cpu_rows: list[str] = []
    if fuse:
        for w in res["workloads"]:
            if w["status"] != "ok":
                continue
            cells = []
            for t in fuse:
                r = next(
                    (r for r in res["results"] if r["workload"] == w["name"] and r["target"] == t),
                    None,
                )
                cpu = r.get("daemon_cpu_s") if r else None
                cells.append(f"{cpu['median']:.3f}" if cpu else "–")
            if all(c == "–" for c in cells):
                continue  # no daemon of the harness's own (the container workloads)
            cpu_rows.append(f"| {w['name']} | " + " | ".join(cells) + " |")
    if cpu_rows:
        out += [
            "",
            "## FUSE daemon CPU seconds per workload (median, timed part only)",
            "",
            "| workload | " + " | ".join(fuse) + " |",
            "|---|" + "---|" * len(fuse),
            *cpu_rows,
        ]

    if res["memory"]:
        out += [
            "",
            "## FUSE daemon memory around the cold stat walk (medians)",
            "",
            "| target | RSS after mount | peak RSS (VmHWM) after walk | inodes walked | bytes/inode |",
            "|---|---|---|---|---|",
        ]
        for t, mem in res["memory"].items():
            out.append(
                f"| {t} | {mem['rss_after_mount_kib']['median'] / 1024:.1f} MiB "
                f"| {mem['peak_rss_after_walk_kib']['median'] / 1024:.1f} MiB "
                f"| {mem['inodes_walked']:,} | {mem['bytes_per_inode']['median']:,.0f} |"
            )

    missing = [
        f"- target **{t['name']}**: {t['reason']}" for t in res["targets"] if t["status"] != "ok"
    ]
    missing += [
        f"- workload **{w['name']}** ({w['description']}): {w['reason']}"
        for w in res["workloads"]
        if w["status"] != "ok"
    ]
    missing += [
        f"- workload **{w['name']}** on {', '.join(w['not_applicable'])}: "
        f"{w['not_applicable_reason']}"
        for w in res["workloads"]
        if w["status"] == "ok" and w.get("not_applicable")
    ]
    if missing:
        out += ["", "## Not measured", "", *missing]

    failures = [
        f"- {r['workload']} on {r['target']}: {'; '.join(r['errors'])}"
        for r in res["results"]
        if r["status"] != "ok"
    ]
    logs = sorted(
        {
            f"- {r['workload']} on {r['target']}: {line}"
            for r in res["results"]
            for s in r["samples"]
            for line in s.get("daemon_log", [])
        }
    )
    if failures:
        out += ["", "## Failed (verification or mount errors; no numbers shown)", "", *failures]
    if logs:
        out += ["", "## Daemon log warnings", "", *logs]

    out += ["", "Workloads:", ""]
    out += [
        f"- **{w['name']}**: {w['description']}" for w in res["workloads"] if w["status"] == "ok"
    ]
    return "\n".join(out) + "\n"


def chart(res: dict[str, Any], path: Path) -> str | None:
    """Speed of each target relative to kernel overlayfs (the floor when overlay is missing), one
    bar group per metric, log scale. Returns why no chart was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (scripts/setup.sh --bench installs the bench extra)"
    from bench.stats import speed_ratio

    targets = _ok_targets(res)
    ref = "overlay" if "overlay" in targets else "floor"
    med: dict[tuple[str, str], float] = {}
    for r in res["results"]:
        if r["status"] == "ok":
            for m, s in r["summary"].items():
                med[(r["target"], m)] = s["median"]
    rows = [m for _w, m in _metric_rows(res) if m.get("speed", True)]
    others = [t for t in targets if t != ref]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.55 * len(rows)))
    height = 0.8 / max(1, len(others))
    for j, t in enumerate(others):
        ys, xs = [], []
        for i, m in enumerate(rows):
            if "floor" in (t, ref) and not m["vs_floor"]:
                continue
            a, b = med.get((t, m["name"])), med.get((ref, m["name"]))
            ratio = speed_ratio(a, b, m["higher_is_better"]) if a and b else None
            if ratio:
                ys.append(len(rows) - 1 - i + (j - (len(others) - 1) / 2) * height)
                xs.append(ratio)
        ax.barh(ys, xs, height=height, label=t)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [m["name"] for m in reversed(rows)])
    ax.set_xlabel(f"speed relative to {ref} (log scale; >1 = faster)")
    ax.set_title(f"cowfs bench, {res['mode']} run, {res['started']} ({res['reps']} reps, medians)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.md, chart.png (when possible) and results.json into out."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    why = chart(res, out / "chart.png")
    res["chart"] = None if why else "chart.png"
    res["chart_note"] = why
    if why is None:
        paths["chart"] = out / "chart.png"
    res["markdown"] = "results.md"
    paths["markdown"].write_text(markdown(res))
    paths["json"].write_text(json.dumps(res, indent=1, sort_keys=False) + "\n")
    return paths
