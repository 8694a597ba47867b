"""Benchmark: reading an instance's outputs on the S3 backend (moto's server on 127.0.0.1).

    python bench/bench_s3.py [--rounds N]

(a) GET /minimal/<instance> through tfserver, which reads the state object with boto3;
(b) `terraform output -json` in an equally prepared working copy (same backend settings,
    initialised once, same workspace). Interleaved; medians and the ratio as a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import start_moto, start_server  # noqa: E402
from tfserver.config import S3Settings  # noqa: E402
from tfserver.storage.s3 import s3_backend_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tfserver-bench-s3-"))
    moto = start_moto()
    try:
        moto.client("s3").create_bucket(Bucket="bench-state")
        mods = base / "modules"
        shutil.copytree(ROOT / "bench" / "modules" / "minimal", mods / "minimal")
        env = {"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": "bench-state",
               "TF_STATE_REGION": "us-east-1", "TF_STATE_ENDPOINT": moto.url,
               "TFSERVER_LOG_LEVEL": "INFO", **moto.aws_env()}
        srv = start_server(base / "srv", modules_dir=mods, env=env)
        assert srv.request("PUT", "/minimal/read", {"name": "bench"}).status == 201

        raw = base / "raw"
        shutil.copytree(mods / "minimal", raw)
        (raw / "backend_override.tf.json").write_text(
            json.dumps({"terraform": {"backend": {"s3": {}}}}))
        settings = S3Settings(bucket="bench-state", region="us-east-1", key_prefix="tfserver",
                              endpoint=moto.url)
        tf_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
                  "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", **moto.aws_env(),
                  "TF_CLI_CONFIG_FILE": str(base / "srv" / "state" / "terraformrc")}
        init = ["terraform", "init", "-input=false", "-no-color",
                *[f"-backend-config={k}={v}" for k, v in s3_backend_config(settings,
                                                                           "minimal")]]
        subprocess.run(init, cwd=raw, env={**tf_env, "TF_WORKSPACE": "default"}, check=True,
                       capture_output=True, timeout=120)
        out_env = {**tf_env, "TF_WORKSPACE": "local.read"}
        conn = http.client.HTTPConnection(srv.url.split("//")[1], timeout=60)
        get, out = [], []
        for i in range(args.rounds):
            def server_get() -> None:
                conn.request("GET", "/minimal/read")
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read())["outputs"]["name"]

            def terraform_output() -> None:
                done = subprocess.run(["terraform", "output", "-json"], cwd=raw, env=out_env,
                                      capture_output=True, text=True, timeout=120, check=True)
                assert json.loads(done.stdout)["name"]["value"] == "bench"

            order = [(get, server_get), (out, terraform_output)]
            for samples, fn in (order if i % 2 == 0 else order[::-1]):
                started = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - started)
        conn.close()
        srv.stop()
    finally:
        moto.proc.terminate()
        moto.proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
    g, o = statistics.median(get) * 1000, statistics.median(out) * 1000
    print(f"S3 backend on moto's server, {args.rounds} interleaved rounds, medians in ms\n")
    print("| server GET (state object) | terraform output -json | output / GET |")
    print("|---:|---:|---|")
    print(f"| {g:.1f} | {o:.1f} | {o / g:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
