"""tools/gpu_acceptance.py, run at toy scale on the CPU (`--cpu`): every check runs and passes, so
what a GPU node runs is known to work up to the GPU itself (docs/gpu-acceptance.md)."""

from conftest import SHARED_DATA, run_script


def test_the_acceptance_checks_pass_on_the_cpu():
    result = run_script(
        "tools/gpu_acceptance.py", "--cpu", env={"GPTCRAFT_SHARED_DATA": str(SHARED_DATA)}, timeout=1200
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == 6 and all(line.startswith("ok") for line in lines), lines
    assert "host reads inside steps 3-8 (adamw and muon): 0" in result.stdout
    assert "6 of 6 checks passed" in result.stdout
