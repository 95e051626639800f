"""Study v2 (benchmarks/study.py): a tiny end-to-end run, resume in chunks, and the summary's AURAC arithmetic."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from matryoshka_lora.core.metrics import aurac, log_aurac

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    from conftest import load_script
    return load_script("benchmarks/study.py")


def test_tiny_study_in_chunks_then_complete(study, tiny_model_dir, tmp_path):
    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    first = study.main([*argv, "--max-minutes", "0"])  # stops before the first unit
    assert first["complete"] is False and not list((tmp_path / "res").glob("arith/*/*/*/*.json"))
    summary = study.main(argv)
    assert summary["complete"] is True
    t = summary["tasks"]["arith"]
    assert t["n_test"] == 6 and t["metric"] == "exact_match_strict" and t["final_steps"]["final_steps"] == 4
    # the candidate objective is kept only if it beat the baseline (lora) on both AURACs at the grid step
    d = summary["candidates"]["multirank@split2"]
    grid = json.loads((tmp_path / "res/arith/multirank@split2/lr0.003/seed42/step2-validation-match.json").read_text())
    lora = [json.loads(f.read_text())
            for f in (tmp_path / "res/arith/lora").glob("lr*/seed42/step2-validation-match.json")]
    for key in ("aurac", "log_aurac"):
        assert d["candidate"][key] == max(r[key] for r in grid["rules"].values())
        assert d["best_baseline"][key] == max(r[key] for g in lora for r in g["rules"].values())
    assert d["kept"] == all(d["candidate"][k] > d["best_baseline"][k] for k in ("aurac", "log_aurac"))
    candidate = {"multirank@split2", "multirank@split2+svd"} if d["kept"] else set()
    assert set(t["methods"]) == {"lora", "lora+svd", "matryoshka", "matryoshka+fold", "matryoshka+fold+svd"} | candidate
    for m in t["methods"].values():
        assert m["seeds"] == [42, 666] and m["steps"] == 4
    # one JSON per (method, lr, seed, steps, split, metric): grid at step 2 for both rates, seed 42 along its run
    files = sorted(p.relative_to(tmp_path / "res").as_posix() for p in (tmp_path / "res").glob("arith/**/*.json"))
    assert "arith/lora/lr0.001/seed42/step2-validation-match.json" in files
    assert "arith/matryoshka/lr0.003/seed42/step2-validation-match.json" in files
    n = 3 if d["kept"] else 2  # methods past the grid
    assert sum(f.endswith("step4-validation-match.json") for f in files) == n  # the curve: seed 42 only
    assert sum(f.endswith("step4-test-match.json") for f in files) == 2 * n
    assert sum(f.endswith("step4-test-strict.json") for f in files) == 2 * n
    # the seed-42 final run continued the grid run: its step-2 snapshot was not trained again
    lr = t["methods"]["lora"]["lr"]
    run = tmp_path / "runs" / "arith" / "lora" / f"lr{lr:g}" / "seed42"
    assert json.loads((run / "train_config.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert not (run / "checkpoints").exists()  # finished runs keep only their snapshots
    assert (tmp_path / "res" / "summary-arith.png").is_file() and "| lora" in (tmp_path / "res" / "summary.md").read_text()
    assert set(t["best"]["paired"]) == {"lora", "lora+svd"} - {t["best"]["name"]}  # dylora was not in this study
    assert t["complete"] is True and summary["winner"]["name"] in t["methods"]
    w = summary["winner"]
    assert w["defaults"] == study.defaults_of(w["name"]) and w["defaults"]["method"] in ("lora", "matryoshka")
    assert w["lr"] == t["methods"][w["name"]]["lr"]  # one task: its picked rate
    # the folders are this model's: another model would reuse its finished runs, so it is refused
    with pytest.raises(SystemExit, match="--out runs/study-other"):
        study.main([*argv[:2], "--model", "other/model", *argv[4:]])


def test_folders_without_a_marker_belong_to_the_preset_model(study, tmp_path):
    """Results written before model.json existed are the preset's model's; an empty folder takes any model."""
    (tmp_path / "res" / "arith" / "lora" / "lr0.001" / "seed42").mkdir(parents=True)
    with pytest.raises(SystemExit, match="'smollm2-135m', not 'other/model'"):
        study.claim(tmp_path / "res", "other/model", "smollm2-135m")
    assert not (tmp_path / "res" / "model.json").exists()
    study.claim(tmp_path / "res", "smollm2-135m", "smollm2-135m")
    assert json.loads((tmp_path / "res" / "model.json").read_text()) == {"model": "smollm2-135m"}
    study.claim(tmp_path / "empty", "other/model", "smollm2-135m")
    assert json.loads((tmp_path / "empty" / "model.json").read_text()) == {"model": "other/model"}


def test_strict_is_scored_while_the_adapter_is_on_disk(study, tiny_model_dir, tmp_path, monkeypatch):
    """Adapters are not committed, so a session on a new machine has none: each final run is scored
    strict in the same pass as its test match, and a run whose adapter is gone is trained again for it."""
    calls = []
    score = study.Study.score

    def record(self, task, method, lr, seed, step, split, metric="match", strict_too=False):
        calls.append((method, seed, split, metric, strict_too))
        return score(self, task, method, lr, seed, step, split, metric, strict_too)

    monkeypatch.setattr(study.Study, "score", record)
    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    first = study.main(argv)
    tests = [c for c in calls if c[2] == "test" and c[3] == "match"]
    assert len(tests) == len({c[:2] for c in tests}) >= 4 and all(c[4] for c in tests)  # one per final run
    files = list((tmp_path / "res").glob("arith/*/*/*/step4-test-strict.json"))
    assert len(files) == len(tests)
    for f in files:
        strict = json.loads(f.read_text())
        match = json.loads(f.with_name("step4-test-match.json").read_text())
        assert strict["scored_with"] == match["scored_with"] == ["match", "strict"]
        for name, rule in strict["rules"].items():  # a matched row is scored on its gold completion: right
            assert all(v >= match["rules"][name]["per_rank"][k] for k, v in rule["per_rank"].items())
            assert all(n <= 6 for n in strict["decoded_rows"][name].values())
    lr = first["tasks"]["arith"]["methods"]["lora"]["lr"]
    # a run whose adapter is gone waits for the runs that are on disk (cheap to score)
    shutil.rmtree(tmp_path / "runs" / "arith" / "lora" / f"lr{lr:g}" / "seed666")
    for f in (tmp_path / "res").glob("arith/*/*/seed666/step4-test-*.json"):
        f.unlink()
    calls.clear()
    study.main(argv)
    order = [c[0] for c in calls if c[1:4] == (666, "test", "match")]
    assert order[-1] == "lora" and len(order) == len(set(order)) >= 2
    # a new machine: no adapters; one strict result is missing
    strict = tmp_path / "res" / "arith" / "lora" / f"lr{lr:g}" / "seed666" / "step4-test-strict.json"
    before = json.loads(strict.read_text())["rules"]
    strict.unlink()
    shutil.rmtree(tmp_path / "runs")
    again = study.main(argv)
    assert again["complete"] is True and json.loads(strict.read_text())["rules"] == before  # same seed, same adapter
    assert (tmp_path / "runs" / "arith" / "lora" / f"lr{lr:g}" / "seed666" / "snapshots" / "step-4").is_dir()
    assert not (tmp_path / "runs" / "arith" / "matryoshka").exists()  # nothing else was trained again


def test_a_retrain_whose_scoring_does_not_fit_waits_while_the_next_run_trains(study, tiny_model_dir, tmp_path):
    """In the last phase (strict for runs whose adapters were gone), a run whose scoring would end past
    --max-minutes keeps its adapter for a later chunk, and the chunk trains and scores the next run."""
    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    assert study.main(argv)["complete"] is True
    strict = {m: next((tmp_path / "res" / "arith" / m).glob("lr*/seed666/step4-test-strict.json"))
              for m in ("lora", "matryoshka")}
    for f in strict.values():
        f.unlink()
    shutil.rmtree(tmp_path / "runs")  # a new machine: both runs are trained again
    s = study.Study(study.PRESETS["tiny"], tmp_path / "runs", tmp_path / "res", str(tiny_model_dir), 10.0)
    s.rule_seconds[("arith", "test", True, "lora")] = 1e6  # lora's scoring would not fit, matryoshka's would
    with pytest.raises(study.TimeUp):
        s.plan()
    lora_run = strict["lora"].parent.relative_to(tmp_path / "res")
    assert (tmp_path / "runs" / lora_run / "snapshots" / "step-4").is_dir() and not strict["lora"].exists()
    assert strict["matryoshka"].is_file()
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / lora_run).rglob("*") if p.is_file()}
    again = study.main(argv)  # the next chunk scores lora from its adapter, without training it again
    assert again["complete"] is True and strict["lora"].is_file()
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    # the same when the waiting adapter is already on disk (scored right after its test match)
    for f in strict.values():
        f.unlink()
    shutil.rmtree(tmp_path / "runs" / strict["matryoshka"].parent.relative_to(tmp_path / "res"))
    s = study.Study(study.PRESETS["tiny"], tmp_path / "runs", tmp_path / "res", str(tiny_model_dir), 10.0)
    s.rule_seconds[("arith", "test", True, "lora")] = 1e6
    with pytest.raises(study.TimeUp):
        s.plan()
    assert strict["matryoshka"].is_file() and not strict["lora"].exists()


def test_the_runs_that_decide_the_default_are_scored_first(study, tiny_model_dir, tmp_path, monkeypatch):
    """lead(): each method's best variant by the winner's score (mean of AURAC and log-AURAC over the tasks
    it ran on); the last phase trains and scores the missing runs of the leading methods first."""
    def row(task, method, seed, rules):
        accs = {name: [a] * len(study.RANKS) for name, a in rules.items()}  # flat: AURAC = log-AURAC = a
        return {"task": task, "method": method, "lr": 1e-3, "seed": seed, "steps": 600, "split": "test", "n": 400,
                "metric": "strict", "compute_per_step": 1,
                "rules": {n: {"per_rank": {str(k): a for k, a in zip(study.RANKS, v)}, "base": 0.0,
                              "aurac": aurac(study.RANKS, v), "log_aurac": log_aurac(study.RANKS, v)}
                          for n, v in accs.items()}}
    rows = [row("arith", "lora", 42, {"lora": 10, "lora+svd": 70}),
            row("wordops", "lora", 42, {"lora": 10, "lora+svd": 50}),
            row("arith", "dylora", 42, {"dylora": 80, "dylora+svd": 20}),
            row("arith", "dylora", 666, {"dylora": 70, "dylora+svd": 20})]
    for r in rows:
        path = tmp_path / "res" / r["task"] / r["method"] / "lr0.001" / f"seed{r['seed']}" / "step600-test-strict.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    preset = dict(study.PRESETS["v2"], seeds=[42, 666])
    lead = study.Study(preset, tmp_path / "runs", tmp_path / "res", str(tiny_model_dir), None).lead()
    assert lead == {"lora": pytest.approx(60.0), "dylora": pytest.approx(75.0)}

    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path / "tiny"),
            "--results", str(tmp_path / "tiny-res")]
    assert study.main(argv)["complete"] is True
    for m in ("lora", "matryoshka"):
        next((tmp_path / "tiny-res" / "arith" / m).glob("lr*/seed666/step4-test-strict.json")).unlink()
    shutil.rmtree(tmp_path / "tiny")  # a new machine: both runs are trained again, the leader first
    s = study.Study(study.PRESETS["tiny"], tmp_path / "tiny", tmp_path / "tiny-res", str(tiny_model_dir), None)
    monkeypatch.setattr(s, "lead", lambda: {"lora": 1.0, "matryoshka": 2.0})
    trained = []
    monkeypatch.setattr(s, "train_to", lambda task, method, lr, seed, step: trained.append((method, seed)) or
                        study.Study.train_to(s, task, method, lr, seed, step))
    s.plan()
    assert trained == [("matryoshka", 666), ("lora", 666)]


def _lora_666_cut_after_its_first_segment(study, tiny_model_dir, tmp_path, monkeypatch):
    """A complete tiny study, then a new machine where lora seed 666 (match committed, strict not) is
    trained again and the chunk ends after its first segment. Returns (argv, strict JSON, run folder)."""
    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    assert study.main(argv)["complete"] is True
    strict = next((tmp_path / "res" / "arith" / "lora").glob("lr*/seed666/step4-test-strict.json"))
    strict.unlink()
    shutil.rmtree(tmp_path / "runs")
    run = tmp_path / "runs" / strict.parent.relative_to(tmp_path / "res")
    _stop_once_step_2_is_written(study, tiny_model_dir, tmp_path, monkeypatch, run)
    assert not strict.exists() and any((run / "checkpoints").iterdir())
    return argv, strict, run


def _stop_once_step_2_is_written(study, tiny_model_dir, tmp_path, monkeypatch, run):
    """Run one chunk that ends as soon as the run's step-2 snapshot is (re)written."""
    snapshot = run / "snapshots" / "step-2" / "adapter_model.safetensors"
    before = snapshot.stat().st_mtime_ns if snapshot.is_file() else None
    s = study.Study(study.PRESETS["tiny"], tmp_path / "runs", tmp_path / "res", str(tiny_model_dir), 10.0)
    check = s.check_time

    def stop_after_step_2(expected=0.0, error=None):
        if snapshot.is_file() and snapshot.stat().st_mtime_ns != before:
            raise study.TimeUp
        check(expected, error)

    monkeypatch.setattr(s, "check_time", stop_after_step_2)
    with pytest.raises(study.TimeUp):
        s.plan()


