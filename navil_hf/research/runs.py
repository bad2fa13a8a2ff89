"""The runs table the scaling fits read: a CSV file of training runs (model size, data or compute, loss) and
the `Runs` arrays it becomes. Columns and their aliases: docs/research/scaling.md, "Runs files"."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError, one_line

MIN_RUNS = 5  # the Chinchilla law has five parameters


class RunsError(UsageError):
    """Unusable runs (a missing column, a non-positive value, too few runs): a one-line message."""


_ALIASES = {
    "N": ("n", "params", "parameters", "n_params", "num_params", "model_size"),
    "D": ("d", "tokens", "n_tokens", "num_tokens", "training_tokens"),
    "C": ("c", "flops", "compute", "training_flop", "training_flops"),
    "loss": ("loss",),
    "vit_params": ("vit_params", "n_v"),
    "llm_params": ("llm_params", "n_l"),
    "name": ("name", "run"),
}


@dataclass(frozen=True)
class Runs:
    """Training runs read from a CSV file (arrays of equal length; None where the file has no such column)."""

    loss: np.ndarray
    N: np.ndarray | None = None
    D: np.ndarray | None = None
    vit_params: np.ndarray | None = None
    llm_params: np.ndarray | None = None
    names: tuple[str, ...] = ()
    source: str = "runs"

    def __len__(self):
        return len(self.loss)

    @property
    def C(self):
        """Training compute 6 N D (None without N and D)."""
        return None if self.N is None or self.D is None else 6.0 * self.N * self.D

    def select(self, keep) -> Runs:
        """The runs where boolean mask `keep` is true."""
        keep = np.asarray(keep, dtype=bool)

        def pick(x):
            return None if x is None else x[keep]

        names = tuple(n for n, k in zip(self.names, keep) if k) if self.names else ()
        return Runs(
            pick(self.loss),
            pick(self.N),
            pick(self.D),
            pick(self.vit_params),
            pick(self.llm_params),
            names,
            self.source,
        )

    def drop_highest_loss(self, k: int) -> Runs:
        """Without the `k` runs of highest loss (Epoch drops 5 on the Chinchilla data: `losses <
        sorted(losses)[-5]`)."""
        if k <= 0:
            return self
        if k >= len(self):
            raise RunsError(f"{self.source}: cannot drop {k} of {len(self)} runs")
        return self.select(self.loss < np.sort(self.loss)[-k])


def _normalise(name):
    return "_".join(name.strip().lower().replace("-", " ").split())


def read_runs(path, *, kind: str = "fit") -> Runs:
    """The runs in CSV file `path` (columns: docs/research/scaling.md). `kind` says what the file must hold:
    "fit" N and D (or C) and loss, "joint" vit_params, llm_params and loss; "any" loss only."""
    if kind not in ("fit", "joint", "any"):
        raise ValueError(f"kind must be 'fit', 'joint' or 'any', not {kind!r}")
    path = Path(path)
    source = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise RunsError(f"{source}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise RunsError(f"{source}: not a CSV text file ({one_line(e)})") from None
    while rows and not any(cell.strip() for cell in rows[0]):
        rows.pop(0)
    if not rows:
        raise RunsError(f"{source}: empty file (expected a header row such as N,D,loss)")
    header = [_normalise(h) for h in rows[0]]
    columns = {}
    for key, aliases in _ALIASES.items():
        found = [i for i, h in enumerate(header) if h in aliases]
        if len(found) > 1:
            names = ", ".join(repr(rows[0][i].strip()) for i in found)
            raise RunsError(f"{source}: columns {names} all mean {key}; keep one")
        if found:
            columns[key] = found[0]
    if "loss" not in columns:
        raise RunsError(f"{source}: no 'loss' column (columns: {', '.join(h.strip() for h in rows[0])})")
    data = {key: [] for key in columns}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        for key, i in columns.items():
            cell = row[i].strip() if i < len(row) else ""
            if key == "name":
                data[key].append(cell)
                continue
            if not cell:
                raise RunsError(f"{source} line {line}: no value in column {rows[0][i].strip()!r}")
            try:
                value = float(cell)
            except ValueError:
                raise RunsError(
                    f"{source} line {line}: column {rows[0][i].strip()!r}: {cell!r} is not a number"
                ) from None
            if not (math.isfinite(value) and value > 0):
                raise RunsError(f"{source} line {line}: {rows[0][i].strip()} must be positive and finite, got {cell}")
            data[key].append(value)
    arrays = {key: np.asarray(values, dtype=float) for key, values in data.items() if key != "name"}
    N = arrays.get("N")
    if N is None and "vit_params" in arrays and "llm_params" in arrays:
        N = arrays["vit_params"] + arrays["llm_params"]
    D = arrays.get("D")
    if D is None and "C" in arrays and N is not None:
        D = arrays["C"] / (6.0 * N)
    if kind == "fit":
        if N is None:
            raise RunsError(f"{source}: no model-size column (N or params; or vit_params and llm_params)")
        if D is None:
            raise RunsError(f"{source}: no data column (D or tokens) and no compute column (C or flops)")
    if kind == "joint":
        for key in ("vit_params", "llm_params"):
            if key not in arrays:
                raise RunsError(f"{source}: no {key!r} column (the joint fit needs vit_params, llm_params and loss)")
    runs = Runs(
        arrays["loss"], N, D, arrays.get("vit_params"), arrays.get("llm_params"), tuple(data.get("name", ())), source
    )
    need = MIN_RUNS if kind == "fit" else 3 if kind == "joint" else 1
    if len(runs) < need:
        what = {"fit": "the 5-parameter fit", "joint": "the joint fit", "any": "a fit"}[kind]
        raise RunsError(f"{source}: {len(runs)} runs; {what} needs at least {need}")
    return runs
