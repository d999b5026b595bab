"""avar-ray: AVAR (attention-guided multimodal reasoning training) on Ray.

Kept import-light on purpose: a start-up hook imports ``avar_ray.compat`` in every
interpreter of the venv.
"""
__version__ = "0.1.0"
