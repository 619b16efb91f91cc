"""The same server as a Ray Serve deployment, to scale out over replicas (extra ``ray``).

Each replica builds its own app with ``create_app`` (its own job queue, worker thread and model cache;
the app's lifespan starts them), so a replica is exactly one ``latentforge serve`` process; Ray's proxy
spreads the HTTP requests over the replicas. Jobs of the ``/latentforge/v1/jobs`` extension live in
the replica that took them, so follow-up requests for a job id need session affinity, or one replica.

From Python::

    import ray
    from ray import serve
    from latentforge.server.ray_serve import deployment
    from latentforge.server.config import ServerConfig

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 7860})
    serve.run(deployment(ServerConfig(model=Path("model.safetensors")), num_replicas=2), route_prefix="/")

or with Ray's command line: ``serve run latentforge.server.ray_serve:app_builder model=model.safetensors
num_replicas=2`` (arguments: model, models_dir, outdir, queue_size, num_replicas, num_cpus).
"""

from __future__ import annotations

from pathlib import Path

from latentforge.server.config import ServerConfig


def deployment(
    config: ServerConfig,
    *,
    users: list[tuple[str, str]] | None = None,
    cors_origins: list[str] | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
):
    """A bound Ray Serve application serving ``create_app(config)`` from ``num_replicas`` replicas."""
    from ray import serve

    def build():
        from latentforge.server.app import create_app

        return create_app(config, users=users, cors_origins=cors_origins)

    ingress = serve.ingress(build)()
    cls = serve.deployment(
        ingress, name="latentforge", num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus}
    )
    return cls.bind()


def app_builder(args: dict[str, str]):
    """``serve run latentforge.server.ray_serve:app_builder model=... num_replicas=...``."""
    from latentforge.demo import bundled_model_path

    model = args.get("model") or (None if args.get("models_dir") else bundled_model_path())
    config = ServerConfig(
        model=Path(model) if model else None,
        models_dir=Path(args["models_dir"]) if args.get("models_dir") else None,
        outdir=Path(args.get("outdir", "outputs")),
        queue_size=int(args.get("queue_size", 64)),
    )
    return deployment(config, num_replicas=int(args.get("num_replicas", 1)), num_cpus=float(args.get("num_cpus", 1)))
