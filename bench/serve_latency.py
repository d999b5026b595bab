"""Ray Serve app latency on the tiny model: deployment start-up, the first answer, warm answers.

    .venv/bin/python bench/serve_latency.py [--requests 5] [--max-new-tokens 16]

Measured in one run on an embedded local Ray (started first, not counted):

  deploy   ``start_serve`` until the app is ready (replica start: model and processor load)
  first    the first POST /answer after that (cold: first forward passes, allocator warm-up)
  warm     the median of ``--requests`` further identical requests (the baseline)
  warm+iv  the median of the same requests with a per-request intervention (transformers
           generation with the key bias, both spans' statistics)

It prints the seconds and the ratios to the warm median. Plain HTTP through Serve's proxy on
127.0.0.1, as a client sees it.
"""
from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from avar_ray.config import load_config
    from avar_ray.data.procedural import generate_samples
    from avar_ray.ray_utils import free_port
    from avar_ray.serve.app import start_serve
    from avar_ray.tiny_model import build_tiny_model

    model = build_tiny_model(tempfile.mkdtemp(prefix="avar-serve-bench-"), seed=0)
    sample = generate_samples(1, seed=3)[0]
    body = {"image": base64.b64encode(sample.images[0]).decode(), "question": sample.question,
            "choices": sample.choices, "max_new_tokens": args.max_new_tokens}
    cfg = load_config(None, ["model.max_model_len=1024", f"serve.port={free_port()}", "serve.num_cpus=1",
                             f"serve.max_new_tokens={args.max_new_tokens}"])
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        t0 = time.perf_counter()
        url = start_serve(str(model), cfg, name="avar-bench")
        deploy = time.perf_counter() - t0

        def post(payload) -> float:
            start = time.perf_counter()
            r = requests.post(url + "answer", json=payload, timeout=300)
            r.raise_for_status()
            return time.perf_counter() - start

        first = post(body)
        warm = statistics.median(post(body) for _ in range(args.requests))
        iv = statistics.median(post({**body, "intervention": {"a_img": 0.15, "a_sys": 0.4}})
                               for _ in range(args.requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{'phase':<10}{'seconds':>10}{'x warm':>10}")
    for name, sec in (("deploy", deploy), ("first", first), ("warm", warm), ("warm+iv", iv)):
        print(f"{name:<10}{sec:>10.3f}{sec / warm:>10.1f}")
    print(f"first answer {deploy + first:.2f} s after start_serve was called "
          f"({args.max_new_tokens} new tokens at most, tiny model, CPU)")


if __name__ == "__main__":
    main()
