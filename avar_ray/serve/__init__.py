"""Ray Serve application answering with VAS telemetry (``avar serve``).

    from avar_ray.serve import start_serve, stop_serve
    url = start_serve(model_dir, cfg)     # POST {url}answer, GET {url}health

Imports are lazy: ``avar_ray.serve.validation`` works without Ray Serve.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_app", "start_serve", "stop_serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from avar_ray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'avar_ray.serve' has no attribute {name!r}")
