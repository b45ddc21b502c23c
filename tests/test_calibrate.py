"""``edge-ensemble calibrate``: the selection rule, the development file, the config table it writes and the next
``run`` that picks it up, on the tiny generated models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner, Result

from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.cli import cli
from edge_ensemble.config import load_config, resolve_settings
from edge_ensemble.errors import UsageError
from edge_ensemble.eval.calibrate import (
    CalibrationResult, Score, Setting, Sweep, _run_dropping, _scores, dropped_note, load_dev_file, normalize_text, pool, select,
    sweep_table,
    write_calibration)
from edge_ensemble.eval.runner import read_records
from edge_ensemble.eval.configs import EngineConfig
from edge_ensemble.eval.report import Summary
from edge_ensemble.sources import Catalog

MAX_TOKENS = 12
N_CTX = 256
COMMON = ["--max-tokens", str(MAX_TOKENS), "--n-ctx", str(N_CTX), "--threads", "1"]
PROMPTS = ["Hi", "Why is the sky blue?", "Name three colours."]


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args)


def assert_usage_error(result: Result, *needles: str) -> None:
    """Exit 2, one line `error: ...` on stderr that holds every needle, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config" / "config.toml"
    path.parent.mkdir()
    path.write_text('# my settings\nthreads = 1\nn_ctx = 256\n')
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(path))
    return path


@pytest.fixture
def members(tiny_bpe: Path, tiny_bpe_b: Path) -> list[str]:
    return [str(tiny_bpe), str(tiny_bpe_b)]


def model_args(members: list[str]) -> list[str]:
    return [a for m in members for a in ("-m", m)]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- the selection rule, on hand-made scores ------------------------------------------------------------------


def score(name: str, correct: int, seconds: float, n: int = 100) -> Score:
    values = {"policy": "single"} if name.startswith("single") else {"policy": "safe", "weights": [2.0, 1.0], "gate": 0.5}
    summary = Summary("t", name, n, correct, correct / n, 0.0, 1.0, 10.0, None, seconds_per_answer=seconds)
    return Score(Setting(name, values), summary)


def test_the_drafter_wins_ties_and_near_misses() -> None:
    drafter = score("single:d", 30, 1.0)
    tie, worse = score("safe a", 30, 0.5), score("safe b", 29, 0.1)
    assert select([drafter, tie, worse], min_gain=1) is drafter  # equal accuracy: the drafter, even if slower
    better, best_slow, best_fast = score("safe c", 31, 3.0), score("safe d", 33, 3.0), score("safe e", 33, 2.0)
    assert select([drafter, tie, better], min_gain=1) is better
    assert select([drafter, better, best_slow, best_fast], min_gain=1) is best_fast  # most right, then faster
    assert select([drafter, better], min_gain=2) is drafter  # one item is not enough when two are asked for
    assert select([drafter, tie], min_gain=0) is tie  # min_gain 0: a tie goes to the faster
    assert select([drafter, score("safe f", 30, 1.0)], min_gain=0) is drafter  # ...and a full tie to the drafter


def test_normalize_text() -> None:
    assert normalize_text("  The answer is: **Paris**.\n") == "paris"
    assert normalize_text("Answer: «ＢＬＵＥ»") == "«blue»"
    assert normalize_text("two  words") == "two words"


# -- the development file -------------------------------------------------------------------------------------


