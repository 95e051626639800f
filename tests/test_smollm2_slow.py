"""The real embedded model end to end (slow: run with `make test-slow`)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_quick_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    from matryoshka_lora.demo import default_variant, run_demo

    results = run_demo(out_dir=tmp_path, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["lora", "dylora", default_variant()]
    for m in saved["methods"].values():
        assert sorted(int(k) for k in m["per_rank"]) == [1, 4, 32]
    assert saved["base"] is not None and results["metric"] == "match"
    assert (tmp_path / "results.png").is_file() and (tmp_path / "results.md").is_file()
