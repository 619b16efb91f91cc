"""The HTTP server: AUTOMATIC1111's ``/sdapi/v1`` API, a job queue with its own extension under
``/latentforge/v1/jobs``, and a web page (``latentforge serve``; needs the ``server`` extra).

``jobs.py`` owns the worker thread (the only place torch runs), the model cache and the jobs;
``sdapi.py`` translates A1111 JSON to ``GenerationRequest`` and results back; ``app.py`` holds the routes.
"""

from __future__ import annotations

from latentforge.server.config import ServerConfig
from latentforge.server.jobs import Job, JobQueue, QueueFull
from latentforge.server.models import ModelCatalog

__all__ = ["Job", "JobQueue", "ModelCatalog", "QueueFull", "ServerConfig"]
