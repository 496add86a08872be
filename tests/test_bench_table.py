"""bench.make_table: the index of result files that `make bench-table` writes to bench/RESULTS.md."""
import json

from bench import make_table


def test_index_names_each_file_its_command_date_and_machine(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps({
        "benchmark": "speed", "command": "python -m bench.speed --threads 2 | tee",
        "machine": {"cpu": "Xeon", "cores": 2, "date": "2026-12-01T10:00:00+00:00"}, "summary": {"p50": 1.5}}))
    (tmp_path / "broken.json").write_text("{not json")
    out = tmp_path / "RESULTS.md"

    assert make_table.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if "`speed.json`" in line)
    assert "`python -m bench.speed --threads 2 \\| tee`" in row      # the whole command, pipe escaped
    assert "2026-12-01" in row and "Xeon" in row and "cores 2" in row  # the date from the machine record
    assert "broken.json: not readable JSON" in text
    assert "p50" not in text                                            # tables only with --full

    make_table.main(["--results", str(tmp_path), "--out", str(out), "--full"])
    assert "p50" in out.read_text()
