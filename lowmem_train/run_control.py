"""Stopping a run cleanly and resuming it exactly: Ctrl-C / SIGTERM, non-finite losses and gradients.

A stop (SIGINT or SIGTERM, a non-finite loss or gradient with ``on_nonfinite=stop``, or non-finite gradients
under a lossy strategy, whatever ``on_nonfinite``) takes effect at the end of the optimizer step in progress:
that step's memory row is written, ``checkpoints/last.ckpt`` is saved, and ``RunStopped`` ends
``trainer.fit``; ``train`` then writes the report and the CLI exits non-zero. A second Ctrl-C aborts at once.

Exact resume: checkpoints hold the RNG states and the position in the epoch, and the train loader's
``EpochShuffle`` sampler skips what was consumed, so a resumed run draws the batches and random numbers
(dropout masks) the uninterrupted run would have drawn.

Every checkpoint is saved at the end of a training batch, also the periodic ones (an epoch's last step, the
run's last step): Lightning's ModelCheckpoint saves at epoch end, after the loop has counted the epoch as
processed but not completed, and a run resumed from there shifts every later epoch's sampler seed by one
and, from a max_steps stop mid-epoch, repeats batches.
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch

from .data import EpochShuffle
from .finite import all_finite, gradient_message, gradients, locate_nonfinite, lossy_strategies

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NONFINITE_EXIT_CODE = 3


class RunStopped(Exception):
    """Training ended before its last step; the checkpoint at ``checkpoint`` resumes it."""

    def __init__(self, reason: str, step: int, exit_code: int, checkpoint: Path):
        super().__init__(reason)
        self.reason, self.step, self.exit_code, self.checkpoint = reason, step, exit_code, checkpoint


class RunControl(L.Callback):
    """Signals and the non-finite guard (``on_nonfinite``: stop, skip the step, or off), and the state that
    makes a resumed run continue exactly. Place it after every strategy callback, so the checkpoint it saves
    holds their state after the step."""

    def __init__(self, run_dir: str | Path, train_loader, on_nonfinite: str = "stop", every_epoch: bool = False):
        self.checkpoint_path = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.every_epoch = every_epoch  # also checkpoints/step<N>.ckpt after each epoch and the run's last step
        self.sampler = train_loader.sampler if isinstance(train_loader.sampler, EpochShuffle) else None
        self.batch_size = train_loader.batch_size
        self.on_nonfinite = on_nonfinite
        self.stop: tuple[str, int] | None = None  # (reason, exit code) once a stop is requested
        self.skipped_steps = 0
        self.unchecked_losses: list[torch.Tensor] = []  # on_nonfinite=off: this step's losses
        self.position = (0, 0)  # (epoch, batches done in it), saved in checkpoints
        self._rng_to_restore: dict | None = None
        self._previous_handlers: dict = {}

    # -- signals ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:  # after Lightning's own handlers: they would raise mid-loop
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def on_train_end(self, trainer, pl_module):
        self.restore_signal_handlers()  # Ctrl-C during the final validation interrupts at once

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _request_stop(self, signum, frame) -> None:
        if self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now, without a report
        self.stop = (f"interrupted by {signal.Signals(signum).name}", EXIT_CODES[signum])  # the step is added later

    # -- non-finite guard ------------------------------------------------------------------------------
    def admit_loss(self, trainer, loss: torch.Tensor) -> bool:
        """False when the step must not run: its loss is not finite on some rank (then stop or skip)."""
        if self.on_nonfinite == "off":
            self.unchecked_losses.append(loss.detach())  # the lossy-strategy guard tells a NaN loss apart
            return True
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss.detach()).all()), all=True)
        if not finite:
            self._nonfinite(trainer, "loss")
        return finite

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        """The gradient check: one fused kernel and one host sync per optimizer step, made when
        ``on_nonfinite`` is stop or skip, and always under a lossy strategy (whose NaN/inf stops the run, also
        with skip or off: it would recur every step)."""
        losses, self.unchecked_losses = self.unchecked_losses, []
        model = pl_module.model
        lossy = lossy_strategies(model)
        if (self.on_nonfinite == "off" and not lossy) or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's gradient scaler skips non-finite steps itself
        where = None if all_finite(gradients(model)) else locate_nonfinite(model)  # None: a norm overflowed
        if trainer.strategy.reduce_boolean_decision(where is None, all=True):
            return  # also with step_in_backward, whose gradients were consumed during backward
        for p in pl_module.parameters():
            p.grad = None  # the optimizer step then changes nothing
        step = trainer.global_step + 1
        if not all_finite(losses):  # on_nonfinite=off under a lossy strategy
            self.stop = (f"non-finite loss at step {step}: the forward pass made it, not the backward of lossy "
                         f"strategy {'+'.join(lossy)}", NONFINITE_EXIT_CODE)
        elif lossy:
            self.stop = (gradient_message(model, where, step) if where else f"lossy strategy {'+'.join(lossy)} "
                         f"made another rank's gradients non-finite at step {step}", NONFINITE_EXIT_CODE)
        else:
            self._nonfinite(trainer, "gradient of " + (where.parameter() if where else "another rank's parameters"))

    def _nonfinite(self, trainer, what: str) -> None:
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            return
        strategies = trainer.lightning_module.strategies
        hints = "".join(f"{hint}; " for hint in (s.nonfinite_hint() for s in strategies) if hint)
        self.stop = (f"non-finite {what} at step {trainer.global_step + 1} (strategy="
                     f"{'+'.join(s.name for s in strategies) or 'none'}; {hints}on_nonfinite=skip skips such steps)",
                     NONFINITE_EXIT_CODE)

    # -- stopping at a step boundary, with a checkpoint -------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.position = (trainer.current_epoch, batch_idx + 1)
        epoch_done = batch_idx + 1 == trainer.num_training_batches
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not epoch_done:
            return  # not an optimizer step
        if trainer.strategy.reduce_boolean_decision(self.stop is not None, all=False):
            reason, exit_code = self.stop or ("stopped by another rank", 1)
            if exit_code != NONFINITE_EXIT_CODE:
                reason += f" after step {trainer.global_step}"
            if self.checkpoint_path.is_symlink():
                self.checkpoint_path.unlink()  # the periodic last.ckpt link: do not write through it
            trainer.save_checkpoint(self.checkpoint_path)
            raise RunStopped(reason, trainer.global_step, exit_code, self.checkpoint_path)
        if self.every_epoch and (epoch_done or trainer.global_step == trainer.max_steps):
            self.save_periodic(trainer)

    def save_periodic(self, trainer) -> None:
        """``checkpoints/step<N>.ckpt``, with ``last.ckpt`` linking to it; the previous one is removed."""
        directory = self.checkpoint_path.parent
        path = directory / f"step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            previous = self.checkpoint_path.resolve() if self.checkpoint_path.is_symlink() else None
            self.checkpoint_path.unlink(missing_ok=True)
            self.checkpoint_path.symlink_to(path.name)
            if previous is not None and previous != path.resolve():
                if previous.is_dir():  # a sharded checkpoint (trainer=fsdp)
                    shutil.rmtree(previous)
                else:
                    previous.unlink(missing_ok=True)
        trainer.strategy.barrier()

    def state_dict(self):
        return {"rng": get_rng_state(), "position": self.position}

    def load_state_dict(self, state_dict):
        self._rng_to_restore = state_dict["rng"]
        epoch, batches = state_dict["position"]
        if self.sampler is not None:
            self.sampler.epoch = epoch
            self.sampler.resume_at = (epoch, batches * self.batch_size)


def get_rng_state() -> dict:
    """Every RNG a training step may draw from, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
