"""The benchmark helpers run (their GPU numbers are in BENCHMARKS.md; here only that the scripts work on a CPU)."""
import json
import re
import subprocess
import sys

from conftest import REPO_ROOT


def test_timed_lines_prefixes_every_line_and_passes_the_exit_code_on():
    script = "import sys; print('one', flush=True); print('two\\rthree', file=sys.stderr); sys.exit(3)"
    result = subprocess.run([sys.executable, "benchmarks/timed_lines.py", "--", sys.executable, "-c", script],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    lines = result.stdout.splitlines()
    assert [re.sub(r"^\[ *[\d.]+s\] ", "", line) for line in lines] == ["one", "two", "three", "exit code 3"]
    assert all(re.match(r"^\[ *[\d.]+s\] ", line) for line in lines)


def test_bench_issue19_demo_step_smoke(tmp_path):
    out = tmp_path / "issue19.json"
    result = subprocess.run([sys.executable, "benchmarks/bench_issue19.py", "--smoke", "--only", "demo_step",
                             "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    step = json.loads(out.read_text())["demo_step"]
    assert step["eager_b4_img_s"] > 0