def test_dev_file_scores_numbers_and_text(tmp_path: Path) -> None:
    task = load_dev_file(write_jsonl(tmp_path / "dev.jsonl", [
        {"prompt": "2+2?", "answer": 4}, {"prompt": "Capital of France?", "answer": "Paris", "id": "fr"}, ""]))
    a, b = task.items()
    assert (a.id, a.gold, b.id) == ("1", "4", "fr")
    assert task.score(a, task.extract(a, "2 plus 2 is 4, so the answer is 4.0."))[0]
    assert not task.score(a, task.extract(a, "The answer is 5"))[0]
    assert task.score(b, task.extract(b, "Paris."))[0]
    assert not task.score(b, task.extract(b, "It is Paris, of course."))[0]
    assert task.build_messages(b) == [{"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize("rows, needles", [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "answer": }'], ["dev.jsonl:2", "not valid JSON"]),
    (['{"prompt": "a"}'], ["dev.jsonl:1", "missing 'answer'"]),
    (['["a", "b"]'], ["dev.jsonl:1", "expected an object"]),
    (['{"prompt": "", "answer": "b"}'], ["dev.jsonl:1", "prompt must be a non-empty string"]),
    (['{"prompt": "a", "answer": null}'], ["dev.jsonl:1", "answer must be"]),
    (['{"prompt": "a", "answer": 1, "id": 7}', '{"prompt": "b", "answer": 2, "id": 7}'], ["dev.jsonl:2", "twice"]),
    ([], ["holds no items"]),
])
def test_bad_dev_file_is_one_line_and_writes_nothing(rows: list[str], needles: list[str], tmp_path: Path,
                                                     config_file: Path, members: list[str]) -> None:
    dev = write_jsonl(tmp_path / "dev.jsonl", rows)
    before = config_file.read_text()
    result = invoke(["calibrate", *model_args(members), "--file", str(dev), "--out", str(tmp_path / "out"), *COMMON])
    assert_usage_error(result, *needles)
    assert config_file.read_text() == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needles", [
    (["--task", "nope"], ["unknown task 'nope'", "gsm8k"]),
    ([], ["--task NAME or --file"]),
    (["--task", "gsm8k", "--file", "x.jsonl"], ["either --task NAME or --file"]),
    (["--file", "missing.jsonl"], ["cannot read development file", "missing.jsonl"]),
    (["--task", "gsm8k", "--drafter-weights", "2,0"], ["--drafter-weights", "above 0.0", "got (2.0, 0.0)"]),
    (["--task", "gsm8k", "--drafter-weights", "2,x"], ["--drafter-weights", "'2,x'"]),
    (["--task", "gsm8k", "--gates", "0.5,1.5"], ["--gates", "between 0.0 and 1.0", "got (0.5, 1.5)"]),
    (["--task", "gsm8k", "--gates", "-0.1"], ["--gates", "between 0.0 and 1.0"]),
    (["--task", "gsm8k", "--sharpen-modes", "sharpest"], ["--sharpen-modes", "prefix, geometric, none"]),
    (["--task", "gsm8k", "--min-gain", "-1"], ["--min-gain", "between 0"]),
    (["--task", "gsm8k", "--drop-level", "0.9"], ["--drop-level", "above 0.0 and at most 0.5", "got 0.9"]),
])
def test_bad_usage_is_one_line_and_writes_nothing(args: list[str], needles: list[str], tmp_path: Path,
                                                  config_file: Path, members: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = config_file.read_text()
    assert_usage_error(invoke(["calibrate", *model_args(members), *args, *COMMON]), *needles)
    assert config_file.read_text() == before and not (tmp_path / "results").exists()


def test_the_api_checks_the_sweep_too() -> None:
    with pytest.raises(UsageError, match="gates must be a list of numbers between 0.0 and 1.0"):
        Sweep(gates=(0.5, 2.0)).validate()
    with pytest.raises(UsageError, match="drafter_weights"):
        Sweep(drafter_weights=()).validate()


# -- end to end on the tiny models ----------------------------------------------------------------------------


def outputs(members: list[str], config: EnsembleConfig, prompts: list[str]) -> list[str]:
    """What one setting answers, made as the harness makes it (fresh prefill for every answer)."""
    with Ensemble(members, config=config) as ens:
        setting = EngineConfig("x", ens, config.validate(len(members)))
        return [setting.generate([{"role": "user", "content": p}], MAX_TOKENS)["text"] for p in prompts]


def test_calibrate_writes_a_config_the_next_run_picks_up(tmp_path: Path, config_file: Path,
                                                         members: list[str]) -> None:
    base = EnsembleConfig(n_ctx=N_CTX, n_threads=1)
    ensemble_says = outputs(members, replace(base, policy="safe", weights=(1.0, 1.0), gate=0.5), PROMPTS)
    drafter_says = outputs(members[:1], replace(base, policy="single"), PROMPTS)
    assert all(t.strip() for t in ensemble_says) and ensemble_says != drafter_says  # the test needs both
    # References the ensemble setting meets: an ensemble setting must win, and the drafter cannot get all three.
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ensemble_says)])
    out = tmp_path / "out"
    args = ["calibrate", *model_args(members), "--file", str(dev), "--out", str(out), "--drafter-weights", "1,3",
            "--gates", "0.5", "--json", *COMMON]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chosen"] != f"single:tiny-bpe" and data["policy"] == "safe" and data["items"] == 3
    assert [row["setting"] for row in data["evidence"]] == ["single:tiny-bpe", "safe w=1 gate=0.5", "safe w=3 gate=0.5"]
    chosen = next(row for row in data["evidence"] if row["setting"] == data["chosen"])
    assert chosen["correct"] == 3 and 0 < chosen["ci95"][0] < chosen["ci95"][1] == 1.0
    assert data["evidence"][0]["correct"] < 3 and data["config_file"] == str(config_file)
    assert "chosen: safe w=" in result.stderr and "calibrate.png" not in result.stderr
    assert (out / "calibrate.png").exists()
    assert f"| {data['chosen']} | 3/3 | 100.0% |" in (out / "summary.md").read_text()
    records = (out / f"{load_dev_file(dev).name}.jsonl").read_text().splitlines()
    assert len(records) == 9

    # The file keeps what it had, and gains the table.
    text = config_file.read_text()
    assert text.startswith("# my settings\nthreads = 1\nn_ctx = 256\n")
    calibration = next(iter(load_config(config_file).calibrations.values()))
    assert calibration.values["policy"] == "safe" and calibration.items == 3

    # The next run of the same member set uses it, and says so.
    run = invoke(["run", *model_args(members), "--max-tokens", "4", "--json", "Hi"])
    assert run.exit_code == 0, run.output
    config = json.loads(run.stdout)["config"]
    assert config["policy"] == "safe" and config["weights"] == data["weights"] and config["gate"] == data["gate"]
    assert config["calibrated"]["source"].startswith(f"config file {config_file} [calibrated.members.")
    # the sharpening it was measured with is part of the setting, so the run applies that one
    assert config["calibrated"]["settings"] == {"policy": "safe", "weights": data["weights"], "gate": data["gate"],
                                                "sharpen": data["sharpen"]}
    assert config["calibrated"]["date"] == data["date"] and config["calibrated"]["dev_set"] == data["dev_set"]
    # A flag still wins over the calibration, and the run says which keys it overrode.
    config = json.loads(invoke(["run", *model_args(members), "--max-tokens", "4", "--gate", "0.9", "--json", "Hi"]).stdout)["config"]
    assert config["gate"] == 0.9 and config["calibrated"]["overridden"] == ["gate"]
    # The figures line says the settings were calibrated; another member set is not.
    assert "calibrated 20" in invoke(["run", *model_args(members), "--max-tokens", "4", "Hi"]).stderr
    other = json.loads(invoke(["run", "-m", members[1], "-m", members[0], "--max-tokens", "4", "--json", "Hi"]).stdout)
    assert other["config"]["calibrated"] is None and other["config"]["weights"] is None

    # A rerun resumes from the records (nothing new is generated) and replaces the table, not adds one.
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert len((out / f"{load_dev_file(dev).name}.jsonl").read_text().splitlines()) == 9
    assert config_file.read_text().count("[calibrated.members.") == 1


