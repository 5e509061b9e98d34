"""The ``hubmerge`` command as a user runs it: a separate process, exit codes, what it prints (main() in-process
where a test slows a step down)."""

from __future__ import annotations

import json

from support import cli


def run(*args, cwd=None):
    return cli(*args, cwd=cwd)


def test_plus_recipe_from_the_command_line(models, tmp_path):
    base = models.base()
    llama, alpaca = models.plus_recipe(base)
    done = run(llama, alpaca, "--base", base, "--out", tmp_path / "merged", "--format", "hf,pth")
    assert done.returncode == 0, done.stderr
    assert "merge" in done.stderr and "B/s" in done.stderr  # the progress bar, with a rate
    assert "adapters applied:" in done.stdout and "vocabulary: 297 tokens" in done.stdout
    assert "peak memory:" in done.stdout
    recipe = json.loads((tmp_path / "merged" / "hubmerge.json").read_text())
    assert set(recipe["formats"]) == {"hf", "pth"}
    assert (tmp_path / "merged" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "pth" / "consolidated.00.pth").is_file()


def test_default_output_folder_is_named_after_the_last_adapter(models, tmp_path):
    base = models.base()
    adapter = models.adapter(base, seed=40)
    done = run(adapter, "--base", base, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert (tmp_path / f"{adapter.name}-merged" / "model.safetensors").is_file()


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    base = models.base()
    llama, alpaca = models.plus_recipe(base)
    done = run(llama, alpaca, "--base", base, "--out", tmp_path / "merged", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("base: ") and "vocab 256" in lines[0]
    assert "adapter 1:" in lines[1] and "2023 layout" in lines[1] and "r=8" in lines[1] and "vocab 296" in lines[1]
    assert "adapter 2:" in lines[2] and "r=16" in lines[2] and "vocab 297" in lines[2]
    assert "vocab 297" in lines[3]
    assert list(tmp_path.iterdir()) == []


def test_errors_are_one_line_with_exit_status_1(models, tmp_path):
    base = models.base()
    llama, alpaca = models.plus_recipe(base)
    done = run(alpaca, llama, "--base", base, "--out", tmp_path / "merged")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "reverse the order" in done.stderr and list(tmp_path.iterdir()) == []


def test_help_lists_every_command():
    done = run("--help")
    assert done.returncode == 0 and "--base" in done.stdout and "other commands:" in done.stdout


def test_the_summary_times_the_whole_command(models, tmp_path, monkeypatch, capsys):
    """The time printed is what the user waited: what runs before the merge itself (hashing the inputs while torch
    imports, a streamed push's head start) counts too."""
    import time

    from hubmerge import cli as hubmerge_cli
    from hubmerge.verification import hashing

    base = models.base()
    adapter = models.adapter(base, seed=41)
    prehash = hashing.prehash

    def slow_prehash(*args, **kw):
        time.sleep(1.5)
        return prehash(*args, **kw)

    monkeypatch.setattr(hashing, "prehash", slow_prehash)
    assert hubmerge_cli.main([str(adapter), "--base", str(base), "--out", str(tmp_path / "merged")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time: "))
    assert float(line.split()[1]) >= 1.5, line
