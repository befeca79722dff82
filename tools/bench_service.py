"""Scale-out and service overhead, as ratios measured in one run.

1. Ray: extraction tokens/s with 1 vs 2 CPU actors on a local Ray instance (the encode phase:
   actor start, model load, encoding, writing; tokenization and store creation excluded), next to
   the single-process engine.
2. Service: wall time of the same job through `featstore serve` (submit -> succeeded, service
   already running) vs a direct `featstore extract` command (process start to exit).

    HF_HUB_OFFLINE=1 python tools/bench_service.py --corpus ../shared/data/conll2003/train.txt \
        --workdir /tmp/bench-service --json benchmarks/service-2026-11-23.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchargs import parse_bench_args

from featstore import ExtractConfig, extract
from featstore.extraction.corpus import CorpusSpec
from featstore.service.client import ServiceClient

TOKEN = "bench-token"


def ray_tokens_per_second(corpus: str, out: Path, engine: str, workers: int | None) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    result = extract(ExtractConfig(out=str(out), corpus=CorpusSpec(corpus), engine=engine, workers=workers,
                                   progress=False))
    return result.num_tokens / result.encode_seconds, result.num_tokens


def direct_seconds(corpus: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featstore.cli", "extract", "--corpus", corpus, "--out", str(out),
                    "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - started


def service_seconds(corpus: str, root: Path) -> float:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "FEATSTORE_SERVICE_TOKEN": TOKEN}
    server = subprocess.Popen([sys.executable, "-m", "featstore.cli", "serve", "--catalog", str(root / "catalog"),
                               "--port", str(port), "--corpus-root", str(Path(corpus).parent), "--state-dir",
                               str(root / "state"), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = ServiceClient(f"http://127.0.0.1:{port}", TOKEN)
        for _ in range(300):
            try:
                client.jobs()
                break
            except Exception:
                time.sleep(0.2)
        started = time.perf_counter()
        job = client.follow(client.submit({"corpus": Path(corpus).name})["id"], interval=0.2, progress=False)
        elapsed = time.perf_counter() - started
        assert job["status"] == "succeeded", job
        return elapsed
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    args, workdir = parse_bench_args(__doc__, "bench-service-")
    corpus = str(Path(args.corpus).resolve())
    results: dict = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores", "corpus": corpus}

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[float]] = {"local": [], "ray-1": [], "ray-2": []}
    for _ in range(args.repeats):
        for name, engine, workers in (("local", "local", None), ("ray-1", "ray", 1), ("ray-2", "ray", 2)):
            rate, tokens = ray_tokens_per_second(corpus, workdir / f"{name}.zarr", engine, workers)
            runs[name].append(rate)
            print(f"{name}: {rate:,.0f} tokens/s", flush=True)
    ray.shutdown()
    best = {name: max(rates) for name, rates in runs.items()}
    results["tokens"] = tokens
    results["tokens_per_second"] = {"best": best, "all": runs}
    results["ray_2_over_1"] = best["ray-2"] / best["ray-1"]
    print(f"ray 2 workers / 1 worker: {results['ray_2_over_1']:.2f}x", flush=True)

    timings: dict[str, list[float]] = {"direct": [], "service": []}
    for _ in range(args.repeats):
        timings["direct"].append(direct_seconds(corpus, workdir / "direct.zarr"))
        timings["service"].append(service_seconds(corpus, workdir / "service"))
        print(f"direct {timings['direct'][-1]:.1f} s, service {timings['service'][-1]:.1f} s", flush=True)
    results["wall_seconds"] = timings
    results["service_over_direct"] = min(timings["service"]) / min(timings["direct"])
    print(f"service / direct: {results['service_over_direct']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
