"""Metrics to CSV, JSONL and (when installed) TensorBoard, and the loss-curve PNG drawn at the end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional


class MetricsLog:
    """Appends one row per logged step to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard).

    On resume, rows after the checkpoint's step are dropped first, so the files describe exactly
    the steps that the resumed run's weights went through.
    """

    def __init__(self, run_dir, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        rows = self.read(self.jsonl) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        self.columns: List[str] = []
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._rewrite_csv(rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard drops events at steps >= purge_step; the row of step resume_step is kept.
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                self.writer = None

    @staticmethod
    def read(path) -> List[Dict]:
        path = Path(path)
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
        return rows

    def _rewrite_csv(self, rows: List[Dict]) -> None:
        self.columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k != "epoch", k))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if self.columns:
                writer.writeheader()
                writer.writerows(rows)

    def log(self, row: Dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if set(row) - set(self.columns):
            self._rewrite_csv(self.read(self.jsonl))
        else:
            with self.csv.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss(rows: List[Dict], path, title: str = "training loss") -> Optional[Path]:
    """Draw loss against step as a PNG (matplotlib when installed, else PIL); None without data."""
    points = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not points:
        return None
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    except ImportError:
        return _plot_with_pil(points, path, title)


def _plot_with_pil(points, path: Path, title: str) -> Path:
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_pixel(x, y):
        return (margin + (x - x0) / (x1 - x0) * (width - 2 * margin), height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin))

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([to_pixel(x, y) for x, y in points] if len(points) > 1 else [to_pixel(*points[0])] * 2, fill=(31, 119, 180), width=2)
    draw.text((margin, 15), title, fill="black")
    draw.text((margin, height - margin + 8), f"step {x0:g}", fill="black")
    draw.text((width - margin - 80, height - margin + 8), f"step {x1:g}", fill="black")
    draw.text((5, margin - 12), f"{y1:.4g}", fill="black")
    draw.text((5, height - margin), f"{y0:.4g}", fill="black")
    image.save(path)
    return path