def test_the_drafter_alone_is_kept_when_no_setting_beats_it(tmp_path: Path, config_file: Path,
                                                            members: list[str]) -> None:
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": p, "answer": 987654321} for p in PROMPTS])
    result = invoke(["calibrate", *model_args(members), "--file", str(dev), "--out", str(tmp_path / "out"),
                     "--drafter-weights", "2", "--gates", "0.4", "--no-plot", *COMMON])
    assert result.exit_code == 0, result.output
    assert "<- chosen" in next(line for line in result.stdout.splitlines() if line.startswith("single:tiny-bpe"))
    assert "chosen: the drafter alone, 0/3 right" in result.stderr
    config = json.loads(invoke(["run", *model_args(members), "--max-tokens", "4", "--json", "Hi"]).stdout)
    assert config["policy"] == "single" and config["config"]["calibrated"]["settings"] == {"policy": "single"}


def test_calibrate_on_an_eval_task_without_writing(tmp_path: Path, config_file: Path, members: list[str]) -> None:
    before = config_file.read_text()
    result = invoke(["calibrate", *model_args(members), "--task", "gsm8k", "--limit", "1", "--drafter-weights", "2",
                     "--gates", "0.5", "--no-write", "--no-plot", "--out", str(tmp_path / "out"), *COMMON])
    assert result.exit_code == 0, result.output
    assert "gsm8k items 0-0" in result.stderr and "not written" in result.stderr
    assert config_file.read_text() == before


def test_a_resumed_calibration_must_match_the_options(tmp_path: Path, config_file: Path, members: list[str]) -> None:
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "Hi", "answer": 1}])
    args = ["calibrate", *model_args(members), "--file", str(dev), "--out", str(tmp_path / "out"),
            "--drafter-weights", "2", "--gates", "0.5", "--no-plot", "--no-write", *COMMON]
    assert invoke(args).exit_code == 0
    assert_usage_error(invoke([*args, "--n-ctx", "512"]), "holds a calibration made with n_ctx = ")
    assert "(this run: 512)" in invoke([*args, "--n-ctx", "512"]).output
    # Answers decoded side by side share their seconds (the tie-break): not mixed with answers made alone.
    assert_usage_error(invoke([*args, "--parallel", "2"]), "holds a calibration made with parallel = 1 (this run: 2)")
    # An option no setting's policy reads (eager's threshold) changes no record: the run resumes.
    assert invoke([*args, "--threshold", "2.5"]).exit_code == 0


# -- the config table -----------------------------------------------------------------------------------------


