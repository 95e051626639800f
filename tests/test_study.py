"""The accuracy study harness (benchmarks/accuracy.py): a tiny end-to-end study, and resume after a kill."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("accuracy_study", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_study_runs_and_resumes(study, tiny_model_dir, tmp_path):
    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--ranks", "1,2,4", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res" / "accuracy")]
    first = study.main(argv)
    t = first["tasks"]["arith"]
    # 2 methods x 2 learning rates x 1 seed, plus the fold variant of matryoshka
    assert set(t["methods"]) == {"lora", "matryoshka", "matryoshka+fold"}
    for m in t["methods"].values():
        assert set(m["per_rank"]) == {"1", "2", "4"} and len(m["validation_aurac_grid"]) == 2
        mean = [m["per_rank"][k][0] for k in ("1", "2", "4")]
        a1, a2, a4 = mean  # trapezoids over rank widths 1 and 2
        assert m["aurac"][0] == pytest.approx(((a1 + a2) / 2 + (a2 + a4)) / 3)
    assert (tmp_path / "res" / "accuracy.md").read_text().count("| matryoshka") == 2
    assert (tmp_path / "res" / "accuracy-arith.png").is_file()
    runs = sorted((tmp_path / "runs").glob("arith/*/*/seed0/adapter/adapter_model.safetensors"))
    assert len(runs) == 4
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    # a study killed while training its last run: that run has no adapter and no results yet
    victim = runs[-1].parents[1]
    for f in list(victim.glob("eval_*.json")):
        f.unlink()
    import shutil
    shutil.rmtree(victim / "adapter")
    second = study.main(argv)
    for p in runs:
        if victim in p.parents:
            assert p.is_file()  # retrained
        else:
            assert p.stat().st_mtime_ns == stamps[p]  # reused, not retrained
    assert json.loads(json.dumps(second["tasks"]["arith"]["methods"]["lora"]["per_rank"])) == \
        json.loads(json.dumps(first["tasks"]["arith"]["methods"]["lora"]["per_rank"]))
    # the runs under --out are this model's: another model would reuse them, so it is refused
    with pytest.raises(SystemExit, match="not 'other/model'"):
        study.main([*argv[:2], "--model", "other/model", *argv[4:]])
