"""Tests for the benchmarks' results files: the recorded command re-runs the benchmark."""

from __future__ import annotations

import json

from benchmarks import record


def test_a_benchmark_script_is_recorded_as_a_module_command() -> None:
    script = str(record.REPO_ROOT / "benchmarks" / "cub_transfer.py")
    command = record.command_line([script, "--set", "train.seed=1", "--name", "x"])
    assert command == "python -m benchmarks.cub_transfer --set train.seed=1 --name x"


def test_other_commands_are_recorded_as_run() -> None:
    assert record.command_line(["tools/other.py", "-v"]) == "python tools/other.py -v"


def test_a_result_is_written_whole_with_its_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    script = str(record.REPO_ROOT / "benchmarks" / "hasy_recipe.py")
    monkeypatch.setattr("sys.argv", [script, "default"])
    path = record.record_result("demo", {"top1": 0.5})
    document = json.loads(path.read_text())
    assert path == tmp_path / "results" / "demo.json"
    assert document["top1"] == 0.5 and document["benchmark"] == "demo"
    assert document["command"] == "python -m benchmarks.hasy_recipe default"
    assert [p.name for p in path.parent.iterdir()] == ["demo.json"]  # No temporary left.


def test_the_machine_names_the_processor_model(monkeypatch, tmp_path) -> None:
    import builtins

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t: avx512_bf16\n")
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert record.cpu_name() == "AMD EPYC 9R14"
    assert "AMD EPYC 9R14" in record.machine_description()
    cpuinfo.unlink()  # No /proc/cpuinfo: what platform says.
    monkeypatch.setattr(record.platform, "processor", lambda: "arm")
    assert record.cpu_name() == "arm"
