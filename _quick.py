import sys, time
from tests.conftest import compose_config, TINY
from sublim.train import run_job
from pathlib import Path
import tempfile
root = Path(tempfile.mkdtemp())
extra = sys.argv[1:]
cfg = compose_config([f"paths.root={root}", "base=tiny_llama", *TINY, *extra])
t = time.time()
r = run_job(cfg, root / "job")
print(time.time() - t)
print({a: v["targets"] for a, v in r["arms"].items()})
print(r["stages"].keys())
