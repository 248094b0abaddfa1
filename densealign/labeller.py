"""`densealign label --as NAME --preference KIND`: a programmatic labeller over the REST API.

It stands in for people in demos, tests and benchmarks, through exactly the calls the labelling
page makes: GET /api/v1/pairs/next, the two images, POST /api/v1/judgements (with a fresh client
key, retried on network errors). KIND is a judge from `core.judges` (faithfulness,
compressibility, incompressibility); `--noise` flips that share of decisions to mimic people who
disagree. The token comes from --token or DENSEALIGN_LABEL_TOKEN (an admin's `densealign invite`
link gives one); `--as NAME` only names the run in the log.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import sys
import threading
import time
import uuid
from typing import Any

import httpx
from PIL import Image

from core.judges import Judge, make_judge

log = logging.getLogger("densealign.labeller")


def label_loop(
    *,
    base_url: str,
    token: str,
    client: httpx.Client | None = None,
    preference: str,
    noise: float = 0.0,
    seed: int = 0,
    max_labels: int | None = None,
    idle_wait: float = 2.0,
    stop: threading.Event | None = None,
    name: str = "labeller",
    tie_margin: float | None = None,
) -> int:
    """Judge pairs until `max_labels`, `stop`, or (with idle_wait 0) an empty pool; returns how many.

    `tie_margin`: answer 'tie' (which trains nothing) when the judge's two scores differ by at most
    this much, as a person says "can't tell" on a close pair; None keeps the judge's own (1e-3)."""
    judge = make_judge(preference)
    if tie_margin is not None:
        if tie_margin < 0:
            raise ValueError(f"tie margin {tie_margin} is negative; pass 0 or more")
        judge.tie_margin = tie_margin  # type: ignore[attr-defined]
    rng = random.Random(seed)
    stop = stop or threading.Event()
    done = 0
    owned = client is None
    client = client or httpx.Client(base_url=base_url, timeout=30)
    client.headers["Authorization"] = f"Bearer {token}"
    try:
        while not stop.is_set() and (max_labels is None or done < max_labels):
            try:
                response = client.get("/api/v1/pairs/next")
                response.raise_for_status()
                pair = response.json()["pair"]
                if pair is None:
                    if idle_wait <= 0:
                        break
                    stop.wait(idle_wait)
                    continue
                _post_judgement(client, _judge_pair(client, judge, pair, rng, noise, name))
                done += 1
                if done % 20 == 0:
                    log.info("%s: %d judgements so far", name, done)
            except httpx.HTTPError as exc:
                log.warning("%s: %s; retrying in %.0fs", name, exc, max(idle_wait, 1.0))
                stop.wait(max(idle_wait, 1.0))
    finally:
        if owned:
            client.close()
    return done


def _judge_pair(
    client: httpx.Client, judge: Judge, pair: dict[str, Any], rng: random.Random, noise: float, name: str
) -> dict[str, Any]:
    """The judgement body for a served pair: its two images fetched as the page does, then judged."""
    images = {}
    for key in ("left", "right"):
        image = client.get(pair[key]["url"])
        image.raise_for_status()
        images[key] = Image.open(io.BytesIO(image.content)).convert("RGB")
    started = time.perf_counter()
    verdict: str
    try:
        verdict = judge.prefer(pair["prompt"], images["left"], images["right"], rng, noise)
    except ValueError as exc:  # a prompt this judge cannot read: say so, skip, carry on
        log.warning("%s: skipping pair %s: %s", name, pair["pair_id"], exc)
        verdict = "skip"
    choice = {"a": pair["left"]["side"], "b": pair["right"]["side"], "tie": "tie", "skip": "skip"}[verdict]
    return {
        "pair_id": pair["pair_id"],
        "choice": choice,
        "client_key": f"{name}-{uuid.uuid4().hex}",
        "decide_ms": int(1000 * (time.perf_counter() - started)),
    }


def _post_judgement(client: httpx.Client, body: dict[str, Any]) -> None:
    for attempt in range(3):  # same client key: a retried post records one judgement
        try:
            client.post("/api/v1/judgements", json=body).raise_for_status()
            return
        except httpx.TransportError:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign label", description=__doc__.splitlines()[0])
    parser.add_argument("--as", dest="name", default="oracle", help="a name for this labeller in the log")
    parser.add_argument(
        "--preference", default="faithfulness", help="faithfulness, compressibility, incompressibility"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    parser.add_argument("--token", default=os.environ.get("DENSEALIGN_LABEL_TOKEN"), help="bearer token")
    parser.add_argument("--noise", type=float, default=0.0, help="share of decisions flipped, 0..1")
    parser.add_argument(
        "--tie-margin",
        type=float,
        default=None,
        help="answer 'tie' when the two scores differ by at most this",
    )
    parser.add_argument("--max", type=int, default=None, help="stop after this many judgements")
    parser.add_argument("--once", action="store_true", help="stop when no pair is waiting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s label %(levelname)s %(message)s")
    if not args.token:
        sys.stderr.write("densealign label: no token; pass --token or set DENSEALIGN_LABEL_TOKEN\n")
        return 2
    if not 0.0 <= args.noise <= 1.0:
        sys.stderr.write(f"densealign label: --noise {args.noise} must be between 0 and 1\n")
        return 2
    if args.tie_margin is not None and args.tie_margin < 0:
        sys.stderr.write(f"densealign label: --tie-margin {args.tie_margin} is negative; pass 0 or more\n")
        return 2
    try:
        make_judge(args.preference)
    except ValueError as exc:
        sys.stderr.write(f"densealign label: {exc}\n")
        return 2
    n = label_loop(
        base_url=args.url,
        token=args.token,
        preference=args.preference,
        noise=args.noise,
        seed=args.seed,
        max_labels=args.max,
        idle_wait=0.0 if args.once else 2.0,
        name=args.name,
        tie_margin=args.tie_margin,
    )
    sys.stdout.write(f"{n} judgements recorded\n")
    return 0
