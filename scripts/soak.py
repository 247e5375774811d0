"""Soak test of a running `slimlm serve`: many requests, some cancelled midway; nothing may leak.

    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 32

Sends N completion requests (random prompt and output lengths, half of them streamed) at
concurrency C; 10% are streamed and cancelled after their first tokens (the client disconnects).
Reads /metrics before and after: at the end every KV block must be free and no request running.
Reports 5xx count, other errors, the server's RSS (from /metrics) after every 10% of the requests,
its growth from the end of the warm-up (--warmup requests) to the end, and the time.
Exits non-zero if a check fails. Only loopback addresses are accepted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from urllib.parse import urlparse

import httpx

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def one(client: httpx.AsyncClient, rng: random.Random, counts: dict, cancel: bool) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))
    body = {"prompt": prompt, "max_tokens": rng.randint(1, 64), "temperature": rng.choice([0, 0.8])}
    try:
        if cancel or rng.random() < 0.5:
            body["stream"] = True
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code >= 500:
                    counts["5xx"] += 1
                elif r.status_code >= 400:
                    counts["4xx"] += 1
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        seen += 1
                        if cancel and seen >= 2:
                            counts["cancelled"] += 1
                            return  # leaving the context closes the connection mid-stream
        else:
            r = await client.post("/v1/completions", json=body)
            if r.status_code >= 500:
                counts["5xx"] += 1
            elif r.status_code >= 400:
                counts["4xx"] += 1
        counts["ok"] += 1
    except httpx.HTTPError as err:
        counts["transport"] += 1
        counts.setdefault("examples", []).append(repr(err)[:200])


async def main(args) -> int:
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"refusing {args.url}: the soak test only targets loopback addresses", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    counts = {"ok": 0, "4xx": 0, "5xx": 0, "transport": 0, "cancelled": 0}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=120, limits=limits) as client:
        before = (await client.get("/metrics")).text
        sem = asyncio.Semaphore(args.concurrency)
        rss_warm = None
        rss_series = []
        done = 0
        start = time.perf_counter()

        async def guarded(i: int) -> None:
            nonlocal rss_warm, done
            async with sem:
                await one(client, rng, counts, cancel=rng.random() < 0.10)
            done += 1
            if done == args.warmup or done % max(1, args.requests // 10) == 0:
                rss = metric((await client.get("/metrics")).text, "process_resident_memory_bytes")
                if done == args.warmup:
                    rss_warm = rss
                if done % max(1, args.requests // 10) == 0:
                    rss_series.append(round(rss / 2**20))

        await asyncio.gather(*(guarded(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
        await asyncio.sleep(1.0)  # let the server notice the last disconnects
        after = (await client.get("/metrics")).text
    used = metric(after, "slimlm_kv_blocks_used")
    running = metric(after, "slimlm_num_requests_running")
    rss_end = metric(after, "process_resident_memory_bytes")
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    report = {"requests": args.requests, "concurrency": args.concurrency, "seconds": round(wall, 1), **counts,
              "kv_blocks_used_at_end": used, "requests_running_at_end": running,
              "kv_blocks_used_before": metric(before, "slimlm_kv_blocks_used"),
              "rss_mib_every_10_percent": rss_series, "rss_growth_after_warmup": round(growth, 4)}
    print(json.dumps(report, indent=2))
    ok = counts["5xx"] == 0 and counts["transport"] == 0 and used == 0 and running == 0 and not (growth > 0.05)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=500, help="requests before the RSS baseline is read")
    p.add_argument("--seed", type=int, default=0)
    sys.exit(asyncio.run(main(p.parse_args())))
