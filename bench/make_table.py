"""An index of the benchmark results in bench/results/*.json, or every table in them, as Markdown.

The index has one row per result file: which benchmark wrote it, with which command, when and on what
machine. `--full` adds each file's tables, read defensively, whatever wrote it: a top-level "summary" dict
(name -> value) and other top-level scalars become rows of one summary table; a "rows" list of dicts
becomes a table of its own (a megabyte and more for this project's results: for grepping, not reading).
Every table says which machine and date the numbers come from ("machine", "host", "platform", "device" /
"date", "timestamp", "created", ... when the file has them; else the file's mtime).

    .venv/bin/python -m bench.make_table                            # print the index
    .venv/bin/python -m bench.make_table --out bench/RESULTS.md     # write it (what `make bench-table` does)

The README's Benchmarks section is written by hand (where each target stands); bench/HISTORY.md holds
every measurement with its command.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MACHINE_KEYS = ("machine", "host", "hardware", "platform", "device", "env", "environment")
DATE_KEYS = ("date", "timestamp", "created", "created_at", "time", "datetime", "when", "finished")
NAME_KEYS = ("benchmark", "name", "title", "bench")
META_KEYS = set(MACHINE_KEYS) | set(DATE_KEYS) | set(NAME_KEYS) | {"summary", "rows", "notes", "note",
                                                                      "description", "config", "args"}
MAX_COLUMNS = 10


def fmt(value: Any) -> str:
    """A cell: numbers to 4 significant digits, short JSON for the rest, pipes escaped."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = "n/a" if not math.isfinite(value) else (f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}")
    elif value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    elif isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        text = ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    else:
        text = json.dumps(value, default=str)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= 80 else text[:77] + "..."


def machine_of(data: dict) -> str:
    for key in MACHINE_KEYS:
        value = data.get(key)
        if not value:
            continue
        if isinstance(value, dict):
            parts = []
            for k in ("name", "cpu", "cpu_model", "processor", "model", "cores", "n_cpus", "cpu_count", "threads",
                      "torch_threads", "gpu", "device", "ram_gb", "memory_gb", "torch", "python", "os", "system"):
                if value.get(k) not in (None, ""):
                    parts.append(f"{k} {fmt(value[k])}" if k not in ("name", "cpu", "cpu_model", "processor",
                                                                    "model") else fmt(value[k]))
            return ", ".join(parts) or fmt(value)
        return fmt(value)
    return "machine not recorded"


def date_of(data: dict, path: Path) -> str:
    machine = next((data[k] for k in MACHINE_KEYS if isinstance(data.get(k), dict)), {})
    for key in DATE_KEYS:
        value = data.get(key, machine.get(key))
        if value in (None, ""):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1e8:
            return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d")
        if isinstance(value, str):
            return value[:10] if value[:4].isdigit() and len(value) >= 10 else fmt(value)
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d") + " (file)"


def name_of(data: dict, path: Path) -> str:
    for key in NAME_KEYS:
        if isinstance(data.get(key), str) and data[key].strip():
            return data[key].strip()
    return path.stem


def flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    """name -> value pairs of a summary; nested dicts become dotted names."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r + [""] * (len(header) - len(r))) + " |" for r in rows]
    return "\n".join(lines)


def load(results: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    files, problems = [], []
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{path.name}: not readable JSON ({e})")
            continue
        if isinstance(data, list):               # a bare list of rows
            data = {"rows": data}
        if not isinstance(data, dict):
            problems.append(f"{path.name}: top level is {type(data).__name__}, expected an object")
            continue
        files.append((path, data))
    return files, problems


def index(results: Path = RESULTS) -> str:
    """One row per result file: benchmark, command, date, machine."""
    files, problems = load(results)
    if not files:
        return f"_No benchmark results yet (nothing in {results.name}/)._\n"
    def command(data: dict) -> str:       # in full: the index is where a figure's command is looked up
        text = " ".join(str(data.get("command") or "").split()).replace("|", "\\|")
        return f"`{text}`" if text else ""

    rows = [[f"`{path.name}`", fmt(name_of(data, path)), command(data), date_of(data, path), machine_of(data)]
            for path, data in files]
    text = table(["file", "benchmark", "command", "date", "machine"], rows)
    if problems:
        text += "\n\n_Skipped: " + "; ".join(fmt(p) for p in problems) + "_"
    return text + "\n"


def markdown(results: Path = RESULTS) -> str:
    files, problems = load(results)
    if not files:
        return f"_No benchmark results yet (nothing in {results.name}/)._\n"
    summary_rows: list[list[str]] = []
    sections: list[str] = []
    for path, data in files:
        name, machine, date = name_of(data, path), machine_of(data), date_of(data, path)
        pairs: list[tuple[str, Any]] = []
        if isinstance(data.get("summary"), dict):
            flatten("", data["summary"], pairs)
        elif data.get("summary") is not None:
            pairs.append(("summary", data["summary"]))
        tables: list[tuple[str, list]] = []
        if isinstance(data.get("rows"), list) and data["rows"]:
            tables.append((name, data["rows"]))
        for k, v in data.items():              # whatever else a writer put at the top level
            if k in META_KEYS or v is None:
                continue
            if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                tables.append((f"{name}: {k}", v))       # e.g. "results": [{...}, ...]
            elif isinstance(v, dict):
                flatten(k, v, pairs)                    # e.g. "metrics": {"fg_iou": 0.81}
            else:
                pairs.append((k, v))                    # e.g. "fg_iou": 0.81
        for metric, value in pairs:
            summary_rows.append([fmt(name), fmt(metric), fmt(value), machine, date])
        for title, rows in tables:
            dict_rows = [r for r in rows if isinstance(r, dict)]
            if dict_rows:
                columns: list[str] = []
                for r in dict_rows:
                    columns += [k for k in r if k not in columns]
                dropped = columns[MAX_COLUMNS:]
                columns = columns[:MAX_COLUMNS]
                body = [[fmt(r.get(c)) for c in columns] for r in dict_rows]
                note = f" (columns not shown: {', '.join(dropped)})" if dropped else ""
                sections.append(f"**{fmt(title)}** ({machine}; {date}){note}\n\n" + table(columns, body))
            else:
                sections.append(f"**{fmt(title)}** ({machine}; {date})\n\n"
                                + table(["value"], [[fmt(r)] for r in rows]))
    parts = []
    if summary_rows:
        parts.append(table(["benchmark", "metric", "value", "machine", "date"], summary_rows))
    parts += sections
    if problems:
        parts.append("_Skipped: " + "; ".join(fmt(p) for p in problems) + "_")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    ap.add_argument("--full", action="store_true", help="every file's tables, not only the index")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown into this file instead of stdout")
    args = ap.parse_args(argv)
    text = markdown(args.results) if args.full else index(args.results)
    if args.out:
        args.out.write_text("# Benchmark results\n\nGenerated by `python -m bench.make_table"
                            + (" --full" if args.full else "") + "` from `bench/results/*.json`; "
                            "the README's Benchmarks section and `bench/HISTORY.md` say what the figures mean."
                            "\n\n" + text)
        print(f"(written into {args.out})", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
