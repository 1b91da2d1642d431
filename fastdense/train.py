"""``fastdense-train``: pretrain SCRL, VICRegL, LEWEL or SelfPatch.

Examples::

    fastdense-train --method scrl                         # built-in dataset, CPU preset on a CPU machine
    fastdense-train --method vicregl --data /data/imagenet/train --backend dali --epochs 100
    fastdense-train --method vicregl --config my.yaml --set optimizer.lr=0.2 --set method_options.alpha=0.9
    fastdense-train --run-dir runs/scrl-a --resume          # continue exactly where it stopped
    torchrun --nproc_per_node 8 -m fastdense.train --method scrl --data /data/imagenet/train
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from fastdense.training import config as cfg

# explicit flag -> config key
FLAGS = {
    "method": "method", "data": "data", "backend": "backend", "epochs": "epochs", "batch_size": "batch_size",
    "run_dir": "run_dir", "workers": "num_workers", "seed": "seed", "device": "device", "precision": "precision",
    "preset": "preset", "max_steps": "max_steps", "checkpoint_every": "checkpoint_every", "lr": "optimizer.lr",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastdense-train",
        description="Pretrain a dense self-supervised method. Options come from, in increasing priority: built-in "
        "defaults, fastdense/configs/<method>.yaml (its 'cpu' preset when there is no --data and no GPU), "
        "--config files, then --set and the explicit flags below. The resolved config is saved as "
        "<run-dir>/config.yaml.",
        epilog="every config key (use with --set key=value or in a --config YAML file), with its built-in default; "
        "fastdense/configs/<method>.yaml and its presets set some of them (epochs, batch_size, optimizer.lr, ...): "
        "--print-config shows what a run would use:\n" + cfg.describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=cfg.METHODS, help="method to train (default: scrl)")
    p.add_argument("--data", help="image folder (any backend; ffcv converts it once into a cached .beton) or .beton file (ffcv, written by fastdense-write-beton); omit for the built-in dataset")
    p.add_argument("--backend", choices=("dali", "ffcv", "torch"), help="data pipeline (default: torch)")
    p.add_argument("--epochs", type=int, help="passes over the data")
    p.add_argument("--batch-size", type=int, help="images per process per step")
    p.add_argument("--run-dir", help="output directory (default: runs/<method>-<UTC time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint, "
                   "exactly; refused when the data or the config differs in anything but " + ", ".join(cfg.RESUMABLE_CHANGES)
                   + ". The run's max_steps comes back with it: when the checkpoint has reached it, fastdense-train "
                   "says there is nothing to do and exits 0 (pass --max-steps N or --set max_steps= to continue)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="config file(s), applied in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key (repeatable)")
    p.add_argument("--workers", type=int, help="loader workers per process (config: num_workers)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), help="training device")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="autocast precision")
    p.add_argument("--preset", help="auto, full, or a preset named in the method's YAML (cpu)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps as well as at epoch ends")
    p.add_argument("--lr", type=float, help="base learning rate per optimizer.lr_batch images (config: optimizer.lr)")
    p.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (config: progress=false)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def resolve_config(args: argparse.Namespace, has_gpu: bool) -> Dict:
    overrides = dict(cfg.parse_override(text) for text in args.set)
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.compile:
        overrides["compile"] = True
    if args.no_progress:
        overrides["progress"] = False
    base = None
    if args.resume:
        if not args.run_dir:
            raise ValueError("--resume needs --run-dir (the run directory to continue)")
        saved = Path(args.run_dir) / "config.yaml"
        checkpoint = Path(args.run_dir) / "checkpoints" / "last.pt"
        if saved.exists():
            base = cfg.load_yaml(saved)
        elif checkpoint.exists():  # config.yaml deleted: the checkpoint holds the config too
            from fastdense.training.checkpoint import load_training_checkpoint

            base = load_training_checkpoint(checkpoint)["config"]
    config = cfg.resolve(args.method, args.config, overrides, has_gpu=has_gpu, base=base)
    if not config.get("run_dir"):
        config["run_dir"] = str(Path("runs") / f"{config['method']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    return config


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    from fastdense.training import CheckpointError

    args = parser().parse_args(argv)
    try:
        config = resolve_config(args, has_gpu=torch.cuda.is_available())
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdense-train: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"fastdense-train: {e}", file=sys.stderr)
        return 3
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    from fastdense.training.distributed import shutdown

    try:
        return _train(config, args.resume)
    finally:  # whatever the outcome, once the trainer is gone
        shutdown()


def _nothing_to_do(trainer) -> str:
    step, max_steps = trainer.step, trainer.config.get("max_steps")
    if step >= trainer.total_steps or trainer.epoch >= trainer.config["epochs"]:
        return (f"nothing to do: the run in {trainer.run_dir} finished all {trainer.config['epochs']} epochs "
                f"({step} steps); start a new --run-dir to train further")
    return (f"nothing to do: the run in {trainer.run_dir} reached its max_steps ({max_steps}) at step {step}; pass "
            "--max-steps N (above that) or --set max_steps= to continue")


def _no_batch_advice(e) -> str:
    """A :class:`fastdense.pipelines.base.NoBatchError` in fastdense-train's terms: it trains on full
    batches only (no drop_last to turn off), so the way out is a smaller --batch-size (per process)
    or, where a process gets no image at all, fewer processes."""
    if not e.shard_samples:
        return (f"an epoch would hold no batch: {e.where}; train on at most {e.num_samples} processes, "
                "or on more images")
    per = " per process" if e.num_shards > 1 else ""
    return (f"an epoch would hold no batch: {e.where} and --batch-size is {e.batch_size}{per} (training takes "
            f"full batches only); set --batch-size {e.shard_samples} or less")


def _save_traceback(trainer) -> str:
    """Write the exception being handled to ``RUN/error.log`` (``error.rank{N}.log`` with several
    processes, which may fail together); the note that says where (empty when it cannot be written:
    the message itself must still reach the user)."""
    import traceback

    path = Path(trainer.run_dir) / (f"error.rank{trainer.dist.rank}.log" if trainer.dist.enabled else "error.log")
    try:
        path.write_text(traceback.format_exc())
    except OSError:
        return ""
    return f" (traceback in {path})"


def _train(config, resume: bool) -> int:
    """Set up and run one training process; its exit code."""
    from fastdense.pipelines.base import NoBatchError
    from fastdense.training import CheckpointError, NonFiniteLossError, RunDirError, Trainer

    try:
        trainer = Trainer(config, resume=resume)
        # Set-up reads the checkpoint, builds the method and the loader (which checks --data) and
        # probes the run directory; what it refuses is a setting to fix, not a crash to debug.
        trainer.setup()
    except NoBatchError as e:  # its message advises make_loader's arguments, which fastdense-train sets itself
        print(f"fastdense-train: {_no_batch_advice(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdense-train: {e}", file=sys.stderr)
        return 2
    except (RunDirError, CheckpointError) as e:
        print(f"fastdense-train: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("fastdense-train: interrupted during set-up, before any training step", file=sys.stderr)
        return 130
    if resume and trainer.finished():
        if trainer.dist.is_main:
            print(f"fastdense-train: {_nothing_to_do(trainer)}")
        return 0
    try:
        summary = trainer.fit()
    except RunDirError as e:
        print(f"fastdense-train: {e}", file=sys.stderr)
        return 3
    except NonFiniteLossError as e:
        print(f"fastdense-train: {e}", file=sys.stderr)
        return 4
    except (ValueError, OSError) as e:
        # The loader found out mid-run what set-up could not see (files that stopped decoding or
        # vanished): a message with where training stands, as for a setting refused at set-up. The
        # traceback goes to the run directory, so an error of the code itself is not lost.
        print(f"fastdense-train: {e}; training stopped after {trainer.step} steps; {trainer.last_good_note()}"
              f"{_save_traceback(trainer)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # No checkpoint here: the interrupted step may be half applied; the last one written is whole.
        print(f"fastdense-train: interrupted at step {trainer.step}; {trainer.last_good_note()}; continue with --resume "
              f"--run-dir {trainer.run_dir}", file=sys.stderr)
        return 130
    if trainer.dist.is_main:
        loss = ""
        if summary.get("first_loss") is not None:
            loss = f" loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f};"
        where = [f"checkpoint {summary['checkpoint']}", f"config {summary['config']}",
                 f"metrics {summary['metrics_csv']} and {summary['metrics_jsonl']}"]
        if summary.get("loss_curve"):
            where.append(f"loss curve {summary['loss_curve']}")
        if summary.get("tensorboard"):
            where.append(f"TensorBoard logs {summary['tensorboard']}")
        ran = summary["steps"] - summary["first_step"]
        resumed = f" (resumed at step {summary['first_step']}, now at step {summary['steps']})" if summary["first_step"] else ""
        print(f"fastdense-train: {ran} step{'s' if ran != 1 else ''}{resumed} in {summary['seconds']:.0f} s;{loss} run directory "
              f"{summary['run_dir']}: " + ", ".join(where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
