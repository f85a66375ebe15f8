"""Run a command and print each line of its output (stdout and stderr together) with the seconds since launch:

    python benchmarks/timed_lines.py -- python train.py ... > train_timed.log

For start-up measurements: where between the launch and the first steady step the time goes (imports, model and
data set-up, compilation, the first steps). Exits with the command's exit code.
"""
import subprocess
import sys
import time


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python benchmarks/timed_lines.py -- COMMAND [ARG ...]")
    start = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):
                if part.strip():
                    print(f"[{time.perf_counter() - start:8.2f}s] {part}", flush=True)
    print(f"[{time.perf_counter() - start:8.2f}s] exit code {proc.returncode}", flush=True)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
