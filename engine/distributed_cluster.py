"""The driver's side of Ray itself (:mod:`convlens.engine.distributed`): importing it
only when asked, starting or joining a cluster, and where the actors go."""

from __future__ import annotations

import dataclasses
import logging
from types import ModuleType
from typing import Any

from .distributed_worker import WorkerSetup
from .plan import RunError, RunOptions
from .runtime import cpu_only

LOCAL = "local"  # --ray with no address: start a Ray instance on this machine


def import_ray() -> ModuleType:
    """Ray, imported only when asked for; a one-line error without the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RunError(
            f"--ray needs Ray ({exc.name or 'ray'} is not installed): pip install 'convlens[ray]'"
        ) from exc
    return ray


@dataclasses.dataclass(frozen=True)
class Placement:
    """Actors and what each one holds: from the cluster's resources unless set."""

    workers: int
    cpus: float
    gpus: float
    device: str  # each actor's: "cpu" or "cuda"

    @classmethod
    def of(cls, resources: dict[str, float], options: RunOptions) -> Placement:
        """GPU actors (one GPU, the CPUs per GPU for decoding) with ``--device cuda``,
        or ``auto`` on a cluster with GPUs unless the run is OpenVINO's (``--runtime
        openvino``, ``--precision bf16``: CPU only); else one CPU per actor, one actor
        per CPU."""
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        if options.device == "cuda" and not gpus:
            raise RunError("--device cuda: the Ray cluster has no GPU")
        on_cpu = cpu_only(options.runtime, options.precision)
        if options.device == "cuda" and on_cpu:
            raise RunError("--device cuda: --runtime openvino and --precision bf16 run on the CPU")
        if gpus and (options.device == "cuda" or (options.device == "auto" and not on_cpu)):
            per = max(1, cpus // gpus)
            return cls(options.ray_workers or gpus, per, 1, "cuda")
        return cls(options.ray_workers or max(1, cpus), 1, 0, "cpu")

    def actor_options(self, options: RunOptions) -> RunOptions:
        """One actor's options: its device, and threads for its CPUs."""
        per = max(1, int(self.cpus))
        return dataclasses.replace(
            options,
            device=self.device,
            threads=options.threads or per,
            workers=options.workers or per,
            ray=None,
        )


class Pool:
    """The actor pool: Ray is joined or started, and the actors' placement read from
    the cluster, only when a first unit is to run (a run with nothing left to do
    starts nothing).  ``setup`` is the run's, set before; :meth:`ready` makes its
    options one actor's."""

    def __init__(self, ray: ModuleType, options: RunOptions):
        self.ray = ray
        self.options = options
        self.setup: WorkerSetup | None = None
        self.place: Placement | None = None
        self.started = False

    def ready(self) -> tuple[ModuleType, Placement, WorkerSetup]:
        if self.setup is None:
            raise RuntimeError("Pool.ready before the run's setup")
        if self.place is None:
            self.started = connect(self.ray, self.options.ray or LOCAL)
            self.place = Placement.of(self.ray.cluster_resources(), self.options)
            opts = self.place.actor_options(self.options)
            self.setup = dataclasses.replace(self.setup, options=opts)
        return self.ray, self.place, self.setup

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def connect(ray: ModuleType, address: str) -> bool:
    """Join the cluster at ``address`` (``auto``, HOST:PORT, ray://...) or start a local
    instance (``local``); True when this call started the connection (the caller shuts
    it down).  A process already connected (``ray.init`` by the user) is used as is."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return False
    for name in ("ray", "ray.data"):  # Ray's own notes are not the run's
        logging.getLogger(name).setLevel(logging.ERROR)
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address == LOCAL:  # a new instance, even where one is running already
            ray.init(address="local", include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot start or join Ray at {address}: {first}") from exc
    return True
