"""Training configuration: built-in defaults < the method's YAML < its preset < a user YAML < the command line.

Every option lives in :data:`OPTIONS` with its default and a one-line description, so ``--help``,
the saved ``config.yaml`` and the code read the same list. Keys are dotted (``optimizer.lr``); the
config itself is a nested dict.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("scrl", "vicregl", "lewel", "selfpatch")

# key -> (default, description). The order is the order --help prints.
OPTIONS: Dict[str, Tuple[Any, str]] = {
    "method": ("scrl", "which method to train: scrl, vicregl, lewel or selfpatch"),
    "method_options": ({}, "keyword options for fastdense.methods.build_method (backbone, heads, loss weights ...)"),
    "preset": ("auto", "auto: the method YAML's 'cpu' preset when there is no --data and no GPU; cpu, full: force one"),
    "data": (None, "an image folder (any backend; ffcv converts it once into a cached .beton) or a .beton file (ffcv, see fastdense-write-beton), saved as an absolute path; empty: the built-in dataset"),
    "backend": ("torch", "data pipeline: torch, dali or ffcv"),
    "epochs": (100, "passes over the data"),
    "max_steps": (None, "stop after this many optimisation steps in total (schedules still span all epochs)"),
    "batch_size": (256, "images per process per step; the global batch is this times the world size"),
    "num_workers": (8, "loader worker processes per process"),
    "photometric": (True, "colour augmentations on (false: geometry only)"),
    "seed": (0, "seed for model initialisation, augmentations and sampling"),
    "device": ("auto", "auto (CUDA when present), cuda or cpu"),
    "precision": ("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16 or fp32"),
    "channels_last": ("auto", "auto (on GPU for CNN backbones), true or false"),
    "compile": (False, "wrap the method in torch.compile"),
    "sync_batchnorm": ("auto", "auto (when the recipe uses it and more than one process trains), true, false"),
    "ddp_find_unused_parameters": (True, "DDP tolerates parameters without a gradient in a step (e.g. a step without SCRL boxes on any rank)"),
    "optimizer.name": ("lars", "lars or adamw"),
    "optimizer.lr": (0.3, "base learning rate for a global batch of optimizer.lr_batch images"),
    "optimizer.lr_batch": (256, "the batch the base lr refers to: lr = optimizer.lr * global_batch / lr_batch"),
    "optimizer.min_lr": (0.0, "learning rate at the end of the cosine schedule (scaled like optimizer.lr when optimizer.scale_min_lr)"),
    "optimizer.scale_min_lr": (True, "scale optimizer.min_lr by global_batch / lr_batch too (VICRegL's end-lr ratio); false: as given (DINO's and SelfPatch's min_lr)"),
    "optimizer.warmup_epochs": (10.0, "linear warm-up length in epochs"),
    "optimizer.weight_decay": (1.5e-6, "weight decay at the start (biases and norm parameters do not decay, except where a method follows its reference's rule: SCRL decays its stem's, downsample paths' and heads' BatchNorm weights)"),
    "optimizer.weight_decay_end": (None, "weight decay at the end, on a cosine schedule (empty: constant)"),
    "optimizer.momentum": (0.9, "LARS momentum"),
    "optimizer.eta": (0.001, "LARS trust coefficient"),
    "optimizer.betas": ([0.9, 0.999], "AdamW betas"),
    "optimizer.clip_grad": (None, "clip the global gradient norm to this value (empty: no clipping)"),
    "optimizer.clip_grad_per_parameter": (False, "clip each parameter's gradient norm to optimizer.clip_grad on its own (DINO's and SelfPatch's way) instead of the global norm"),
    "run_dir": (None, "where checkpoints, logs and plots go (empty: runs/<method>-<UTC time>)"),
    "checkpoint_every": (500, "also checkpoint every this many steps (0: only at epoch ends)"),
    "log_every": (10, "write a metrics row every this many steps"),
    "min_free_gb": (None, "refuse to start with less free disk in the run directory (empty: room for two checkpoints, the last one and the one being written, each counted as 3x the method's state dict)"),
    "progress": (True, "show a tqdm progress bar"),
}


def defaults() -> Dict:
    """The built-in defaults as a nested dict."""
    config: Dict = {}
    for key, (value, _) in OPTIONS.items():
        set_key(config, key, copy.deepcopy(value))
    return config


def get_key(config: Dict, key: str, default=None):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_key(config: Dict, key: str, value) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def merge(base: Dict, update: Dict) -> Dict:
    """``base`` with ``update`` merged in, recursively; neither argument is changed."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flat_keys(config: Dict, prefix: str = "") -> List[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and full != "method_options":
            keys += flat_keys(value, full + ".")
        else:
            keys.append(full)
    return keys


