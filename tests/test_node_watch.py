"""A lost node that was the only one able to hold a trial: the sweep waits with a message, then stops.

`NodeWatch` is driven here by a scripted list of live nodes (shaped like
``ray.nodes()``'s): the GPU node is there, then gone, then (in one case) back.
"""

from __future__ import annotations

import io
import threading
import time

from orchestrator.cluster import NodeWatch
from training.config.sweep import Resources

GPU_NODE = {"Resources": {"CPU": 4.0, "GPU": 1.0}}
CPU_NODE = {"Resources": {"CPU": 4.0}}


class Script:
    """Live nodes that change when the test says so; counts how often they were read."""

    def __init__(self, *nodes) -> None:
        self.live, self.reads = list(nodes), 0

    def __call__(self) -> list[dict]:
        self.reads += 1
        return list(self.live)


def _watch(script: Script, wait_s: float) -> tuple[NodeWatch, io.StringIO, threading.Event]:
    stream, stopped = io.StringIO(), threading.Event()
    want = Resources(cpu=1.0, gpu=1.0, wait_for_node_s=wait_s)
    watch = NodeWatch(want, sweep="s", nodes=script, poll_s=0.02, say=lambda line: stream.write(line + "\n"),
                      stop=stopped.set)  # fmt: skip
    return watch, stream, stopped


def _reads(script: Script, n: int) -> None:
    """Wait until the watch has looked at the nodes ``n`` more times."""
    until = script.reads + n
    deadline = time.monotonic() + 10
    while script.reads < until and time.monotonic() < deadline:
        time.sleep(0.01)


def test_losing_the_only_gpu_node_says_so_then_stops_the_sweep_after_the_timeout():
    script = Script(GPU_NODE, CPU_NODE)
    watch, stream, stopped = _watch(script, wait_s=0.2)
    with watch:
        _reads(script, 3)
        assert stream.getvalue() == "" and not stopped.is_set()  # the cluster fits: nothing to say
        script.live = [CPU_NODE]  # the GPU node is lost
        assert stopped.wait(5)
    said = stream.getvalue().splitlines()
    assert said == [
        "sweep s: waiting: no live node can hold a trial now (each trial asks for cpu=1, gpu=1, but the largest of "
        "the 1 live node(s) has cpu=4, gpu=0); was a node lost? Waiting up to 0.2 s (resources.wait_for_node_s) "
        "for one to join, then the sweep stops, its state saved, to resume with the same command",
        "sweep s: no live node could hold a trial for 0.2 s (resources.wait_for_node_s): stopping the sweep",
    ]
    assert watch.gave_up == "no live node could hold a trial for 0.2 s"


def test_a_node_back_in_time_lets_the_sweep_go_on():
    script = Script(GPU_NODE)
    watch, stream, stopped = _watch(script, wait_s=30)
    with watch:
        script.live = []  # every node gone, Ray itself still answering
        _reads(script, 3)
        script.live = [CPU_NODE, GPU_NODE]  # a new one joins
        _reads(script, 3)
    said = stream.getvalue().splitlines()
    assert len(said) == 2 and said[0].startswith("sweep s: waiting: no live node can hold a trial now (")
    assert "largest of the 0 live node(s) has cpu=0, gpu=0" in said[0]
    assert said[1] == "sweep s: a node that can hold a trial is live again; the sweep goes on"
    assert not stopped.is_set() and watch.gave_up is None


def test_ray_failing_to_answer_is_not_taken_for_a_lost_node():
    def broken():
        raise ConnectionError("GCS gone")

    stream, stopped = io.StringIO(), threading.Event()
    want = Resources(cpu=1.0, wait_for_node_s=0.0)
    with NodeWatch(want, sweep="s", nodes=broken, poll_s=0.02, say=stream.write, stop=stopped.set):
        time.sleep(0.2)
    assert stream.getvalue() == "" and not stopped.is_set()


def test_refinement_actors_are_no_more_than_the_live_nodes_hold():
    """One CPU per actor, plus one GPU for a GPU actor (`actor_options`), on one node."""
    from orchestrator.refine_actors import actor_capacity

    nodes = [{"Resources": {"CPU": 4.0, "GPU": 1.0}}, {"Resources": {"CPU": 2.0}}]
    assert actor_capacity(nodes, "gpu") == 1  # min(4, 1) + min(2, 0)
    assert actor_capacity(nodes, "cpu") == 6
    assert actor_capacity(nodes, "cpu", gpu_actors=1) == 5  # the GPU actor has one of the 6 CPUs
    assert actor_capacity([{"Resources": {"CPU": 4.0}}], "gpu") == 0  # the GPU node was lost



def test_messages_go_below_the_sweep_consoles_live_table():
    from orchestrator.console import SweepConsole

    screen, now = io.StringIO(), [0.0]
    console = SweepConsole("s", [("000-a", 2)], stream=screen, live=True, clock=lambda: now[0])
    console.tick()  # the live table is drawn
    script, stopped = Script(CPU_NODE), threading.Event()
    want = Resources(cpu=1.0, gpu=1.0, wait_for_node_s=30)
    with NodeWatch(want, sweep="s", nodes=script, poll_s=0.02, say=console.say, stop=stopped.set):
        _reads(script, 3)
    now[0] = 5.0
    console.tick()  # the next redraw
    before, message, after = screen.getvalue().partition("sweep s: waiting: no live node can hold a trial now (")
    assert message and "\x1b[" not in after  # drawn below the message: no cursor move up over it
    assert "000-a" in before and "000-a" in after  # the table, then the message, then the table again