def fake_result(key: tuple[str, str], gate: float) -> CalibrationResult:
    drafter, chosen = score("single:d", 1, 1.0, n=3), score("safe w=2 gate=0.5", 2, 2.0, n=3)
    chosen = replace(chosen, setting=Setting(chosen.setting.name, {"policy": "safe", "weights": [2.0, 1.0], "gate": gate}))
    return CalibrationResult(key, "dev.jsonl items 0-2", 3, "2026-01-02T03:04:05+00:00", (drafter, chosen), chosen,
                             Path("out/x.jsonl"))


def test_write_calibration_replaces_its_own_table_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('preset = "tiny"\n\n[calibrated.presets.coder]\npolicy = "single"\n')
    write_calibration(fake_result(("presets", "tiny"), 0.4), path)
    write_calibration(fake_result(("presets", "tiny"), 0.6), path)
    write_calibration(fake_result(("members", "/a b/x.gguf + y"), 0.3), path)
    config = load_config(path)
    assert config.values == {"preset": "tiny"}
    assert {k: dict(c.values) for k, c in config.calibrations.items()} == {
        ("presets", "coder"): {"policy": "single"},
        ("presets", "tiny"): {"policy": "safe", "weights": (2.0, 1.0), "gate": 0.6},
        ("members", "/a b/x.gguf + y"): {"policy": "safe", "weights": (2.0, 1.0), "gate": 0.3}}
    assert path.read_text().count("[calibrated.presets.tiny]") == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "config.toml"]  # no temporary file left behind
    # Rewriting the first table keeps the provenance comment of the table after it, with a blank line before it.
    path.write_text(path.read_text().replace("\n# written by edge-ensemble calibrate 2026-01-02T03:04:05+00:00: dev.jsonl"
                                             " items 0-2\n[calibrated.members.",
                                             "\n\n# written by edge-ensemble calibrate 2026-01-02T03:04:05+00:00: "
                                             "dev.jsonl items 0-2\n\n[calibrated.members."))
    write_calibration(fake_result(("presets", "tiny"), 0.5), path)
    lines = path.read_text().splitlines()
    assert sum(line.startswith("# written by edge-ensemble calibrate") for line in lines) == 2
    at = next(i for i, line in enumerate(lines) if line.startswith("[calibrated.members."))
    assert lines[at - 1] == "" and lines[at - 2].startswith("# written by edge-ensemble calibrate 2026-01-02")


def test_a_calibration_written_into_the_catalog_is_the_presets_default(tmp_path: Path) -> None:
    """What benchmarks/calibrate_presets.py does for the shipped presets: the table it writes into presets.toml
    is what the next run of that preset uses, and says where it came from."""
    catalog_path = tmp_path / "presets.toml"
    catalog_path.write_text('[presets.cal]\nmembers = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]\n')
    write_calibration(fake_result(("presets", "cal"), 0.3), catalog_path, table=("presets", "cal", "calibrated"))
    settings = resolve_settings({"preset": "cal"}, load_config(tmp_path / "none.toml"), Catalog.load(catalog_path))
    assert (settings.ensemble.policy, settings.ensemble.weights, settings.ensemble.gate) == ("safe", (2.0, 1.0), 0.3)
    assert settings.calibration is not None and "[presets.cal.calibrated]" in settings.calibration.source
    assert settings.calibration.date == "2026-01-02T03:04:05+00:00"