def parse_override(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read as YAML (``lr=0.1`` -> 0.1, ``betas=[0.9,0.95]`` -> a list)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: the value {raw!r} is not valid YAML ({e.problem or e})") from e
    return key, value


# The sections that hold dotted keys ("optimizer" for "optimizer.lr"); each must be a mapping.
SECTIONS = tuple(dict.fromkeys(".".join(key.split(".")[:n]) for key in OPTIONS for n in range(1, key.count(".") + 1)))


def check_keys(config: Dict) -> None:
    """Unknown keys are mistakes (a typo would otherwise be silently ignored); a section given
    something else than a mapping (``optimizer: 3``) is named as such, not as an unknown key."""
    for section in SECTIONS:
        value = get_key(config, section, {})
        if not isinstance(value, dict):
            raise ValueError(f"config key {section!r} must be a mapping (key: value, ...) of the {section}.* keys; got {value!r}")
    known = set(OPTIONS)
    for key in flat_keys(config):
        if key not in known and not key.startswith("method_options."):
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}; see fastdense-train --help")


# Keys that do not change what a run computes, so ``--resume`` accepts new values for them
# (num_workers: every random draw of the pipelines derives from seed, epoch and sample).
RESUMABLE_CHANGES = ("run_dir", "max_steps", "progress", "log_every", "checkpoint_every", "min_free_gb", "num_workers")

# What each key accepts, checked (and numbers written as text, like YAML's ``1e-6``, converted)
# before any work starts: (kind, lowest value or choices, whether empty is allowed).
# kinds: "int", "number", "bool", "text", "path" (text made absolute against the working directory, so a
# saved config names the same file from anywhere), "choice", "auto-bool" ("auto" or a bool), "mapping", "betas".
CHECKS: Dict[str, Tuple[str, Any, bool]] = {
    "method": ("choice", METHODS, False),
    "method_options": ("mapping", None, True),
    "preset": ("text", None, True),
    "data": ("path", None, True),
    "backend": ("choice", ("torch", "dali", "ffcv"), False),
    "epochs": ("int", 1, False),
    "max_steps": ("int", 1, True),
    "batch_size": ("int", 1, False),
    "num_workers": ("int", 0, False),
    "photometric": ("bool", None, False),
    "seed": ("int", 0, False),
    "device": ("choice", ("auto", "cuda", "cpu"), False),
    "precision": ("choice", ("auto", "bf16", "fp16", "fp32"), False),
    "channels_last": ("auto-bool", None, False),
    "compile": ("bool", None, False),
    "sync_batchnorm": ("auto-bool", None, False),
    "ddp_find_unused_parameters": ("bool", None, False),
    "optimizer.name": ("choice", ("lars", "adamw"), False),
    "optimizer.lr": ("number", 0.0, False),
    "optimizer.lr_batch": ("number", 1e-12, False),
    "optimizer.min_lr": ("number", 0.0, False),
    "optimizer.scale_min_lr": ("bool", None, False),
    "optimizer.warmup_epochs": ("number", 0.0, False),
    "optimizer.weight_decay": ("number", 0.0, False),
    "optimizer.weight_decay_end": ("number", 0.0, True),
    "optimizer.momentum": ("number", 0.0, False),
    "optimizer.eta": ("number", 0.0, False),
    "optimizer.betas": ("betas", None, False),
    "optimizer.clip_grad": ("number", 1e-12, True),
    "optimizer.clip_grad_per_parameter": ("bool", None, False),
    "run_dir": ("text", None, True),
    "checkpoint_every": ("int", 0, True),
    "log_every": ("int", 1, False),
    "min_free_gb": ("number", 0.0, True),
    "progress": ("bool", None, False),
}


