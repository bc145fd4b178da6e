"""benchmarks/faults.py --quick (issue 13): a few hundred power cuts, SIGKILLs, damaged checkpoint
files and fuzzed streams against edgetune-run built around the hand-written model, natively, for
aarch64 under qemu-aarch64-static (when installed) and with AddressSanitizer + UBSan. Each case is
checked by the benchmark's own oracle (zlib reading of the slot format, the state an uninterrupted
run committed); here the goals are asserted family by family."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import needs_tool

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"

pytestmark = needs_tool("gcc")


def _load():
    spec = importlib.util.spec_from_file_location("faults_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    faults = _load()
    out = tmp_path_factory.mktemp("faults")
    faults.main(["--quick", "--out", str(out)])
    report = json.loads((out / "faults.json").read_text())
    assert (out / "faults.md").read_text().startswith("# edgetune-run fault injection (quick)")
    return report


def _failures(family: dict, *, excluding: str | None = None) -> dict:
    return {k: v for k, v in family["kind_failures"].items() if excluding is None or not k.startswith(excluding)}


def test_kills_and_torn_writes_never_lose_a_committed_state(report):
    kills = report["kills_native"]
    assert kills["kinds"]["cut"] >= 50 and kills["kinds"]["external"] >= 5
    assert kills["outcomes"].get("torn mid-save", 0) >= 40  # the cuts really landed inside a save
    assert kills["outcomes"].get("killed", 0) >= 1  # and some outside kills hit a running program
    assert _failures(kills, excluding="after fallback") == {}, kills["examples"]


@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="not installed: qemu-aarch64-static, aarch64-linux-gnu-gcc (CI installs them)")
def test_kills_under_qemu_aarch64_never_lose_a_committed_state(report):
    kills = report["kills_qemu_aarch64"]
    assert kills is not None and kills["kinds"]["cut"] >= 5
    assert _failures(kills, excluding="after fallback") == {}, kills["examples"]


def test_a_cut_in_the_first_save_after_a_fallback_resume_keeps_the_slot_it_loaded(report):
    """The newest slot holds non-finite state, the boot falls back to the older one, and the power
    is cut in the first save: the slot the run resumed from must survive (the save has to go to the
    rejected slot, not to the one just loaded)."""
    kills = report["kills_native"]
    assert kills["kinds"]["after fallback"] >= 5
    assert {k: v for k, v in kills["kind_failures"].items() if k.startswith("after fallback")} == {}, \
        [e for e in kills["examples"] if e["kind"] == "after fallback"][:2]


def test_every_damaged_checkpoint_resumes_from_a_valid_slot_or_is_reported(report):
    c = report["corruptions"]
    assert c["cases"] >= 100 and c["failures"] == {}, c["examples"]
    for outcome in ("resumed (newest)", "resumed (fallback slot)", "refused: no valid slot", "refused: non-finite"):
        assert c["outcomes"].get(outcome, 0) >= 1, (outcome, c["outcomes"])  # every path was exercised


def test_fuzzed_streams_exit_cleanly_under_the_sanitizers(report):
    f = report["fuzz"]
    assert f["cases"] >= 100 and f["failures"] == {}, f["examples"]
    assert f["outcomes"].get("ran", 0) >= 10 and f["outcomes"].get("refused (exit 1)", 0) >= 10


def test_goals_are_computed_from_the_families(report):
    g = report["goals"]
    assert g["crashes"] == 0 and g["sanitizer_reports"] == 0 and g["corruptions_mishandled"] == 0
    assert g["committed_states_lost"] == sum(
        v for fam in ("kills_native", "kills_qemu_aarch64") if report.get(fam)
        for k, v in report[fam]["failures"].items() if "lost" in k or "torn" in k or "differs" in k or "wrong" in k)
