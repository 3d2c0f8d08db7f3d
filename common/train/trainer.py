"""The one Accelerate training loop shared by both stages.

A stage hands over a *method*: an `nn.Module` whose `forward(batch)` returns `(loss, stats)` and
that holds the trainable `encoder` (contriever's style). Everything else lives here: sharding,
gradient accumulation, autocast, clipping, AdamW + warmup/decay, atomic checkpoints and exact
resume, non-finite loss handling, logging to Accelerate's trackers. Evaluation and reports reach
the loop only as callbacks (common/train/callbacks.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from twotower.common.model.distributed import use_cpu
from twotower.common.model.encoder import Encoder
from twotower.common.model.grad_cache import GradCache
from twotower.common.recipe.args import TrainArgs
from twotower.common.recipe.config import RecipeError
from twotower.common.train import rundir
from twotower.common.train.callbacks import TrainerCallback, TrainPoint
from twotower.common.train.epochs import (EpochSampler, TrainState, micro_batch_seed,  # noqa: F401
                                          resolve_batch, steps_for_epochs)
from twotower.common.train.guards import NonFiniteLossError, check_finite_model, check_sharding

log = logging.getLogger("twotower.train")


class Trainer:
    def __init__(self, args: TrainArgs, method: nn.Module, train_dataset: Dataset,
                 collate_fn: Callable[[list], dict], recipe_yaml: str | None = None,
                 callbacks: Sequence[TrainerCallback] = ()):
        """`recipe_yaml`: the whole recipe, saved as output_dir/recipe.yaml and compared on
        resume. `callbacks`: evaluation and reports (common/train/callbacks.py; what `recipe.eval`
        asks for: twotower.common.report.callbacks.callbacks_from_recipe)."""
        self.args, self.recipe_yaml, self.callbacks = args, recipe_yaml, list(callbacks)
        self.output_dir = Path(args.output_dir)
        # one process may train several runs in turn (domain_adapt: pretraining then fine-tuning,
        # each with its own mixed precision); Accelerate keeps its settings process-wide and
        # refuses a change, so drop them. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = Accelerator(
            cpu=use_cpu(args.device), mixed_precision=args.mixed_precision,
            log_with=list(args.log_with) or None,
            project_dir=str(self.output_dir / "logs"),
            # every buffer a method holds (e.g. a MoCo queue) is kept identical on all processes
            # by construction, so re-broadcasting it each step would only cost time
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        check_sharding(str(self.accelerator.distributed_type.value), os.environ,
                       getattr(plugin, "zero_stage", None))
        if args.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # Accelerate would train in fp32 without a word (no autocast, no GradScaler on CPU)
            raise RecipeError("train.mixed_precision=fp16 needs a GPU: on the CPU Accelerate "
                              "runs fp32 instead. Use train.mixed_precision=bf16 (CPUs with "
                              "AVX512_BF16/AMX) or no")
        set_seed(args.seed)
        args = self.args = resolve_batch(args, self.accelerator.num_processes, announce=True)
        if args.epochs > 0:  # train.max_steps stays a cap
            steps = min(args.max_steps, steps_for_epochs(args, len(train_dataset),
                                                         self.accelerator.num_processes))
            log.info("train.epochs=%g: %d steps of %d examples", args.epochs, steps,
                     args.per_device_batch_size * args.gradient_accumulation_steps
                     * self.accelerator.num_processes)
            args = self.args = dataclasses.replace(args, max_steps=steps)
        self.state = TrainState()
        self.sampler = EpochSampler(train_dataset, args.seed)
        self.dataset = train_dataset
        loader = DataLoader(train_dataset, batch_size=args.per_device_batch_size,
                            sampler=self.sampler, collate_fn=collate_fn, drop_last=True,
                            num_workers=args.num_workers)
        if args.compile:  # before prepare(): DDP then wraps a method whose towers are compiled
            encoders = [m for m in method.modules() if isinstance(m, Encoder)]
            if not encoders:
                raise RecipeError("'train.compile' compiles the method's encoders; "
                                  f"{type(method).__name__} has none")
            for encoder in encoders:
                encoder.compile_for_training()
        params = [p for p in method.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and LayerNorms
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
            # one fused kernel on GPUs with train.compile; elsewhere PyTorch's default
            fused=True if args.compile and self.accelerator.device.type == "cuda" else None)
        # not passed to prepare(): Accelerate would step it once per process
        self.scheduler = get_scheduler(
            "constant_with_warmup" if args.scheduler == "constant" else args.scheduler,
            optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
        self.method, self.optimizer, self.loader = self.accelerator.prepare(method, optimizer, loader)
        self.accelerator.register_for_checkpointing(self.scheduler, self.state)

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.method)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _log(self, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=self.state.step)

    def _save_checkpoint(self) -> None:
        acc = self.accelerator
        # identical weights on every process: all of them raise here, or none
        check_finite_model(self.unwrapped, self.state.step)
        staging = rundir.staging_dir(self.output_dir, self.state.step)
        if self.is_main and staging.exists():
            shutil.rmtree(staging)
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        acc.wait_for_everyone()
        if self.is_main:
            rundir.publish_checkpoint(staging, rundir.checkpoint_dir(self.output_dir, self.state.step),
                                      self.state.state_dict(), self.args.keep_last)
        acc.wait_for_everyone()

    @staticmethod
    def _tensorboard_kwargs(start: Path | None) -> dict:
        """On resume, tensorboard hides what a killed run logged after the checkpoint it resumes
        from (SummaryWriter's purge_step): those steps are logged again, and would show twice."""
        if start is None:
            return {}
        return {"tensorboard": {"purge_step": rundir.checkpoint_step(start) + 1}}

    def _resume_point(self) -> Path | None:
        """The newest complete checkpoint whose files all read whole, on every process; a damaged
        one is named and skipped for the one before it (logged), none readable is an error."""
        done = rundir.complete_checkpoints(self.output_dir)
        if not done:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0",
                        self.output_dir / rundir.CHECKPOINTS)
            return None
        damaged = []
        for checkpoint in reversed(done):
            problem = rundir.damaged_file(checkpoint)
            flag = torch.tensor([float(problem is not None)], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() == 0:
                if damaged:
                    log.warning("--resume: skipped damaged checkpoint(s) (%s); resuming from %s",
                                "; ".join(damaged), checkpoint)
                return checkpoint
            damaged.append(problem or f"{checkpoint}: damaged on another process")
            log.warning("--resume: checkpoint %s cannot be read: %s", checkpoint, damaged[-1])
        raise rundir.CheckpointError(
            f"--resume: no checkpoint of {self.output_dir} can be read: {'; '.join(damaged)}. "
            "Restore the files, or start again with train.overwrite_output_dir=true")

    def _point(self, final: bool = False) -> TrainPoint:
        return TrainPoint(self.state.step, self.unwrapped.encoder, self.accelerator,
                          self.output_dir, final)

    def _evaluate(self, final: bool = False) -> dict[str, float]:
        metrics: dict[str, float] = {}
        point = self._point(final)
        for callback in self.callbacks:
            if self.is_main or callback.every_process:
                metrics.update(callback.on_evaluate(point))
        if self.is_main and metrics:
            self._log({f"eval/{k}": v for k, v in metrics.items()})
        self.accelerator.wait_for_everyone()
        return metrics

    def _cached_step(self, batch: dict, accum: int, last_micro: bool):
        """forward + backward of one micro-batch with train.grad_cache_chunk (common/model/grad_cache.py)."""
        cache = GradCache(self.method, self.args.grad_cache_chunk, autocast=self.accelerator.autocast)
        loss, stats = cache.forward(batch)
        ok = self._check_finite(loss, batch)
        if ok:
            cache.backward(scale=1.0 / accum, backward_fn=self.accelerator.backward,
                           no_sync=lambda: self.accelerator.no_sync(self.method),
                           sync_last=last_micro)
        return loss, stats, ok

    def _check_finite(self, loss: torch.Tensor, batch: dict) -> bool:
        """True if the step may proceed. Every process takes the same decision."""
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0],
                           device=loss.device)
        bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return True
        ids = batch.get("ids")
        message = (f"non-finite loss ({loss.item()}) at step {self.state.step + 1} "
                   f"(epoch {self.state.epoch}, batch {self.state.batches_in_epoch}); "
                   f"batch ids: {ids if ids is not None else 'not given by this stage'}")
        if self.args.nonfinite_loss == "skip":
            self.state.skipped_nonfinite += 1
            log.warning("%s — step skipped (train.nonfinite_loss=skip)", message)
            return False
        raise NonFiniteLossError(message + ". No checkpoint of this state was written; set "
                                 "train.nonfinite_loss=skip to drop such steps instead.")

    # ------------------------------------------------------------------ loop
    def _setup_run_dir(self, resume: bool) -> contextlib.AbstractContextManager:
        lock = (rundir.claim_output_dir(self.output_dir, resume, self.args.overwrite_output_dir)
                if self.is_main else contextlib.nullcontext())
        self.accelerator.wait_for_everyone()
        return lock

    def train(self, resume: bool = False) -> dict[str, float]:
        with self._setup_run_dir(resume):
            if self.is_main and self.recipe_yaml is not None:
                recipe_file = self.output_dir / "recipe.yaml"
                new = self.recipe_yaml
                # a run that never completed a checkpoint has nothing its recipe must match
                changed = (rundir.check_resumed_recipe(recipe_file, new,
                                                       self.args.allow_recipe_change)
                           if resume and rundir.complete_checkpoints(self.output_dir) else [])
                if changed:
                    log.warning("the recipe differs from the one this run started with (%s) in "
                                "%s; the new one is used from here on and saved as recipe.yaml",
                                recipe_file, ", ".join(changed))
                rundir.write_atomic(recipe_file, new)
                rundir.write_atomic(self.output_dir / "run_info.json", _json(
                    rundir.run_info(self.accelerator.num_processes)))
            start = self._resume_point() if resume else None
            self.accelerator.init_trackers("tb", init_kwargs=self._tensorboard_kwargs(start))
            for callback in self.callbacks:
                callback.on_train_begin(self.accelerator)
            if start is not None:
                self.accelerator.load_state(str(start))
                log.info("resumed from %s (step %d)", start, self.state.step)
            try:
                return self._loop()
            finally:
                # not accelerator.end_training(): it also destroys the process group, which the
                # caller may still need (a second stage, a final barrier)
                for tracker in self.accelerator.trackers:
                    tracker.finish()

    def _loop(self) -> dict[str, float]:
        args, acc, state = self.args, self.accelerator, self.state
        if state.step == 0 and any(c.evaluate_before_training for c in self.callbacks):
            self._evaluate()
        accum = max(args.gradient_accumulation_steps, 1)
        per_step = args.per_device_batch_size * acc.num_processes * accum
        bar = tqdm(total=args.max_steps, initial=state.step, disable=not self.is_main,
                   desc="train", unit="step")
        running, counted, tick = torch.zeros((), device=acc.device), 0, time.perf_counter()
        first_step = state.step + 1  # a resumed run compiles again
        step_ok = True  # no non-finite micro-batch yet in this accumulation window
        self.method.train()
        while state.step < args.max_steps:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(state.epoch)
            loader = (acc.skip_first_batches(self.loader, state.batches_in_epoch)
                      if state.batches_in_epoch else self.loader)
            # Accelerate's loaders count epochs themselves and re-seed the sampler from that count
            # on every __iter__; a resumed process must tell them which epoch this really is.
            loader.set_epoch(state.epoch)
            # ...but on several processes skip_first_batches nests the sampler one wrapper deeper
            # (SkipBatchSampler > BatchSamplerShard > BatchSampler) than their set_epoch reaches:
            # the resumed epoch would be read in epoch 0's order. Set it on the sampler itself.
            self.sampler.set_epoch(state.epoch)
            if len(self.loader) == 0:
                raise ValueError("the training data is smaller than one global batch "
                                 f"({args.per_device_batch_size} x {acc.num_processes} processes)")
            skipped_before, seen_before = state.skipped_nonfinite, state.batches_in_epoch
            for batch in loader:
                state.batches_in_epoch += 1
                state.micro_batches += 1
                last_micro = state.micro_batches % accum == 0
                # Dropout draws from the global torch RNG, which DataLoader iterators (re-created
                # on resume), evaluation and checkpointing also consume: seeding it from where the
                # run is makes every forward's randomness a pure function of (seed, micro-batch,
                # process), so a resumed run repeats the uninterrupted one bit for bit.
                torch.manual_seed(micro_batch_seed(args.seed, state.micro_batches,
                                                   acc.process_index))
                sync = contextlib.nullcontext() if last_micro else acc.no_sync(self.method)
                if args.grad_cache_chunk:  # GradCache: syncs only in its last pass itself
                    loss, stats, ok = self._cached_step(batch, accum, last_micro)
                    running += loss.detach() if ok else 0.0
                    counted += int(ok)
                else:
                    with sync:
                        with acc.autocast():
                            loss, stats = self.method(batch)
                        ok = self._check_finite(loss, batch)
                        if ok:
                            acc.backward(loss / accum)
                            running += loss.detach()
                            counted += 1
                # one non-finite micro-batch skips the whole accumulated step (skip mode)
                step_ok = step_ok and ok
                if not last_micro:
                    continue
                ok, step_ok = step_ok, True
                if ok:
                    if args.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.method.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                # method hooks: after a step (MoCo: enqueue, momentum update), or instead of it
                hook = getattr(self.unwrapped, "on_optimizer_step" if ok else "on_step_skipped",
                               None)
                if callable(hook):
                    hook()
                if not ok:
                    continue
                state.step += 1
                bar.update(1)
                if args.compile and state.step == first_step:
                    log.info("train.compile: the first step took %.1f s, compilation included",
                             time.perf_counter() - tick)
                if state.step % args.log_every == 0 or state.step == args.max_steps:
                    elapsed = time.perf_counter() - tick
                    mean_loss = (running / max(counted, 1))
                    values = {"train/loss": acc.reduce(mean_loss, reduction="mean").item(),
                              "train/lr": self.scheduler.get_last_lr()[0],
                              "train/examples_per_s": per_step * counted / accum / max(elapsed, 1e-9),
                              "train/epoch": state.epoch}
                    values.update({f"train/{k}": float(v) for k, v in stats.items()})
                    self._log(values)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}")
                    running.zero_()
                    counted, tick = 0, time.perf_counter()
                if args.eval_every and state.step % args.eval_every == 0 and state.step < args.max_steps:
                    self._evaluate()
                if args.save_every and state.step % args.save_every == 0 and state.step < args.max_steps:
                    self._save_checkpoint()
                if state.step >= args.max_steps:
                    break
            else:
                # with train.nonfinite_loss=skip, a loss that is never finite would otherwise
                # loop over the epochs forever without a step: stop once a whole pass was skipped
                seen = state.batches_in_epoch - seen_before  # 0 when resumed at an epoch's end
                if seen and state.skipped_nonfinite - skipped_before == seen:
                    raise NonFiniteLossError(
                        f"every batch of epoch {state.epoch} had a non-finite loss "
                        f"({state.skipped_nonfinite} skipped in total, step {state.step}); "
                        "train.nonfinite_loss=skip cannot make progress: fix the data or recipe")
                state.epoch += 1
                state.batches_in_epoch = 0
        bar.close()
        self._save_checkpoint()
        metrics = self._evaluate(final=True)
        if self.is_main:
            rundir.save_encoder_atomically(self.unwrapped.encoder, self.output_dir / "model")
            if metrics:
                rundir.write_atomic(self.output_dir / "metrics.json", _json(metrics))
            for callback in self.callbacks:
                callback.on_train_end(self._point(final=True), metrics)
        acc.wait_for_everyone()
        if state.skipped_nonfinite:
            log.warning("%d steps were skipped for a non-finite loss", state.skipped_nonfinite)
        return {**metrics, "step": state.step, "skipped_nonfinite": state.skipped_nonfinite}


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