def test_the_preset_script_writes_each_set_and_the_pooled_choice(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_presets.py"
    spec = importlib.util.spec_from_file_location("calibrate_presets", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a, b = fake_result(("presets", "tiny"), 0.4), replace(fake_result(("presets", "tiny"), 0.4), dev_set="other items 0-2")
    pooled = pool([a, b])
    report = module._report("tiny", [a, b], pooled, tmp_path)
    assert (tmp_path / "summary.md").read_text() == report
    heads = [line for line in report.splitlines() if line.startswith("## ")]
    assert heads == ["## dev.jsonl items 0-2", "## other items 0-2",
                     "## dev.jsonl items 0-2 + other items 0-2 (pooled: the choice)"]
    assert report.rstrip().endswith(f"chosen: {pooled.chosen.setting.name}")
    assert (tmp_path / "calibrate.png").stat().st_size > 1000


def test_a_bad_calibration_table_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[calibrated.presets.tiny]\ngate = 3\n')
    with pytest.raises(UsageError, match=r"\[calibrated.presets.tiny\]: gate must be a number between 0.0 and 1.0"):
        load_config(path)
    path.write_text('[calibrated.presets.tiny]\ncolour = "red"\n')
    with pytest.raises(UsageError, match="unknown key 'colour'"):
        load_config(path)


def test_pool_adds_up_the_development_sets() -> None:
    a, b = fake_result(("presets", "tiny"), 0.4), fake_result(("presets", "tiny"), 0.4)
    pooled = pool([a, replace(b, dev_set="other items 0-2", date="2026-01-03T00:00:00+00:00")])
    assert pooled.items == 6 and pooled.dev_set == "dev.jsonl items 0-2 + other items 0-2"
    assert pooled.date == "2026-01-03T00:00:00+00:00"  # the calibration is as of its last set
    assert [(s.summary.correct, s.summary.n) for s in pooled.scores] == [(2, 6), (4, 6)]
    assert pooled.chosen is pooled.scores[1]
    with pytest.raises(UsageError, match="one ensemble"):
        pool([a, fake_result(("presets", "coder"), 0.4)])


def test_pool_never_takes_a_setting_that_loses_on_one_set() -> None:
    """+10 items on one set and -4 on another (of 200) is +6 pooled, but loses to the drafter on the second set
    by more than one item per hundred: the drafter alone is kept. -2 of 200 is within the allowance."""
    def result(task: str, drafter: int, setting: int) -> CalibrationResult:
        scores = (score("single:d", drafter, 1.0, n=200), score("safe w=2 gate=0.5", setting, 2.0, n=200))
        return CalibrationResult(("presets", "tiny"), f"{task} items 0-199", 200, "2026-01-02", scores, scores[0],
                                 Path("out/x.jsonl"))

    lossy = pool([result("arc", 50, 60), result("gsm8k", 40, 36)])
    assert lossy.chosen is lossy.scores[0]
    within = pool([result("arc", 50, 60), result("gsm8k", 40, 38)])
    assert within.chosen is within.scores[1]


def test_precedence_flag_user_calibration_file_keys_shipped_calibration(tmp_path: Path) -> None:
    extra = tmp_path / "catalog.toml"
    extra.write_text('[presets.cal]\nmembers = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]\n'
                     '[presets.cal.calibrated]\npolicy = "safe"\nweights = [3.0, 1.0]\ngate = 0.3\n'
                     'date = "2026-01-01"\ndev_set = "gsm8k items 0-199"\n')
    catalog = Catalog.load(extra)
    path = tmp_path / "config.toml"
    path.write_text('preset = "cal"\ngate = 0.6\n')
    settings = resolve_settings({}, load_config(path), catalog)
    assert (settings.ensemble.weights, settings.ensemble.gate) == ((3.0, 1.0), 0.6)  # the file's key beats the preset's
    assert settings.calibration is not None and settings.calibration.applied == ("policy", "weights")
    assert "[presets.cal.calibrated]" in settings.calibration.source
    write_calibration(fake_result(("presets", "cal"), 0.4), path)
    settings = resolve_settings({}, load_config(path), catalog)
    assert (settings.ensemble.weights, settings.ensemble.gate) == ((2.0, 1.0), 0.4)  # the user's calibration beats both
    settings = resolve_settings({"gate": "0.8"}, load_config(path), catalog)
    assert settings.ensemble.gate == 0.8 and settings.calibration.describe()["overridden"] == ["gate"]
    path.write_text('preset = "cal"\n[calibrated.presets.cal]\nweights = [2.0, 1.0, 1.0]\n')
    with pytest.raises(UsageError, match=r"\[calibrated.presets.cal\]: weights: give one per member \(2\); got 3"):
        resolve_settings({}, load_config(path), catalog)


def test_calibrate_measures_with_the_config_files_policy_options(tmp_path: Path, config_file: Path,
                                                                 members: list[str]) -> None:
    """`run` applies the file's sharpening beside a calibration, so calibrate measures with it and writes it."""
    config_file.write_text(config_file.read_text() + 'sharpen = "geometric"\n')
    base = EnsembleConfig(n_ctx=N_CTX, n_threads=1)
    # References only the ensemble measured with geometric sharpening meets: it must win, and write it.
    says = outputs(members, replace(base, policy="safe", weights=(2.0, 1.0), gate=0.5, sharpen="geometric"), PROMPTS)
    assert says != outputs(members[:1], replace(base, policy="single"), PROMPTS)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, says)])
    result = invoke(["calibrate", *model_args(members), "--file", str(dev), "--out", str(tmp_path / "out"),
                     "--drafter-weights", "2", "--gates", "0.5", "--json", *COMMON])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chosen"] == "safe w=2 gate=0.5" and data["evidence"][1]["correct"] == len(PROMPTS)
    assert data["sharpen"] == "geometric"  # written with the setting, so `run` applies what was measured
    manifest = json.loads((tmp_path / "out" / "calibrate.json").read_text())
    assert manifest["options"]["sharpen"] == "geometric"  # and a resume must match it


