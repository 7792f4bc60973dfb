"""Plot each contender's median time as a ratio to the reference, from saved benchmark JSON.

    python benchmarks/plot_ratios.py benchmarks/results/cpu_1thread.json \\
        benchmarks/results/cpu_2threads.json -o benchmarks/results/cpu_ratios.png

Reads files written by ``deepcore bench --save`` (or ``pytest benchmarks/ --benchmark-json``,
whose entries carry the same ``extra_info``); one panel per file, one bar per contender
and case, the reference (PyTorch when it ran, else NumPy) at 1.0. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _rows(data: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """(label, contender, ratio, reference) per benchmark, the ratio computed from the medians."""
    medians: dict[tuple[str, str], float] = {}
    entries = []
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        group = b.get("group") or b["name"]
        contender = extra.get("contender") or b.get("params", {}).get("contender")
        medians[(group, contender)] = b["stats"]["median"]
        entries.append((group, contender, extra.get("device", "cpu")))
    paired = {(b.get("group") or b["name"], (b.get("extra_info") or {}).get("contender")):
              (b.get("extra_info") or {}).get("ratio_to_reference") for b in data["benchmarks"]}
    rows = []
    for group, contender, device in entries:
        ref = ("torch-cuda" if (group, "torch-cuda") in medians else "cupy") if device == "cuda" else \
              ("torch" if (group, "torch") in medians else "numpy")
        if (group, ref) not in medians or contender == ref:
            continue
        # deepcore bench's interleaved runs carry the per-round (paired) ratio; else medians
        ratio = paired.get((group, contender)) or medians[(group, contender)] / medians[(group, ref)]
        rows.append((group, contender, ratio, ref))
    return rows


def _title(data: dict[str, Any], path: Path) -> str:
    env = data.get("machine_info", {}).get("deepcore_env") or {}
    t = env.get("threads", {})
    blas = env.get("blas") or {}
    if not env:
        return path.name
    return (f"{path.name}: {env.get('cpu')}, {t.get('blas_threads')} BLAS / {t.get('torch_threads', '-')} torch "
            f"threads\nnumpy {env.get('numpy')} ({blas.get('name')} {blas.get('version')}), "
            f"torch {env.get('torch', '-')}")


def plot(paths: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    panels = [_rows(d) for d in datas]
    height = max(len(r) for r in panels) * 0.32 + 1.6
    fig, axes = plt.subplots(1, len(paths), figsize=(7.5 * len(paths), height), squeeze=False, sharey=False)
    colors = {"numpy": "#1f77b4", "numpy-dx": "#aec7e8", "numpy-fit": "#aec7e8", "numpy-plain": "#7f7f7f",
              "numpy-unfused": "#ff7f0e", "cupy": "#2ca02c", "cupy-unfused": "#98df8a"}
    for ax, rows, data, path in zip(axes[0], panels, datas, paths, strict=True):
        labels = [f"{g}  {c}" for g, c, _, _ in rows]
        ratios = [r for _, _, r, _ in rows]
        ys = range(len(rows))[::-1]
        ax.barh(list(ys), ratios, color=[colors.get(c, "#9467bd") for _, c, _, _ in rows])
        for y, r in zip(ys, ratios, strict=True):
            ax.text(r, y, f" {r:.2f}x", va="center", fontsize=7)
        ax.axvline(1.0, color="black", lw=1)
        ax.axvline(0.8, color="black", lw=0.8, ls="--")  # issue 5's 0.8x target for the MLP step
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        refs = sorted({ref for _, _, _, ref in rows})
        ax.set_xlabel(f"time / time of {', '.join(refs)} (median of per-round ratios; lower is faster; "
                      f"dashed: 0.8)", fontsize=8)
        ax.set_xlim(0, max(ratios + [1.0]) * 1.18)
        ax.set_title(_title(data, path), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/cpu_ratios.png"))
    args = ap.parse_args()
    print(f"wrote {plot(args.json, args.out)}")


if __name__ == "__main__":
    main()
