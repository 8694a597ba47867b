"""Benchmark: what token verification adds to a request, with a warm key cache.

    python bench/bench_auth.py [--tokens N]

Signs N distinct Cognito-shaped access tokens with a key of its own, serves the JWKS on
127.0.0.1, warms the cache with one verification, then times each `authenticate` call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import Jwks, Signer  # noqa: E402
from tfserver.auth import JWTAuth, KeySource  # noqa: E402
from tfserver.config import AuthSettings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    signer = Signer("bench-key")
    jwks = Jwks()
    jwks.publish(signer)
    try:
        auth = JWTAuth(AuthSettings(issuer=Signer.ISSUER, jwk_url=jwks.url),
                       KeySource.from_url(jwks.url, timeout=5, min_refresh=60, ttl=3600))
        headers = [f"Bearer {signer.token(f'client-{i % 10}', 'tfserver/demo.write')}"
                   for i in range(args.tokens)]
        auth.authenticate(headers[0])  # warm the key cache
        samples = []
        for h in headers:
            started = time.perf_counter()
            auth.authenticate(h)
            samples.append(time.perf_counter() - started)
    finally:
        jwks.close()
    ms = sorted(s * 1000 for s in samples)
    print(f"{args.tokens} distinct RS256 access tokens, warm cache, {jwks.fetches} JWKS fetch\n")
    print("| median ms | p90 ms | p99 ms | target |")
    print("|---:|---:|---:|---|")
    print(f"| {statistics.median(ms):.3f} | {ms[int(len(ms) * 0.9)]:.3f} | "
          f"{ms[int(len(ms) * 0.99)]:.3f} | median < 1 ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
