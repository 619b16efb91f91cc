"""Reading a saved training state (``output/state``) for resuming, with everything checked first.

The folder holds ``state.json`` (step, config, optimizer hyper-parameters and which moment tensors each
parameter has) and ``state.safetensors`` (weights ``model.<module>.<name>``, EMA ``ema.<module>.<name>``,
optimizer moments ``opt.<optimizer>.<index>.<name>``), as ``common.save_state`` writes them. A state
folder that is missing a file, truncated, corrupt, holds other tensor names or shapes than the model
being trained, holds NaN/Inf, or was saved for another model is refused with a ConfigError that names
the problem and the two ways on: delete the folder (training starts again from step 0) or set
``resume = false``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from latentforge.io.tensorfile import CheckpointError, SafetensorsFile
from latentforge.train.config import ConfigError, TrainConfig, config_to_dict

# config fields that decide which model a state belongs to (others, such as steps or lr, may change)
IDENTITY = ("mode", "model.base", "model.family", "model.train_text_encoder")


def refuse(folder: Path, problem: str) -> ConfigError:
    """The error for a state folder that cannot be resumed from, with what to do."""
    return ConfigError(
        f"cannot resume from the training state {folder}: {problem}. Delete that folder to start again from "
        "step 0, or set resume = false (the folder is then replaced at the first save)"
    )


def _listing(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _field(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _read_meta(folder: Path, cfg: TrainConfig | None) -> dict:
    path = folder / "state.json"
    if not path.is_file():
        raise refuse(folder, "state.json is missing (an incomplete or foreign folder)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(folder, f"state.json is unreadable ({e})") from None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("step"), int)
        and meta["step"] >= 0
        and isinstance(meta.get("optimizers"), dict)
        and isinstance(meta.get("config"), dict)
    )
    if not ok:
        raise refuse(folder, "state.json lacks its step, config or optimizers fields (not a latentforge state)")
    if cfg is not None:
        now = config_to_dict(cfg)
        differ = [
            f"{k} = {_field(meta['config'], k)!r} in the state, {_field(now, k)!r} now"
            for k in IDENTITY
            if _field(meta["config"], k) != _field(now, k)
        ]
        if differ:
            raise refuse(folder, f"it was saved for another model ({'; '.join(differ)})")
    return meta


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / "state.safetensors"
    if not path.is_file():
        raise refuse(folder, "state.safetensors is missing")
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        raise refuse(folder, str(e)) from None
    try:
        tensors = {k: f.read(k) for k in f.keys()}
    finally:
        f.close()
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise refuse(folder, f"it holds NaN/Inf values (in {_listing(bad)}): it was saved after training diverged")
    return tensors


def _compare(folder: Path, what: str, expected: dict[str, tuple], tensors: dict[str, Tensor], prefix: str) -> None:
    found = {k[len(prefix) :]: tuple(t.shape) for k, t in tensors.items() if k.startswith(prefix)}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(
        f"{k} {list(found[k])} (model {list(expected[k])})"
        for k in expected.keys() & found.keys()
        if found[k] != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} of other shapes ({_listing(shapes)})")
    if problems:
        raise refuse(folder, f"its {what} tensors do not fit the model being trained: {'; '.join(problems)}")


def _check_optimizer(folder: Path, name: str, opt: torch.optim.Optimizer, saved, tensors: dict[str, Tensor]) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    if not isinstance(saved, dict) or not isinstance(saved.get("state_keys"), dict):
        raise refuse(folder, f"state.json has no entry for the optimizer {name!r}")
    groups = saved.get("param_groups")
    counts = [len(g.get("params", [])) for g in groups] if isinstance(groups, list) else None
    if counts is None or any(not isinstance(g, dict) for g in groups):
        raise refuse(folder, f"the optimizer {name!r} has no parameter groups in state.json")
    if counts != [len(g["params"]) for g in opt.param_groups]:
        raise refuse(
            folder,
            f"the optimizer {name!r} was saved for {sum(counts)} parameters, the model being trained has "
            f"{len(params)} (another model, or train_text_encoder changed)",
        )
    for idx, keys in saved["state_keys"].items():
        if not (isinstance(idx, str) and idx.isdigit() and int(idx) < len(params) and isinstance(keys, list)):
            raise refuse(folder, f"the optimizer {name!r} refers to a parameter {idx!r} that does not exist")
        for k in keys:
            t = tensors.get(f"opt.{name}.{idx}.{k}")
            if t is None:
                raise refuse(folder, f"the optimizer tensor opt.{name}.{idx}.{k} is missing")
            if t.dim() and tuple(t.shape) != tuple(params[int(idx)].shape):
                raise refuse(
                    folder,
                    f"the optimizer tensor opt.{name}.{idx}.{k} has shape {list(t.shape)}, its parameter "
                    f"{list(params[int(idx)].shape)}",
                )


def read_state(
    folder: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    ema,
    cfg: TrainConfig | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """(state.json contents, tensors) of a state folder that fits ``modules``, ``optimizers`` and ``ema``."""
    meta = _read_meta(folder, cfg)
    tensors = _read_tensors(folder)
    saved_modules = {k.split(".")[1] for k in tensors if k.startswith("model.") and k.count(".") >= 2}
    if saved_modules != set(modules):
        raise refuse(
            folder,
            f"it holds the networks {sorted(saved_modules)}, the run trains {sorted(modules)} (another mode, or "
            "train_text_encoder or the discriminator switched on or off)",
        )
    for name, m in modules.items():
        expected = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        _compare(folder, f"model ({name})", expected, tensors, f"model.{name}.")
    if ema is not None:
        _compare(folder, "EMA", {k: tuple(v.shape) for k, v in ema.shadow.items()}, tensors, "ema.")
    for name, opt in optimizers.items():
        _check_optimizer(folder, name, opt, meta["optimizers"].get(name), tensors)
    return meta, tensors
