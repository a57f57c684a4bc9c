"""Training on several devices: ``fit`` through Lightning Fabric's ``FabricEngine``.

``fit(..., devices=2, strategy="ddp"|"fsdp")`` ends up here (``fit_distributed``), and so
does a ``fit`` in a process that ``torchrun``/``fabric run`` started. Every rank runs the
same loop as one process (``lab.train.loop.train``). How the processes start:

- from a script, Fabric runs the script again once per extra device;
- under ``torchrun``/``fabric run``, they exist already and ``fit`` joins them;
- from a notebook, where there is no script to run again, ``fit`` forks one worker per
  device (``fit_forked``), relays rank 0's steps to the notebook's callbacks and loads
  rank 0's final weights into the caller's model.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import threading
import traceback
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from lab.train.checkpoints import latest_checkpoint, load_weights, write_weights
from lab.train.fabric import FabricEngine
from lab.train.loop import Progress, Settings, report_interrupt, train
from lab.train.state import History, Hook, TrainState, split_callbacks


def fit_distributed(
    model: nn.Module,
    data: Any,
    settings: Settings,
    callbacks: Iterable[Any],
    *,
    accelerator: str,
    devices: int | str | None,
    strategy: str | None,
    num_nodes: int,
    precision: str,
) -> History:
    """``fit``'s multi-device path: start or join the processes, then train on each."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if devices is None:  # joined a torchrun/fabric-run group: one device per process
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        num_nodes = int(os.environ.get("WORLD_SIZE", "1")) // devices
    from lightning_fabric.utilities.imports import _IS_INTERACTIVE

    fork = _IS_INTERACTIVE and not launched  # no script to re-run
    if fork and "fork" not in multiprocessing.get_all_start_methods():
        raise RuntimeError(
            "fit(devices=...) from a notebook forks one worker process per device, and "
            "this platform cannot fork; put the code in a script (main code under "
            "`if __name__ == '__main__':`) and run that, or train on one device"
        )
    engine = FabricEngine(accelerator, devices, strategy or "ddp", num_nodes, precision, fork)
    if fork:
        return fit_forked(engine, model, data, settings, callbacks)
    engine.fabric.launch()
    return train(engine, model, data, settings, callbacks)


# --- from a notebook: forked workers ---------------------------------------------------------

_STATE_NUMBERS = ("step", "steps", "loss", "lr", "grad_norm", "tokens_per_s", "should_stop")


@dataclass
class _Channel:
    """What the parent and its forked workers share: rank 0's messages, the parent's
    stop request, the workers' process ids, and the directory for rank 0's final weights."""

    messages: Any  # multiprocessing Queue of ("step"|"eval", ...), ("done", ...), ("error", ...)
    stop: Any  # multiprocessing Event
    pids: Any  # multiprocessing Array, one per rank
    weights: Path  # a lab checkpoint directory


class _Forwarder:
    """Rank 0's only callback in a forked worker. It sends each step's numbers to the
    parent, which runs the user's callbacks on them (a forked child must not use the
    notebook's widgets or sockets), and applies a stop that the parent asked for."""

    def __init__(self, channel: _Channel) -> None:
        self.channel, self.sent = channel, {}  # sent: how much of each history list

    def on_step(self, state: TrainState) -> None:
        if self.channel.stop.is_set():
            state.should_stop = True  # reaches every rank through fit's all-reduce
        self._send("step", state)

    def on_eval(self, state: TrainState) -> None:
        self._send("eval", state)

    def _send(self, kind: str, state: TrainState) -> None:
        new = {}  # what the history gained since the last message
        for name, value in vars(state.history).items():
            if isinstance(value, list):
                new[name], self.sent[name] = value[self.sent.get(name, 0) :], len(value)
            else:
                new[name] = value
        numbers = {name: getattr(state, name) for name in _STATE_NUMBERS}
        self.channel.messages.put((kind, new, numbers | {"metrics": dict(state.metrics)}))


