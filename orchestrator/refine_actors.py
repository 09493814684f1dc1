"""Work units of the refinement fan-out, the per-unit code, and the Ray actors that run it.

A unit (:class:`RefineUnit`) is one CAM shard of one trial × one ``postproc``
pipeline setting. :func:`run_unit` reads the shard, refines every CAM, scores it
against the expert masks and writes into ``<trial_dir>/refine/<slug>-<sha8>/``
``shard-NNNNN.masks.npz`` (packed bool masks) and then ``shard-NNNNN.counts.json``
(per-image intersection/union, the summed ``IoUCounter``, the pipeline key and
the shard's SHA-256). Both are written atomically, the counts file last, so its
presence marks a finished unit; results are always read back from it.

:func:`fan_out` keeps a few actors busy with units: CPU actors (CRF,
superpixels) see no GPU; SAM pipelines go to GPU actors, which build each
pipeline (and so load SAM) once. An actor that dies costs only its unit: the
actor is replaced and the unit requeued, up to ``max_retries`` times.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from postproc.pipeline import Pipeline
from training.atomic import atomic_path, atomic_write_text
from training.config.refine import ThresholdStep, pipeline_key, pipeline_uses_gpu
from training.errors import ConfigError, DataError, WsssError
from training.metrics import IoUCounter, iou_counts
from training.shards import INDEX, read_shard
from training.trial_dir import TrialDir

SEED_SPEC: list[dict[str, Any]] = []  # the empty pipeline: seed_mask(cam, threshold=0.3), key "seed"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
# How long an unreachable actor's fate is awaited (`_await_verdict`): Ray declares a node dead after
# its health checks fail (by default 5 missed pings 3 s apart, each with its own timeout).
VERDICT_TIMEOUT_S = 60.0


class RefineFailed(WsssError):
    """Some units failed; every unit that finished has been written and is in ``results``."""

    def __init__(self, message: str, results: list[UnitResult]) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class RefineUnit:
    """One CAM shard of one trial × one pipeline setting.

    Attributes:
        trial_dir: the trial's folder (holds ``config.yaml`` and ``cams/``).
        trial_id: the trial's name in tables and MLflow.
        shard: the CAM shard file, listed in ``trial_dir/cams/index.json``.
        data_root: dataset folder whose ``test/`` split the CAMs belong to.
        spec: the pipeline as ``[{"step": name, **params}, ...]``; ``[]`` is the seed.
        seed_threshold: the trial's ``cam.threshold``: the seed mask and the CRF's decision.
    """

    trial_dir: Path
    trial_id: str
    shard: Path
    data_root: Path
    spec: list[dict[str, Any]] = field(default_factory=list, hash=False)
    seed_threshold: float = ThresholdStep.threshold

    @property
    def key(self) -> str:
        return pipeline_key(self.spec)

    @property
    def out_dir(self) -> Path:
        return refine_dir(self.trial_dir, self.key)

    @property
    def counts_path(self) -> Path:
        return self.out_dir / f"{self.shard.stem}.counts.json"

    @property
    def masks_path(self) -> Path:
        return self.out_dir / f"{self.shard.stem}.masks.npz"

    @property
    def needs_gpu(self) -> bool:
        """Whether a step proposes regions with SAM (run on a GPU actor)."""
        return pipeline_uses_gpu(self.spec)

    def __str__(self) -> str:
        return f"{self.trial_id}/{self.shard.name} × {self.key}"


@dataclass
class UnitResult:
    """What became of one unit. ``counter`` is read back from the counts file (None when failed)."""

    unit: RefineUnit
    status: str  # done | skipped | failed
    counter: IoUCounter | None = None
    images: int = 0
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None
    node: str = ""  # the Ray node that refined it ("" when skipped or run without Ray)


def refine_dir(trial_dir: Path, key: str) -> Path:
    """``<trial_dir>/refine/<slug>-<sha8>``: readable, and unique per pipeline key."""
    slug = re.sub(r"[^A-Za-z0-9.=,-]+", "_", key).strip("_")[:80]
    return TrialDir(trial_dir).refine / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- one unit


@lru_cache(maxsize=16)
def _test_items(root: Path) -> dict[str, Any]:
    from training.data import scan_test

    return {item.id: item for item in scan_test(root)}


def shard_sha(shard: Path) -> str | None:
    """The shard's SHA-256 as listed in its ``index.json`` (None when unlisted or unreadable)."""
    try:
        entries = json.loads((shard.parent / INDEX).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return None
    return next((e.get("sha256") for e in entries if e.get("file") == shard.name), None)


def read_counts(unit: RefineUnit) -> dict[str, Any] | None:
    """The unit's counts record when it is finished and still matches its shard, else None."""
    try:
        record = json.loads(unit.counts_path.read_text())
        IoUCounter.from_dict(record["counter"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fresh = record.get("pipeline") == unit.key and record.get("shard_sha256") == shard_sha(unit.shard)
    fresh = fresh and record.get("seed_threshold", ThresholdStep.threshold) == unit.seed_threshold
    return record if fresh and unit.masks_path.is_file() else None


def run_unit(unit: RefineUnit, pipeline: Pipeline | None = None) -> int:
    """Refine and score one unit, writing its masks then its counts file.

    Args:
        unit: the work unit.
        pipeline: ``Pipeline.from_spec(unit.spec)`` when already built (SAM loads once).

    Returns:
        The number of images refined.

    Raises:
        DataError: the shard is truncated or altered (named), or a CAM has no
            test image / mask of the same id and size.
    """
    from training.data import read_image, read_mask

    start = time.perf_counter()
    pipeline = pipeline or Pipeline.from_spec(unit.spec)
    sha, shard, items = shard_sha(unit.shard), read_shard(unit.shard), _test_items(unit.data_root)
    counter, records, masks = IoUCounter(), [], []
    for image_id, cam in zip(shard.ids, shard.cams, strict=True):
        if image_id not in items:
            raise DataError(f"{unit.shard}: CAM {image_id!r} has no test image in {unit.data_root / 'test'}")
        image = read_image(items[image_id].image)
        gt = read_mask(items[image_id].mask, shape=image.shape[:2], image=items[image_id].image)
        if cam.shape != gt.shape:
            raise DataError(f"{unit.shard}: CAM {image_id!r} is {cam.shape}, its image {gt.shape}; expected the same")
        mask = pipeline(image, cam, seed_threshold=unit.seed_threshold)
        intersection, union = iou_counts(mask, gt)
        counter.add_counts(intersection, union, has_smoke=bool(gt.any()))
        records.append({"id": image_id, "intersection": intersection, "union": union, "has_smoke": bool(gt.any())})
        masks.append(mask)
    unit.out_dir.mkdir(parents=True, exist_ok=True)
    write_masks(unit.masks_path, shard.ids, masks)
    record = {"pipeline": unit.key, "spec": unit.spec, "seed_threshold": unit.seed_threshold,
              "trial_id": unit.trial_id, "shard": unit.shard.name,
              "shard_sha256": sha, "counter": counter.to_dict(), "images": records,
              "seconds": round(time.perf_counter() - start, 4)}
    atomic_write_text(unit.counts_path, json.dumps(record, indent=1))  # last: marks the unit finished
    return len(records)


def attempt_unit(unit: RefineUnit, pipelines: dict[str, Pipeline]) -> dict[str, Any]:
    """:func:`run_unit` with its failure turned into a reply; ``pipelines`` caches built pipelines by key."""
    start = time.perf_counter()
    try:
        if unit.key not in pipelines:
            pipelines[unit.key] = Pipeline.from_spec(unit.spec)
        images = run_unit(unit, pipelines[unit.key])
    except Exception as err:  # one bad unit must not stop the others; reported by name at the end
        return {"status": FAILED, "error": f"{type(err).__name__}: {err}", "node": node_id()}
    return {"status": DONE, "images": images, "seconds": time.perf_counter() - start, "node": node_id()}


def node_id() -> str:
    """This process's Ray node id, or "" outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def write_masks(path: Path, ids: Sequence[str], masks: Sequence[np.ndarray]) -> None:
    """Save H×W bool masks packed 8 per byte, atomically."""
    shapes = np.array([m.shape for m in masks], dtype=np.int64).reshape(-1, 2)
    flat = np.concatenate([m.ravel() for m in masks]) if masks else np.zeros(0, bool)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.array(list(ids), dtype=str), shapes=shapes, bits=np.packbits(flat))


def read_masks(path: Path) -> dict[str, np.ndarray]:
    """{image id: H×W bool mask} from a ``*.masks.npz`` file."""
    with np.load(path, allow_pickle=False) as z:
        ids, shapes, bits = [str(i) for i in z["ids"]], z["shapes"], z["bits"]
    sizes = [int(h * w) for h, w in shapes]
    flat = np.unpackbits(bits, count=sum(sizes)).astype(bool)
    parts = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return {i: p.reshape(tuple(s)) for i, p, s in zip(ids, parts, shapes, strict=True)}


# ---------------------------------------------------------------- running many units


def collect(unit: RefineUnit, reply: Mapping[str, Any], attempts: int) -> UnitResult:
    """The unit's result, its counts read back from the counts file."""
    node = reply.get("node", "")
    if reply["status"] == FAILED:
        return UnitResult(unit, FAILED, attempts=attempts, error=reply["error"], node=node)
    record = read_counts(unit)
    if record is None:
        return UnitResult(unit, FAILED, attempts=attempts, error=f"no valid counts file {unit.counts_path}", node=node)
    counter = IoUCounter.from_dict(record["counter"])
    seconds = reply.get("seconds", 0.0)
    return UnitResult(unit, reply["status"], counter, len(record["images"]), attempts, seconds, node=node)




# ---------------------------------------------------------------- Ray actors

CPU, GPU = "cpu", "gpu"


class RefineWorker:
    """State of one Ray actor: the pipelines it has built, by key (SAM loads once per key)."""

    def __init__(self) -> None:
        self._pipelines: dict[str, Pipeline] = {}

    def run(self, unit: RefineUnit) -> dict[str, Any]:
        """Refine one unit; returns :func:`attempt_unit`'s reply."""
        return attempt_unit(unit, self._pipelines)


def actor_options(kind: str) -> dict[str, Any]:
    """Ray options of a CPU or GPU refinement actor (restarts are handled by the dispatcher)."""
    # SPREAD: on a cluster the pool fans out over the nodes instead of filling the first one.
    if kind == GPU:
        return {"num_cpus": 1, "num_gpus": 1, "max_restarts": 0, "scheduling_strategy": "SPREAD"}
    # Ray lets an actor with num_gpus=0 see every GPU unless the variable is emptied.
    hide_gpus = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    return {"num_cpus": 1, "num_gpus": 0, "max_restarts": 0, "runtime_env": hide_gpus, "scheduling_strategy": "SPREAD"}


def actor_capacity(nodes: Sequence[Mapping[str, Any]], kind: str, *, gpu_actors: int = 0) -> int:
    """How many refinement actors of ``kind`` the nodes hold (`actor_options`: 1 CPU each, +1 GPU for GPU ones).

    Args:
        nodes: live nodes, each with ``Resources`` as ``ray.nodes()`` gives them.
        kind: ``cpu`` or ``gpu``.
        gpu_actors: GPU actors of the pool, whose CPU a CPU actor cannot have.
    """
    per_node = [(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0))) for n in nodes]
    if kind == GPU:
        return sum(min(cpu, gpu) for cpu, gpu in per_node)
    return max(0, sum(cpu for cpu, _ in per_node) - gpu_actors)


def _live_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


@dataclass
class _Slot:
    """One actor place of the pool; the actor is (re)created when work is handed to it."""

    kind: str
    actor: Any = None
    busy: bool = False


class _Dispatcher:
    """Keeps every actor busy with one unit from its queue; requeues the unit of an actor that died."""

    def __init__(self, units: Sequence[RefineUnit], queues: dict[str, deque], sizes: dict[str, int],
                 max_retries: int, bar: Any) -> None:
        import ray

        self.units, self.queues, self.max_retries, self.bar = units, queues, max_retries, bar
        self.worker_cls = ray.remote(RefineWorker)
        # No more actors than the live nodes hold: one that could never start would keep its unit forever.
        nodes, wanted = _live_nodes(), {kind: min(n, len(queues[kind])) for kind, n in sizes.items()}
        held = {GPU: actor_capacity(nodes, GPU)}
        held[CPU] = actor_capacity(nodes, CPU, gpu_actors=min(wanted[GPU], held[GPU]))
        self.slots = [_Slot(kind) for kind, n in wanted.items() for _ in range(min(n, held[kind]) or n)]
        self.in_flight: dict[Any, tuple[_Slot, int]] = {}
        self.attempts = {index: 0 for queue in queues.values() for index in queue}
        self.replies: dict[int, dict[str, Any]] = {}
        self.images, self.start = 0, time.perf_counter()

    def run(self) -> dict[int, dict[str, Any]]:
        """Run every queued unit; returns {unit index: reply}."""
        import ray

        try:
            self._feed()
            while self.in_flight:
                [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
                slot, index = self.in_flight.pop(ref)
                self._receive(slot, index, ref)
                self._feed()
        finally:
            for slot in self.slots:
                self._retire(slot)
        return self.replies

    def _feed(self) -> None:
        for slot in self.slots:
            queue = self.queues[slot.kind]
            if slot.busy or not queue:
                continue
            if slot.actor is None:
                slot.actor = self.worker_cls.options(**actor_options(slot.kind)).remote()
            index = queue.popleft()
            self.attempts[index] += 1
            self.in_flight[slot.actor.run.remote(self.units[index])] = (slot, index)
            slot.busy = True

    def _receive(self, slot: _Slot, index: int, ref: Any) -> None:
        import ray

        slot.busy = False
        try:
            reply = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            if isinstance(err, ray.exceptions.ActorUnavailableError):
                _await_verdict(slot.actor)
            self._retire(slot)
            if read_counts(self.units[index]) is not None:  # it died after finishing the unit
                reply = {"status": DONE}
            elif self.attempts[index] <= self.max_retries:
                self.queues[slot.kind].appendleft(index)
                self._shrink(slot)
                return
            else:
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                died = f"its actor died {self.attempts[index]} time(s); last: {first_line}"
                reply = {"status": FAILED, "error": died}
        except ray.exceptions.RayTaskError as err:
            reply = {"status": FAILED, "error": str(err)}
        self._record(index, reply)

    def _record(self, index: int, reply: dict[str, Any]) -> None:
        self.replies[index] = reply
        self.images += reply.get("images", 0)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.images / (time.perf_counter() - self.start):.2f} images/s")

    def _shrink(self, slot: _Slot) -> None:
        """After an actor died: drop its slot if the live nodes no longer hold every actor of its kind.

        Its node may have been lost. Its unit is requeued for the actors left;
        when none of its kind is left, the units queued for that kind fail, named.
        """
        same = [s for s in self.slots if s.kind == slot.kind]
        gpu_actors = sum(s.kind == GPU for s in self.slots)
        if len(same) <= actor_capacity(_live_nodes(), slot.kind, gpu_actors=gpu_actors):
            return
        self.slots.remove(slot)
        if len(same) == 1:
            queue = self.queues[slot.kind]
            while queue:
                self._record(queue.popleft(), {"status": FAILED, "error": f"no live node can hold a {slot.kind} "
                                               "refinement actor any more (was its node lost?)"})  # fmt: skip

    def _retire(self, slot: _Slot) -> None:
        import ray

        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
            slot.actor = None


def _await_verdict(actor: Any, timeout_s: float = VERDICT_TIMEOUT_S) -> None:
    """Wait until Ray has declared an unreachable actor dead (or ``timeout_s`` passed).

    A killed process is reported dead at once by its node; a lost node is not:
    its actors are only "unavailable" (the raylet's socket closed) until Ray's
    health checks declare the node dead. A replacement created meanwhile can be
    placed on that node and die with it, costing its unit a second retry; once
    the verdict is in, `_Dispatcher._shrink` sees the node gone.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:  # the GCS's actor table: works without the dashboard that ray.util.state needs
            info = ray._private.state.actors(actor._actor_id.hex())
        except Exception:  # no verdict to be had: go on as for a dead actor
            return
        if not info or info.get("State") == "DEAD":
            return
        time.sleep(0.5)


def _check_pool(queues: dict[str, deque], units: Sequence[RefineUnit], cpu_actors: int, gpu_actors: int,
                max_retries: int) -> None:
    for name, value in (("cpu_actors", cpu_actors), ("gpu_actors", gpu_actors), ("max_retries", max_retries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}: expected an integer ≥ 0, got {value!r}")
    if queues[CPU] and cpu_actors < 1:
        raise ConfigError(f"cpu_actors: {len(queues[CPU])} CPU unit(s) to refine need at least 1 CPU actor")
    if queues[GPU] and gpu_actors < 1:
        keys = sorted({units[i].key for i in queues[GPU]})
        raise ConfigError(f"gpu_actors: pipeline(s) {', '.join(keys)} use the sam backend and need ≥ 1 GPU actor")


def _ensure_ray(need_gpus: bool) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)  # never join a `ray start` cluster by accident
    if need_gpus and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("gpu_actors: the Ray cluster has no GPU; SAM pipelines need one (or `ray.init(num_gpus=…)`)")


def fan_out(
    units: Sequence[RefineUnit],
    *,
    cpu_actors: int,
    gpu_actors: int = 0,
    max_retries: int = 2,
    progress: bool = True,
) -> list[UnitResult]:
    """Run the units on Ray actors; finished units (valid counts files) are skipped.

    Args:
        units: the work units.
        cpu_actors: actors for CRF / superpixel pipelines (1 CPU each, no GPU visible).
        gpu_actors: actors for SAM pipelines (1 GPU each).
        max_retries: times a unit is requeued after its actor died, before it fails.
        progress: show a tqdm bar (units done / total, images/s).

    Returns:
        One result per unit, in order; failed units are marked, not raised.
    """
    from tqdm import tqdm

    replies: dict[int, dict[str, Any]] = {i: {"status": SKIPPED} for i, u in enumerate(units) if read_counts(u)}
    queues: dict[str, deque] = {CPU: deque(), GPU: deque()}
    for index, unit in enumerate(units):
        if index not in replies:
            queues[GPU if unit.needs_gpu else CPU].append(index)
    _check_pool(queues, units, cpu_actors, gpu_actors, max_retries)
    attempts: dict[int, int] = {}
    bar = tqdm(total=len(units), initial=len(replies), desc="refine", unit="unit", disable=not progress)
    try:
        if queues[CPU] or queues[GPU]:
            _ensure_ray(bool(queues[GPU]))
            dispatcher = _Dispatcher(units, queues, {CPU: cpu_actors, GPU: gpu_actors}, max_retries, bar)
            replies |= dispatcher.run()
            attempts = dispatcher.attempts
    finally:
        bar.close()
    return [collect(unit, replies[i], attempts.get(i, 0)) for i, unit in enumerate(units)]
