"""A custom nn.Module as a peer of `peerdistill train` through a plugin, then eval, --resume and sweep."""
import subprocess
import sys
import tempfile
from pathlib import Path

here, out = Path(__file__).resolve().parent, Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())


def peerdistill(*args: str, lines: int = 6) -> None:
    done = subprocess.run([sys.executable, "-m", "peerdistill", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"peerdistill {' '.join(args)} failed:\n{done.stderr}")
    print(f"$ peerdistill {args[0]} ...", *(done.stdout + done.stderr).strip().splitlines()[-lines:], sep="\n")


data = ["data.name=synthetic", "data.size=128", "data.image_size=16", "data.num_classes=4", "batch_size=32"]
run = out / "run"
peerdistill("train", f"plugins=[{here / 'plugin_models.py'}]", "model=tinycnn", "model.width=8", "method=dml",
            "epochs=1", "precision=fp32", "progress=false", "tensorboard=false", "device=cpu", *data, "--out", str(run))
print("config.yaml:", *[line for line in (run / "config.yaml").read_text().splitlines() if "tinycnn" in line
                        or "plugin_models" in line], sep="\n")
peerdistill("eval", str(run), lines=4)  # a new process: the stored config imports the plugin again
peerdistill("train", "--resume", str(run), lines=1)  # finished: nothing to train
(out / "study.yaml").write_text(f"name: plugin-study\nbase: {run / 'config.yaml'}\nconfig: {{epochs: 1}}\n"
                                f"rows:\n  - {{name: kdcl, method: kdcl}}\n"
                                f"seeds: 1\nout: {out / 'study'}\nheads: [peers]\nmetrics: [top1]\n")
peerdistill("sweep", str(out / "study.yaml"), "--slots", "1", "--threads", "1", lines=1)
print((out / "study" / "study.md").read_text().split("\n\n")[2])  # the study's table