def _as_number(value):
    """``value`` as an int or float, or None. Text that reads as a number counts: YAML reads ``1e-6``
    (no dot) as a string, and ``--set optimizer.weight_decay=1e-6`` must still mean 1e-6."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _checked(key: str, value):
    kind, arg, nullable = CHECKS[key]
    if value is None:
        if nullable:
            return None
        raise ValueError(f"config key {key!r} needs a value ({OPTIONS[key][1]})")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool) and value >= arg:
            return value
        raise ValueError(f"config key {key!r} must be an integer >= {arg}{', or empty' if nullable else ''}; got {value!r}")
    if kind == "number":
        number = _as_number(value)
        if number is not None and math.isfinite(number) and number >= arg:
            return number
        bound = ">= 0" if arg == 0 else "> 0"
        raise ValueError(f"config key {key!r} must be a finite number {bound}{', or empty' if nullable else ''}; got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} must be true or false; got {value!r}")
    if kind == "auto-bool":
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"config key {key!r} must be auto, true or false; got {value!r}")
    if kind == "choice":
        if value in arg:
            return value
        raise ValueError(f"config key {key!r} must be one of {', '.join(arg)}; got {value!r}")
    if kind in ("text", "path"):
        if isinstance(value, (str, Path)):
            # A relative path means the working directory's: made absolute, config.yaml (and
            # --resume, fastdense-eval) find it from any directory. An old run's relative path, read
            # back here, still means the working directory's, as it always did.
            return os.path.abspath(value) if kind == "path" and str(value) else str(value)
        raise ValueError(f"config key {key!r} must be text; got {value!r}")
    if kind == "mapping":
        if isinstance(value, dict):
            return value
        raise ValueError(f"config key {key!r} must be a mapping (key: value, ...); got {value!r}")
    numbers = [_as_number(v) for v in value] if isinstance(value, (list, tuple)) else []
    if len(numbers) == 2 and all(n is not None and 0 <= n < 1 for n in numbers):
        return numbers
    raise ValueError(f"config key {key!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {value!r}")


def validate(config: Dict) -> Dict:
    """Refuse unknown keys and values of the wrong type or range, naming the key; returns ``config``
    with numbers given as text converted (in place)."""
    check_keys(config)
    for key in CHECKS:
        value = get_key(config, key, copy.deepcopy(OPTIONS[key][0]))
        set_key(config, key, _checked(key, value))
    return config


def load_yaml(path) -> Dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def method_defaults(method: str) -> Tuple[Dict, Dict]:
    """The method's YAML defaults and its presets (``{name: overrides}``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    data = load_yaml(CONFIG_DIR / f"{method}.yaml")
    presets = data.pop("presets", {}) or {}
    return data, presets


def choose_preset(config: Dict, presets: Dict, has_gpu: bool) -> Optional[str]:
    preset = config.get("preset", "auto")
    if preset == "auto":
        return "cpu" if not config.get("data") and not has_gpu and "cpu" in presets else None
    if preset in (None, "full", "none"):
        return None
    if preset not in presets:
        raise ValueError(f"preset must be 'auto', 'full' or one of {sorted(presets)}, got {preset!r}")
    return preset


def resolve(
    method: Optional[str] = None,
    user_files: Iterable = (),
    overrides: Optional[Dict] = None,
    has_gpu: bool = False,
    base: Optional[Dict] = None,
) -> Dict:
    """The full config: defaults < method YAML < preset < ``user_files`` < ``overrides`` (dotted keys).

    ``base``, when given (a resumed run's saved config), replaces the first three layers.
    """
    user = {}
    for path in user_files:
        user = merge(user, load_yaml(path))
    dotted = {}
    for key, value in (overrides or {}).items():
        set_key(dotted, key, value)
    if base is not None:
        return validate(merge(merge(base, user), dotted))
    chosen = method or get_key(dotted, "method") or user.get("method") or OPTIONS["method"][0]
    method_yaml, presets = method_defaults(chosen)
    config = merge(defaults(), method_yaml)
    # The preset depends on --data and --preset, which may come from any layer.
    probe = merge(merge(config, user), dotted)
    preset = choose_preset(probe, presets, has_gpu)
    if preset:
        config = merge(config, presets[preset])
    config = merge(merge(config, user), dotted)
    config["method"] = chosen
    config["preset"] = preset or "full"
    return validate(config)


def save(config: Dict, path) -> None:
    """Write ``config`` as YAML, atomically (``--resume`` reads it back as the run's settings)."""
    from fastdense.training.checkpoint import atomic_write_bytes

    atomic_write_bytes(yaml.safe_dump(config, sort_keys=False).encode(), path)


def describe_options() -> str:
    """One line per option, for ``--help``."""
    width = max(len(k) for k in OPTIONS)
    lines = []
    for key, (default, text) in OPTIONS.items():
        shown = "" if default is None else yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {key.ljust(width)}  {text} [default: {shown or 'empty'}]")
    return "\n".join(lines)