def test_a_sweep_value_given_twice_is_refused(tmp_path: Path, config_file: Path, members: list[str]) -> None:
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "Hi", "answer": "x"}])
    for flag, value, said in (("--gates", "0.5,0.5", "0.5,0.5"), ("--drafter-weights", "1,1.0", "1,1")):
        result = invoke(["calibrate", *model_args(members), "--file", str(dev), "--out", str(tmp_path / "out"),
                         flag, value, *COMMON])
        assert result.exit_code != 0 and f"{flag}: {said} repeats a value" in result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_the_api_preset_takes_its_shipped_calibration(tmp_path: Path, members: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_ensemble import api

    extra = tmp_path / "catalog.toml"
    extra.write_text('[presets.cal]\nmembers = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]\n')
    write_calibration(fake_result(("presets", "cal"), 0.3), extra, table=("presets", "cal", "calibrated"))
    catalog = Catalog.load(extra)
    # The preset as written, its members swapped for the tiny test models (a preset names catalog keys).
    catalog = replace(catalog, presets={**catalog.presets, "cal": replace(catalog.preset("cal"), members=tuple(members))})
    monkeypatch.setattr(api.Catalog, "load", lambda _=None: catalog)
    with api.Ensemble.from_preset("cal", n_ctx=N_CTX, n_threads=1) as ens:
        assert (ens.config.policy, ens.config.weights, ens.config.gate) == ("safe", (2.0, 1.0), 0.3)
    with api.Ensemble.from_preset("cal", gate=0.7, n_ctx=N_CTX, n_threads=1) as ens:  # a keyword still wins
        assert ens.config.gate == 0.7 and ens.config.weights == (2.0, 1.0)


# -- dropping clear losers early -------------------------------------------------------------------------------


class CannedSetting:
    """Test double of an engine configuration (the drop rule needs settings of known accuracy, which tiny
    generated models cannot give): answers each file prompt "q<i>" with ``i`` where ``right(i)``, else 0."""

    def __init__(self, name: str, right: Callable[[int], bool]) -> None:
        self.name, self.right, self.calls = name, right, 0

    def generate(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        self.calls += 1
        i = int(messages[-1]["content"][1:])
        return {"text": f"The answer is {i if self.right(i) else 0}", "tokens": 5, "seconds": 0.1}


def canned_sweep() -> list[CannedSetting]:
    return [CannedSetting("single:d", lambda i: i % 2 == 0),
            CannedSetting("safe even", lambda i: i % 2 == 0 or i == 7),  # as good as the drafter, one better
            CannedSetting("safe loser", lambda i: i % 10 == 0)]          # loses every tenth-but-not item


def test_a_losing_setting_is_dropped_early_and_a_resume_drops_it_again(tmp_path: Path) -> None:
    task = load_dev_file(write_jsonl(tmp_path / "dev.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(1, 46)]))
    items = task.items(0, None)
    configs = canned_sweep()
    path, dropped, _ = _run_dropping(task, configs, tmp_path / "out", items, 0, None, False, 0.01)
    # After 20 items the loser is behind 0 to 8 (sign test p = 0.004): it runs on no further item.
    assert dropped == {"safe loser": 20}
    assert [c.calls for c in configs] == [45, 45, 20]
    before = path.read_bytes()
    again = canned_sweep()
    assert _run_dropping(task, again, tmp_path / "out", items, 0, None, False, 0.01)[1] == dropped
    assert [c.calls for c in again] == [0, 0, 0] and path.read_bytes() == before
    scores = _scores(read_records(path), [Setting(c.name, {"policy": "single" if c.name.startswith("single") else "safe"})
                                          for c in configs], [i.id for i in items], task.name, dropped)
    assert [(s.summary.n, s.dropped_after) for s in scores] == [(45, None), (45, None), (20, 20)]
    assert select(scores, min_gain=1) is scores[1]  # one item better than the drafter, on every item
    assert "dropped_after" in scores[2].evidence() and "dropped_after" not in scores[1].evidence()


def test_a_second_record_of_one_item_is_not_counted(tmp_path: Path) -> None:
    task = load_dev_file(write_jsonl(tmp_path / "dev.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(1, 21)]))
    items = task.items(0, None)
    configs = canned_sweep()[:2]
    path, _, _ = _run_dropping(task, configs, tmp_path / "out", items, 0, None, False, None)
    every = [Setting(c.name, {"policy": "single" if c.name.startswith("single") else "safe"}) for c in configs]
    before = _scores(read_records(path), every, [i.id for i in items], task.name, {})
    records = read_records(path)
    wrong = next(r for r in records if r["config"] == "single:d" and not r["correct"])
    with path.open("a", encoding="utf-8") as f:  # a later answer to the same item, right this time
        f.write(json.dumps({**wrong, "correct": True}) + "\n")
    after = _scores(read_records(path), every, [i.id for i in items], task.name, {})
    assert [(s.summary.n, s.summary.correct) for s in after] == [(s.summary.n, s.summary.correct) for s in before]
    assert after[0].summary.n == 20


def test_records_of_a_run_without_dropping_are_scored_as_a_dropping_run_would(tmp_path: Path) -> None:
    task = load_dev_file(write_jsonl(tmp_path / "dev.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(1, 46)]))
    items = task.items(0, None)
    first = canned_sweep()
    path, dropped, _ = _run_dropping(task, first, tmp_path / "out", items, 0, None, False, None)
    assert dropped == {} and [c.calls for c in first] == [45, 45, 45]
    assert _run_dropping(task, canned_sweep(), tmp_path / "out", items, 0, None, False, 0.01)[1] == {"safe loser": 20}


def test_a_dropped_setting_is_never_chosen_even_pooled() -> None:
    drafter, dropped = score("single:d", 10, 1.0, n=20), replace(score("safe w=2 gate=0.5", 19, 1.0, n=20), dropped_after=20)
    assert select([drafter, dropped], min_gain=1) is drafter

    def result(task: str, scores: tuple[Score, ...]) -> CalibrationResult:
        return CalibrationResult(("presets", "tiny"), f"{task} items", 100, "2026-01-02", scores, scores[0],
                                 Path("out/x.jsonl"))

    # Dropped on ARC, then skipped on GSM8K: shown with the items it ran on, never chosen.
    arc = result("arc", (score("single:d", 50, 1.0), score("safe a", 60, 1.0),
                         replace(score("safe b", 5, 1.0, n=20), dropped_after=20)))
    gsm8k = result("gsm8k", (score("single:d", 40, 1.0), score("safe a", 41, 1.0)))
    pooled = pool([arc, gsm8k])
    assert [(s.setting.name, s.summary.n, s.dropped_after) for s in pooled.scores] == [
        ("single:d", 200, None), ("safe a", 200, None), ("safe b", 20, 20)]
    assert pooled.chosen is pooled.scores[1]
    assert "safe b ran on 20 items: 20 of arc items (dropped), not run on gsm8k items" in dropped_note(pooled.scores)
    assert dropped_note(pooled.scores[:2]) == ""
    # A setting not run on the second set at all is not chosen however well it did on the first.
    only_arc = result("arc", (score("single:d", 50, 1.0), score("safe c", 90, 1.0)))
    assert pool([only_arc, result("gsm8k", (score("single:d", 40, 1.0),))]).chosen.is_drafter


def test_the_sweep_table_shows_the_paired_record_and_the_choice() -> None:
    drafter = score("single:d", 50, 1.0)
    winner = replace(score("safe w=2 gate=0.5", 53, 1.5), only_setting=8, only_drafter=5)
    stopped = replace(score("safe w=3 gate=0.3", 9, 1.2, n=20), dropped_after=20, screened_out=True)
    result = CalibrationResult(("presets", "tiny"), "arc items", 100, "2026-01-02", (drafter, winner, stopped), winner,
                               Path("out/x.jsonl"))
    rows = sweep_table(result).splitlines()
    assert len(rows) == 5 and rows[0].startswith("| setting | right | accuracy")
    assert rows[2].startswith("| single:d | 50/100 | 50.0% |") and rows[2].endswith("|  |  |  |")
    assert "| +8 -5 | 0.58 | **chosen** |" in rows[3]  # McNemar: 8 against 5 is no evidence
    assert rows[4].endswith("| screened out (ran on 20 items) |")


def test_the_drop_level_is_checked() -> None:
    with pytest.raises(UsageError, match="drop_level must be a number above 0.0 and at most 0.5"):
        Sweep(drop_level=0.9).validate()
    assert Sweep(drop_level=None).validate().drop_level is None


def test_a_manifest_of_an_older_calibrate_with_the_same_options_resumes(tmp_path: Path, config_file: Path,
                                                                        members: list[str]) -> None:
    """Older manifests also listed options no setting reads (eager's); with the same values for the rest they
    resume, and the manifest is rewritten in this version's form."""
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "Hi", "answer": 1}])
    out = tmp_path / "out"
    args = ["calibrate", *model_args(members), "--file", str(dev), "--out", str(out),
            "--drafter-weights", "2", "--gates", "0.5", "--no-plot", "--no-write", *COMMON]
    assert invoke(args).exit_code == 0
    manifest = out / "calibrate.json"
    now = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**now, "options": {**now["options"], "max_branches": 8, "threshold": 1.75}}))
    assert invoke(args).exit_code == 0 and json.loads(manifest.read_text()) == now
    # One it did not record is named as such.
    manifest.write_text(json.dumps({**now, "options": {k: v for k, v in now["options"].items() if k != "n_ctx"}}))
    assert_usage_error(invoke(args), "an older calibrate that did not record n_ctx")


def test_pool_refuses_sets_of_other_sweeps() -> None:
    def result(*names: str) -> CalibrationResult:
        scores = tuple(score(n, 10, 1.0) for n in names)
        return CalibrationResult(("presets", "tiny"), "items", 100, "2026-01-02", scores, scores[0], Path("x.jsonl"))

    with pytest.raises(UsageError, match="one sweep"):
        pool([result("single:d", "safe a"), result("single:d", "safe z")])


def test_a_missing_model_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path: Path, config_file: Path,
                                                                        members: list[str]) -> None:
    """The manifest is written only once the models have loaded: a typo in a member, fixed, then resumes."""
    out = tmp_path / "out"
    typo = invoke(["calibrate", "-m", members[0], "-m", str(tmp_path / "typo.gguf"), "--task", "gsm8k",
                   "--limit", "1", "--out", str(out), "--no-write", *COMMON])
    assert typo.exit_code != 0 and "typo.gguf" in typo.output and "Traceback" not in typo.output
    assert not out.exists()


@pytest.mark.parametrize("where, needle", [("file/out", "not a directory"), ("file", "is a file")])
def test_an_out_directory_that_cannot_be_made_is_one_line_before_any_load(where: str, needle: str, tmp_path: Path,
                                                                          config_file: Path, members: list[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    result = invoke(["calibrate", *model_args(members), "--task", "gsm8k", "--limit", "1",
                     "--out", str(tmp_path / where), "--no-write", *COMMON])
    assert_usage_error(result, "--out", needle)


def test_a_read_only_config_file_is_found_before_the_sweep(tmp_path: Path, config_file: Path,
                                                           members: list[str]) -> None:
    config_file.chmod(0o444)
    try:
        result = invoke(["calibrate", *model_args(members), "--task", "gsm8k", "--limit", "1",
                         "--out", str(tmp_path / "out"), *COMMON])
    finally:
        config_file.chmod(0o644)
    assert_usage_error(result, "cannot write the config file", "--no-write")
    assert not (tmp_path / "out").exists()


def test_screening_keeps_the_best_setting_and_a_resume_screens_the_same(tmp_path: Path) -> None:
    """After 10 items only the setting ahead goes on beside the drafter; the choice is made on every item."""
    task = load_dev_file(write_jsonl(tmp_path / "dev.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(1, 31)]))
    items = task.items(0, None)
    configs = [CannedSetting("single:d", lambda i: i % 2 == 0),
               CannedSetting("safe late", lambda i: i % 2 == 0 or i == 25),  # level after 10, one better later
               CannedSetting("safe early", lambda i: i % 2 == 0 or i == 3),  # one better within the first 10
               CannedSetting("safe worse", lambda i: i % 4 == 0)]
    path, dropped, screened = _run_dropping(task, configs, tmp_path / "out", items, 0, None, False, None, screen=10)
    assert dropped == {"safe late": 10, "safe worse": 10} and screened == {"safe late", "safe worse"}
    assert [c.calls for c in configs] == [30, 10, 30, 10]
    again = [CannedSetting(c.name, c.right) for c in configs]
    assert _run_dropping(task, again, tmp_path / "out", items, 0, None, False, None, screen=10)[1:] == (dropped, screened)
    assert [c.calls for c in again] == [0, 0, 0, 0]
    every = [Setting(c.name, {"policy": "single" if c.name.startswith("single") else "safe"}) for c in configs]
    scores = _scores(read_records(path), every, [i.id for i in items], task.name, dropped, screened)
    assert select(scores, min_gain=1) is scores[2]
    assert scores[1].evidence()["screened_out_after"] == 10 and "dropped_after" not in scores[1].evidence()
    assert "safe late ran on 10 items (screened out)" in dropped_note(scores)


def test_the_screen_is_checked() -> None:
    with pytest.raises(UsageError, match="screen"):
        Sweep(screen=0).validate()


def test_a_manifest_without_records_blocks_no_rerun_and_is_checked_again_at_write(tmp_path: Path) -> None:
    """A run that failed on its first item (say its prompt overflowed --n-ctx) leaves a manifest and no record:
    a rerun with other options may replace it; once a record is there, it may not."""
    from edge_ensemble.eval.calibrate import _check_resume, _write_manifest

    out = tmp_path / "out"
    first = {"members": ["a", "b"], "options": {"n_ctx": 2048, "parallel": 1}}
    other = {"members": ["a", "b"], "options": {"n_ctx": 8192, "parallel": 1}}
    assert _check_resume(out, first) and not out.exists()
    _write_manifest(out, first)
    assert _check_resume(out, other)  # no records yet: replaced
    _write_manifest(out, other)
    (out / "gsm8k.jsonl").write_text('{"item": "1"}\n')
    with pytest.raises(UsageError, match="n_ctx = 8192 \\(this run: 2048\\)"):
        _check_resume(out, first)
    with pytest.raises(UsageError, match="holds a calibration made with"):
        _write_manifest(out, first)