def test_a_run_trained_again_resumes_from_its_checkpoint_in_the_next_chunk(study, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    """A run of a later seed trained again for strict (its match committed, its adapter gone) and cut off
    between segments resumes in the next chunk from its checkpoint, not from step 0."""
    argv, strict, run = _lora_666_cut_after_its_first_segment(study, tiny_model_dir, tmp_path, monkeypatch)
    first = (run / "snapshots" / "step-2" / "adapter_model.safetensors").stat().st_mtime_ns
    assert study.main(argv)["complete"] is True and strict.is_file()
    assert (run / "snapshots" / "step-2" / "adapter_model.safetensors").stat().st_mtime_ns == first  # not retrained
    assert not (run / "checkpoints").exists()  # finished: only snapshots are kept


def test_a_run_without_its_checkpoint_starts_again_segment_by_segment(study, tiny_model_dir, tmp_path, monkeypatch):
    """A run short of its final step whose checkpoints are gone trains again from step 0 one segment at a
    time (each segment checkpointed, each estimated by its own length), not to the end in one go."""
    argv, strict, run = _lora_666_cut_after_its_first_segment(study, tiny_model_dir, tmp_path, monkeypatch)
    shutil.rmtree(run / "checkpoints")
    _stop_once_step_2_is_written(study, tiny_model_dir, tmp_path, monkeypatch, run)
    assert not (run / "snapshots" / "step-4").exists() and any((run / "checkpoints").iterdir())
    assert study.main(argv)["complete"] is True and strict.is_file()


def test_max_minutes_stops_before_work_that_would_not_fit(study, tiny_model_dir, tmp_path):
    """A training segment, and then a run's scoring, start only if what the same work last took on this
    machine (for scoring: by the same method, else by any) says they end within --max-minutes; with no
    estimate yet they start."""
    s = study.Study(study.PRESETS["tiny"], tmp_path / "runs", tmp_path / "res", str(tiny_model_dir), 10.0)
    unit = ("arith", "lora", 1e-3, 42, 2, "validation")
    s.step_seconds["arith"] = 400.0  # 2 steps x 400 s > 10 min: training would not fit
    with pytest.raises(study.TimeUp):
        s.score(*unit)
    assert not (tmp_path / "runs").exists()
    s.step_seconds["arith"], s.rule_seconds[("arith", "validation", False)] = 1e-3, 400.0  # 2 rules x 400 s
    with pytest.raises(study.TimeUp):  # training fits and runs (it resumes here later), scoring would not
        s.score(*unit)
    assert s.trained_to("arith", "lora", 1e-3, 42) == 2 and not (tmp_path / "res").exists()
    trained = s.step_seconds["arith"]
    s.rule_seconds[("arith", "validation", False)] = 200.0  # 2 x 200 s fit in 10 min
    assert set(s.score(*unit)["rules"]) == {"lora", "lora+svd"}
    assert s.step_seconds["arith"] == trained  # scored without training again
    # the estimates are now what this unit took (a tiny model: well under the stand-ins), kept with the
    # runs of this machine for the next process
    assert 0 < s.rule_seconds[("arith", "validation", False)] < 200 and s.step_seconds["arith"] not in (1e-3, 400.0)
    assert s.rule_seconds[("arith", "validation", False, "lora")] == s.rule_seconds[("arith", "validation", False)]
    # a method's own scoring time wins over any method's (decoding what its rules miss differs by method)
    s.rule_seconds[("arith", "validation", False, "lora")] = 400.0
    with pytest.raises(study.TimeUp):
        s.score("arith", "lora", 1e-3, 666, 2, "validation")
    assert s.trained_to("arith", "lora", 1e-3, 666) == 2
    s.rule_seconds[("arith", "validation", False, "lora")] = 0.1  # the task-wide 400 s below no longer stops it
    s.rule_seconds[("arith", "validation", False)] = 400.0
    assert set(s.score("arith", "lora", 1e-3, 666, 2, "validation")["rules"]) == {"lora", "lora+svd"}
    again = study.Study(study.PRESETS["tiny"], tmp_path / "runs", tmp_path / "res", str(tiny_model_dir), 10.0)
    assert (again.step_seconds, again.rule_seconds) == (s.step_seconds, s.rule_seconds)
    fresh = study.Study(study.PRESETS["tiny"], tmp_path / "other", tmp_path / "res", str(tiny_model_dir), 10.0)
    assert fresh.step_seconds == fresh.rule_seconds == {}


def test_defaults_of_variants(study):
    plain = {"init": "peft", "ranks_per_step": None, "multirank_rows": None}
    assert study.defaults_of("lora+svd") == {**plain, "method": "lora", "deploy_order": "svd"}
    assert study.defaults_of("matryoshka+fold") == {**plain, "method": "matryoshka", "deploy_order": "fold"}
    assert study.defaults_of("matryoshka_pinit+fold+svd") == {**plain, "method": "matryoshka", "init": "paper",
                                                              "deploy_order": "svd"}
    assert study.defaults_of("multirank@compute") == {**plain, "method": "multirank", "multirank_rows": "stack",
                                                      "deploy_order": "none"}
    # the candidate differs from multirank@compute only in how it deals ranks to rows: a default must say so
    assert study.defaults_of("multirank@split2") == {**plain, "method": "multirank", "ranks_per_step": 2,
                                                     "multirank_rows": "split", "deploy_order": "none"}


def test_library_defaults_are_the_measured_winner(study):
    """The committed study is complete: MatryoshkaConfig / TrainConfig defaults must be its winner."""
    from matryoshka_lora import MatryoshkaConfig
    from matryoshka_lora.training import TrainConfig

    w = json.loads((ROOT / "benchmarks" / "results" / "study" / "summary.json").read_text())["winner"]
    assert w is not None, "summary.json names no winner: finish study v2 (benchmarks/accuracy.py --preset v2)"

    def trains(c):  # what a config trains: multirank's unset options are filled in by multirank_plan
        return c.method, c.init, c.multirank_plan() if c.method == "multirank" else None

    fields = {k: v for k, v in w["defaults"].items() if k != "deploy_order"}
    assert set(fields) == {"method", "init", "multirank_rows", "ranks_per_step"}  # all that `trains` compares
    assert trains(MatryoshkaConfig()) == trains(MatryoshkaConfig(**fields))
    assert TrainConfig().deploy_order == w["defaults"]["deploy_order"]
    assert TrainConfig().learning_rate == w["lr"]  # the rate the winner was picked at


def test_summary_aurac_is_aurac_of_mean_per_rank(study):
    """AURAC is linear in the accuracies: the committed summary's AURAC equals AURAC of its mean per-rank row."""
    path = ROOT / "benchmarks" / "results" / "study" / "summary.json"
    if not path.is_file():
        pytest.skip("no study v2 summary committed yet")
    summary = json.loads(path.read_text())
    ranks = summary["ranks"]
    checked = 0
    for t in summary["tasks"].values():
        for m in [*t["methods"].values(), *t.get("strict_so_far", {}).values()]:
            means = [m["per_rank"][str(k)]["mean"] for k in ranks]
            # numpy's trapezoid rule, independent of metrics.py: AURAC is linear in the per-rank accuracies
            x, logx = np.array(ranks, dtype=float), np.log2(ranks)
            assert m["aurac"]["mean"] == pytest.approx(np.trapezoid(means, x) / (x[-1] - x[0]), abs=1e-9)
            assert m["log_aurac"]["mean"] == pytest.approx(np.trapezoid(means, logx) / (logx[-1] - logx[0]), abs=1e-9)
            checked += 1
    if checked == 0:
        pytest.skip("the study v2 summary has no final (test-split) results yet")


def test_summary_hand_computed(study):
    """Two seeds, hand-computed means, std and paired differences."""
    def row(seed, name, accs, metric="match"):
        ranks = study.RANKS
        return {"task": "arith", "method": "lora", "lr": 1e-3, "seed": seed, "steps": 600, "split": "test", "n": 400,
                "metric": metric, "compute_per_step": 1,
                "rules": {name: {"per_rank": {str(k): a for k, a in zip(ranks, accs)}, "base": 0.0,
                                 "aurac": aurac(ranks, accs), "log_aurac": log_aurac(ranks, accs)}}}
    rows = [row(42, "lora", [0, 0, 0, 10, 20, 40]), row(666, "lora", [0, 0, 0, 20, 20, 60]),
            row(42, "lora+svd", [30, 30, 30, 30, 30, 30]), row(666, "lora+svd", [20, 20, 20, 20, 20, 20])]
    preset = dict(study.PRESETS["v2"], tasks=["arith"], seeds=[42, 666])
    s = study.summarize(rows, preset)["tasks"]["arith"]
    assert s["methods"]["lora"]["per_rank"]["32"] == {"mean": 50.0, "std": pytest.approx(14.142135623730951)}
    # lora AURAC, seed 42: (0+0)/2*1 + 0*2 + (0+10)/2*4 + (10+20)/2*8 + (20+40)/2*16 = 20 + 120 + 480 = 620 / 31
    assert s["methods"]["lora"]["aurac"]["mean"] == pytest.approx((620 / 31 + (40 + 160 + 640) / 31) / 2)
    assert s["best"]["name"] == "lora+svd"
    d = s["best"]["paired"]["lora"]
    assert d["aurac"]["mean"] == pytest.approx(((30 - 620 / 31) + (20 - 840 / 31)) / 2)
    assert "strict_so_far" not in s

    # strict-match at one seed: the table stays on match (seed 666 lacks strict), strict is shown beside it
    s = study.summarize(rows + [row(42, "lora+svd", [30, 30, 40, 30, 30, 30], "strict")], preset)["tasks"]["arith"]
    assert s["metric"] == "match" and s["methods"]["lora+svd"]["per_rank"]["4"]["mean"] == 25.0
    assert list(s["strict_so_far"]) == ["lora+svd"] and s["strict_so_far"]["lora+svd"]["seeds"] == [42]
    assert s["strict_so_far"]["lora+svd"]["per_rank"]["4"] == {"mean": 40.0, "std": 0.0}
    assert "Strict-match so far (arith" in study.markdown({"ranks": study.RANKS, "tasks": {"arith": s}})


def test_strict_minus_match_pairs_the_same_run(study):
    """The gap record compares strict and match of the same run only, cell by cell."""
    def row(seed, metric, accs):
        ranks = study.RANKS
        return {"task": "arith", "method": "lora", "lr": 1e-3, "seed": seed, "steps": 600, "split": "test", "n": 400,
                "metric": metric, "compute_per_step": 1,
                "rules": {"lora": {"per_rank": {str(k): a for k, a in zip(ranks, accs)}, "base": 0.0,
                                   "aurac": aurac(ranks, accs), "log_aurac": log_aurac(ranks, accs)}}}
    one_pass = {"scored_with": ["match", "strict"]}
    rows = [{**row(42, "match", [10, 20, 30, 40, 50, 60]), **one_pass},
            {**row(42, "strict", [10, 20.25, 30, 40, 50, 60.5]), **one_pass},
            row(666, "match", [0, 0, 0, 0, 0, 0])]  # no strict for 666: not paired with 42's strict
    gap = study.summarize(rows, dict(study.PRESETS["v2"], tasks=["arith"]))["tasks"]["arith"]["strict_minus_match"]
    assert gap == {"runs": 1, "rank_rows": 6, "mean": pytest.approx(0.75 / 6), "min": 0.0, "max": 0.5}
    assert study.strict_gap(rows[:1]) is None
    # strict scored alone (a run trained again: another adapter than match's) is not paired
    assert study.strict_gap([rows[0], row(42, "strict", [10, 20.25, 30, 40, 50, 60.5])]) is None


@pytest.mark.parametrize("gain,final", [(0.9, 400), (1.0, 600)])
def test_final_steps_cut_to_400_only_when_every_method_plateaued(study, tmp_path, gain, final):
    s = study.Study(study.PRESETS["v2"], tmp_path / "runs", tmp_path, None, None)

    def point(a):
        return {"rules": {"lora": {"aurac": a}, "lora+svd": {"aurac": a + 5}}}

    curves = {"lora": {400: point(40.0), 600: point(40.0 + gain)},
              "dylora": {400: {"rules": {"dylora": {"aurac": 30.0}}}, 600: {"rules": {"dylora": {"aurac": 29.0}}}}}
    assert s.final_steps("arith", curves) == final
    record = json.loads((tmp_path / "arith" / "final_steps.json").read_text())
    assert record["final_steps"] == final and record["gain_from_plateau_at_to_end"]["dylora"] == -1.0
