"""Turn jobs.eval_edit result JSONs into one markdown table: python -m jobs.eval_table A.json B.json [--against A].

One row per JSON, labelled by the `--label` given at eval time: steps, examples, PSNR per family group (global,
local, reference), the autoencoder's round-trip ceiling, instruction accuracy, copy-paste PSNR (identity edits
against their source), Sobel edge F1 on recolour edits, the step-2 reuse hit rate where the editor reported one,
and seconds. `--against LABEL` adds each row's PSNR (global families) and accuracy minus that row's: the causal
editing issue's targets are the session student within 1 dB of the teacher on global families and no more than 0.02
below it in instruction accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MISSING = "n/a"


class ResultError(ValueError):
    """A result JSON is unreadable or lacks what the table needs."""


def load_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultError(f"cannot read eval result {path}: {exc}") from exc
    if not isinstance(result, dict):
        raise ResultError(f"{path} is not a jobs.eval_edit result (it holds no JSON object)")
    missing = [k for k in ("steps", "n", "overall", "global", "local", "reference") if k not in result]
    if missing:
        raise ResultError(f"{path} is not a jobs.eval_edit result (missing {', '.join(missing)})")
    result.setdefault("label", result.get("model", path.stem))
    return result


def _get(result: dict[str, Any], *keys: str) -> Any:
    """A nested value, or None where any level is absent."""
    node: Any = result
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def hit_rate_cell(step_reuse: Any) -> str:
    """The share of step-2 block passes served from reuse, labelled when the policy is a timing-only one."""
    rate = step_reuse.get("hit_rate") if isinstance(step_reuse, dict) else None
    if not isinstance(rate, (int, float)):
        return MISSING
    # The static policy reuses without checking the residual: its rows are timings, never quality results.
    return f"{rate:.3f}" + (" (static: timing only)" if step_reuse.get("policy") == "static" else "")


def attention_mode(result: dict[str, Any]) -> str:
    mode = result.get("causal") or _get(result, "model_info", "causal") or "full"
    return f"{mode} (training-free)" if _get(result, "model_info", "training_free") else mode


def _number(value: Any, digits: int, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _delta(result: dict[str, Any], base: dict[str, Any], *keys: str) -> float | None:
    mine, theirs = _get(result, *keys), _get(base, *keys)
    return mine - theirs if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) else None


Column = tuple[str, Callable[[dict[str, Any]], str]]

COLUMNS: tuple[Column, ...] = (
    ("model", lambda r: str(r["label"])),
    ("mode", attention_mode),
    ("steps", lambda r: str(r["steps"])),
    ("n", lambda r: str(r["n"])),
    ("PSNR global", lambda r: _number(_get(r, "global", "psnr"), 2)),
    ("PSNR local", lambda r: _number(_get(r, "local", "psnr"), 2)),
    ("PSNR reference", lambda r: _number(_get(r, "reference", "psnr"), 2)),
    ("TAEF2 ceiling", lambda r: _number(_get(r, "overall", "taef2_psnr"), 2)),
    ("instruction accuracy", lambda r: _number(_get(r, "overall", "instruction_accuracy"), 3)),
    ("copy-paste PSNR", lambda r: _number(_get(r, "behaviour", "copy_paste", "psnr_vs_source"), 2)),
    ("edge F1", lambda r: _number(_get(r, "behaviour", "structure_transfer", "edge_f1"), 3)),
    ("step-2 reuse hit rate", lambda r: hit_rate_cell(r.get("step_reuse"))),
    ("seconds", lambda r: _number(r.get("seconds"), 1)),
    ("s / edit", lambda r: _number(r.get("seconds_per_edit"), 3)),
)


def against_columns(base: dict[str, Any]) -> tuple[Column, ...]:
    label = base["label"]
    return (
        (f"delta PSNR global vs {label}", lambda r: _number(_delta(r, base, "global", "psnr"), 2, signed=True)),
        (f"delta accuracy vs {label}",
         lambda r: _number(_delta(r, base, "overall", "instruction_accuracy"), 3, signed=True)),
    )


def table(results: Sequence[dict[str, Any]], against: str | None = None) -> str:
    """The markdown table of eval results; `against` names the row the delta columns subtract."""
    columns = COLUMNS
    if against is not None:
        bases = [r for r in results if r["label"] == against]
        if len(bases) != 1:
            labels = ", ".join(repr(r["label"]) for r in results)
            raise ResultError(f"--against {against!r} must name exactly one result's label; labels: {labels}")
        columns = COLUMNS + against_columns(bases[0])
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written from jobs.eval_edit's output")
    parser.add_argument("--against", default=None, metavar="LABEL",
                        help="add PSNR (global) and accuracy deltas against the result with this label")
    args = parser.parse_args(argv)
    try:
        text = table([load_result(p) for p in args.results], args.against)
    except ResultError as exc:
        parser.error(str(exc))
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
