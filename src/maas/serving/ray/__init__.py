"""``maas serve --engine ray``: the maas app as a Ray Serve deployment of N replicas behind a maas front.

The front (:mod:`~maas.serving.ray.front`) runs in the ``maas serve`` process and holds the port: it reads each
request, forwards it to a replica through a deployment handle and retries it on another replica if its replica dies
before answering. Each replica (:mod:`~maas.serving.ray.replica`) builds its own app with :func:`create_app` (its own
model manager, batchers and metrics) and opens the shared registry named by the ``MAAS_*`` settings, which reach it
through Ray's ``runtime_env``. A local Ray is started on 127.0.0.1 unless an address is given. Ray has no
authentication of its own: keep its ports on loopback or a private network. Ray is imported only under this package,
and only when this engine is chosen.
"""

from maas.serving.ray.engine import parse_autoscale, serve_on_ray

__all__ = ["parse_autoscale", "serve_on_ray"]
