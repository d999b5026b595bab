"""The Ray Serve application: ``POST /answer`` (an image and a question -> the answer with its
VAS, alpha_img and per-layer profile; optional intervention per request) and ``GET /health``.

    from avar_ray.serve import start_serve
    url = start_serve("runs/rl/final", cfg)        # http://127.0.0.1:8000/
    requests.post(url + "answer", json={"image": b64, "question": "How many circles?"})

Errors are JSON ``{"error": {"field": ..., "message": ...}}`` with a 4xx status: 400 bad or
missing field / malformed body, 411 no Content-Length, 413 body, image bytes or pixels over the
limits, 415 a content type other than JSON or multipart. Binds to ``serve.host``
(127.0.0.1 by default: nothing outside the machine can reach it unless configured).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from avar_ray.config import InterventionConfig, RunConfig, ServeConfig
from avar_ray.serve.validation import FORM_FIELDS, RequestError, from_form, from_json, max_body_bytes

APP_NAME = "avar"
log = logging.getLogger("avar_ray.serve")
api = FastAPI(title="AVAR: answers with visual-attention telemetry")


async def read_request(request: Request, cfg: ServeConfig, intervention: InterventionConfig):
    """Body -> ``AnswerRequest`` within the limits (intervention fields a request leaves out:
    ``intervention``, the run's section); ``RequestError`` otherwise."""
    length = request.headers.get("content-length")
    if length is None:
        raise RequestError(411, "body", "a Content-Length header is required")
    if not length.isdigit():
        raise RequestError(400, "body", f"bad Content-Length {length!r}")
    if int(length) > max_body_bytes(cfg):
        raise RequestError(413, "body", f"{length} bytes exceeds the limit of {max_body_bytes(cfg)}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return from_json(await request.body(), cfg, intervention)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=len(FORM_FIELDS))
        except Exception as exc:  # malformed multipart, too many parts, parser missing
            raise RequestError(400, "body", f"unreadable multipart form: {exc}") from None
        fields, image = {}, None
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            elif key == "image":
                image = await value.read(cfg.max_image_bytes + 1)
            else:
                raise RequestError(400, key, "unexpected file part (only 'image' is a file)")
        return from_form(fields, image, cfg, intervention)
    raise RequestError(415, "content-type", f"{kind or 'none'}: send application/json or multipart/form-data")


@serve.deployment(name="AvarAnswer")
@serve.ingress(api)
class AvarAnswer:
    def __init__(self, model_dir: str, cfg: RunConfig):
        from avar_ray.serve.engine import AnswerEngine

        self.cfg, self.intervention = cfg.serve, cfg.intervention
        self.engine = AnswerEngine(model_dir, cfg.model, device=cfg.serve.device, layers=cfg.attention.layers,
                                   chunk_size=cfg.attention.chunk_size)

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.engine.model_dir, "layers": self.engine.num_layers}

    @api.post("/answer")
    async def answer(self, request: Request) -> JSONResponse:
        try:
            req = await read_request(request, self.cfg, self.intervention)
            # the model call blocks: run it off the event loop so health checks still answer
            result = await asyncio.to_thread(self.engine.answer, req)
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except Exception as exc:  # the model side failed: a JSON 500, the replica stays up
            log.exception("answer failed")
            return JSONResponse({"error": {"field": None, "message": f"internal error: {exc}"}}, status_code=500)
        return JSONResponse(result)


def build_app(model_dir: str, cfg: RunConfig):
    """The bound application, replicas and resources from ``cfg.serve``."""
    s = cfg.serve
    return AvarAnswer.options(
        num_replicas=s.replicas, max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(str(model_dir), cfg)


def start_serve(model_dir: str, cfg: RunConfig, name: str = APP_NAME) -> str:
    """Start (or reuse) Ray and Serve's HTTP proxy on ``serve.host:serve.port``, deploy the app
    and wait until it is ready; returns its base URL."""
    from avar_ray.ray_utils import init_ray

    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(model_dir, cfg), name=name, route_prefix=cfg.serve.route_prefix)
    prefix = cfg.serve.route_prefix.rstrip("/") + "/"
    return f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}"


def stop_serve(name: Optional[str] = None) -> None:
    """Delete one application (``name``) or shut Serve down entirely (None)."""
    if name is None:
        serve.shutdown()
    else:
        serve.delete(name)