def _worker(
    fabric: Any,
    engine: FabricEngine,
    model: nn.Module,
    data: Any,
    s: Settings,
    channel: _Channel,
) -> None:
    """One forked worker: ``train``, then rank 0 writes the whole weights for the parent.

    Errors go to the parent as messages (and are re-raised, so that torch's launcher
    ends the other workers too).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # GNU OpenMP hangs in a child forked after the parent used its thread pool (checked
    # with torch 2.13); one thread never enters the pool.
    torch.set_num_threads(1)
    channel.pids[engine.global_rank] = os.getpid()
    try:
        callbacks = [_Forwarder(channel)] if engine.is_global_zero else []
        history = train(engine, model, data, s, callbacks)
        # Whole weights: gathered from the shards under FSDP (collective, on every rank).
        weights = get_model_state_dict(model, options=engine.state_dict_options)
        if engine.is_global_zero:
            write_weights(channel.weights, model, weights)
            channel.messages.put(("done", history.to_dict()))
    except BaseException as error:
        try:  # the parent re-raises it as it is, if it survives pickling
            error_copy = pickle.loads(pickle.dumps(error))
        except Exception:
            error_copy = None
        channel.messages.put(("error", engine.global_rank, error_copy, traceback.format_exc()))
        raise


def _relay(
    channel: _Channel,
    launcher: threading.Thread,
    failure: list[BaseException],
    state: TrainState,
    hooks: tuple[list[Hook], list[Hook]],
    progress: Progress,
) -> History:
    """In the parent: apply rank 0's forwarded steps to ``state`` and call the user's
    hooks on them, until rank 0's final History arrives; raise a worker's error."""
    while True:
        alive = launcher.is_alive()  # before get: once it has ended, its messages are queued
        try:
            message = channel.messages.get(timeout=0.1)
        except queue.Empty:
            if alive:
                continue
            cause = failure[0] if failure else None
            raise RuntimeError(
                f"fit's worker processes ended without a result ({cause})"
            ) from cause
        kind = message[0]
        if kind == "done":
            return History.from_dict(message[1])
        if kind == "error":
            _, rank, error, trace = message
            where = f"in fit's worker process of rank {rank}:\n{trace}"
            if error is None:
                raise RuntimeError(f"error {where}")
            error.add_note(f"(raised {where})")
            raise error
        _, new, numbers = message
        for name, value in new.items():
            if isinstance(value, list):
                getattr(state.history, name).extend(value)
            else:
                setattr(state.history, name, value)
        numbers["should_stop"] = numbers["should_stop"] or state.should_stop
        for name, value in numbers.items():
            setattr(state, name, value)
        if kind == "step":
            progress.show(state)
        on_step, on_eval = hooks
        for hook in on_eval if kind == "eval" else on_step:
            hook(state)
        if state.should_stop:
            channel.stop.set()


def _end_workers(launcher: threading.Thread, pids: Any, kill: bool) -> None:
    """Wait for the workers; with ``kill``, terminate them first (SIGTERM, by their own
    ids; torch's launcher then ends any that had not reported one)."""
    while launcher.is_alive():
        for pid in pids[:] if kill else ():
            if pid:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        launcher.join(1.0)


def fit_forked(
    engine: FabricEngine,
    model: nn.Module,
    data: Any,
    s: Settings,
    callbacks: Iterable[Any],
) -> History:
    """fit from a notebook, where there is no script to re-run: Fabric forks one worker
    per device, each runs ``train``; the user's callbacks run here on rank 0's forwarded
    steps; rank 0's final weights are loaded into ``model`` (a forked child cannot change
    the parent's memory).

    Ctrl-C (KeyboardInterrupt) asks the workers to stop after their current step, as
    one process does; a second one kills them.
    """
    if engine.device.type == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError(
            "CUDA is already in use in this kernel (a tensor or model was put on the GPU, "
            "or fit ran on one), and forked worker processes cannot use CUDA after that. "
            "Restart the kernel and call fit(devices=...) before anything touches the GPU "
            "(leave the model on the CPU: fit moves it), or run a script instead."
        )
    hooks = split_callbacks(callbacks)
    context = multiprocessing.get_context("fork")
    state = TrainState(step=0, steps=s.steps, model=model, history=History())
    failure: list[BaseException] = []
    port = os.environ.get("MASTER_PORT")  # Fabric's launcher sets it in this process
    with tempfile.TemporaryDirectory(prefix="lab-fit-") as tmp:
        channel = _Channel(
            context.Queue(), context.Event(), context.Array("i", engine.world_size),
            Path(tmp),
        )  # fmt: skip

        def launch() -> None:  # blocks until every worker has ended
            try:
                engine.fabric.launch(
                    _worker, engine, model, data, replace(s, progress=False), channel
                )
            except BaseException as error:
                failure.append(error)

        launcher = threading.Thread(target=launch, name="fit workers", daemon=True)
        progress = Progress(s.steps, 0, s.progress)
        finished = False
        launcher.start()
        try:
            try:
                final = _relay(channel, launcher, failure, state, hooks, progress)
            except KeyboardInterrupt:
                channel.stop.set()
                print(
                    "fit: interrupted; the workers stop after this step (interrupt again to kill)"
                )
                final = _relay(channel, launcher, failure, state, hooks, progress)
                final.stopped = "interrupted"
                last = latest_checkpoint(s.checkpoint_dir) if s.checkpoint_dir else None
                report_interrupt(state.step, last)
            finished = True
        finally:
            progress.close()
            _end_workers(launcher, channel.pids, kill=not finished)
            if port is None:
                os.environ.pop("MASTER_PORT", None)
            else:
                os.environ["MASTER_PORT"] = port
        load_weights(model, tmp)
    for f in fields(History):  # the object the callbacks saw, now rank 0's final History
        setattr(state.history, f.name, getattr(final, f.name))
    return state.history
