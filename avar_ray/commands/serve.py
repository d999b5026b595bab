"""``avar serve [--model DIR] [-c CONFIG] [--host H] [--port P] [key=value...]``

Deploys the answer-with-VAS app on Ray Serve (embedded local Ray, or the cluster named by
``ray.address`` / RAY_ADDRESS) and keeps it up until Ctrl-C or SIGTERM. Binds to ``serve.host``
(127.0.0.1 by default). Replicas and their CPUs/GPUs: ``serve.replicas``, ``serve.num_cpus``,
``serve.num_gpus``.
"""
from __future__ import annotations

import signal
import time


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("--model", help="HF model directory (default: model.path)")
    parser.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: serve.port)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. serve.replicas=2")


def run(args) -> int:
    from avar_ray.config import load_config
    from avar_ray.plan import preflight

    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    cfg = load_config(args.config, overrides)
    preflight(cfg, "serve", model=args.model, config_path=args.config)  # before Serve starts
    from avar_ray.serve.app import start_serve, stop_serve

    def interrupt(signum, frame):  # SIGTERM (kill, a pod stopping) shuts down like Ctrl-C
        raise KeyboardInterrupt

    url = start_serve(args.model or cfg.model.path, cfg)
    signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which installs its own handler
    print(f"serving {args.model or cfg.model.path} at {url} (POST {url}answer, GET {url}health); "
          "Ctrl-C or SIGTERM stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down Serve", flush=True)
    finally:
        stop_serve()
    return 0
